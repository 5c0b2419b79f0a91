"""Settings of `directpo bench`: a dataclass whose fields are its flags and YAML keys (see
`directpo.config`). `run_bench`, `plan_check` and `fsdp_memory` read them as attributes."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, check_settings, setting
from ..training.optim import OPTIMIZERS
from .plan_check import ALLOCATORS


@dataclass
class MemoryCheckSettings:
    """Memory checks (instead of the speed comparison)"""

    plan_check: bool = setting(False, "`directpo plan`'s memory per component against the measured peak RSS of one "
                                      "CPU training run of --steps + 1 steps (fp32, one process), and the ratio "
                                      "measured/plan", switch="--plan-check")
    optimizer: str = setting("rmsprop", "--plan-check: the run's optimizer", choices=list(OPTIMIZERS))
    lora_r: int = setting(0, "LoRA rank of every run, both systems (adapters on every linear layer of the blocks, "
                             "directpo's α and dropout; 0: full fine-tuning); with --plan-check, of that run")
    allocator: str = setting("both", "--plan-check: measure with glibc's defaults (freed memory stays in its heap), "
                                     "with MALLOC_MMAP_THRESHOLD_=65536 (RSS follows the live tensors), or both (two "
                                     "runs)", choices=["both", *ALLOCATORS])
    fsdp_memory: bool = setting(False, "peak host memory (VmHWM) of each rank of `directpo train --nproc N --fsdp "
                                       "--max-steps 2 --save-every 1`, and of the same run in one process, polled "
                                       "from outside", switch="--fsdp-memory")
    nproc: int = setting(2, "--fsdp-memory: processes of the sharded run")
    checkpoint_format: str = setting("sharded", "--fsdp-memory: the sharded run's checkpoints (code without the "
                                                "flag: full only)", choices=["full", "sharded"])
    pythonpath: str | None = setting(None, "--fsdp-memory: put this directory first on the measured commands' "
                                           "PYTHONPATH (e.g. an old commit's src/, to measure that code); the "
                                           "harness itself runs this code")


@dataclass
class BenchConfig(MemoryCheckSettings):
    """directpo against TRL's DPOTrainer, same model and pairs"""

    model: str = setting(None, "model (hub id or local dir) both systems train", required=True, input=True)
    data: str = setting(None, "preference data (any format `train` reads)", required=True, input=True)
    batch: int = setting(8, "pairs per optimizer step (one micro-batch)")
    micro_batch: int = setting(0, "directpo: pairs per forward/backward, accumulated to --batch (0: one "
                                  "micro-batch); smaller lowers peak memory, the optimizer step is the same", ge=0)
    max_length: int = setting(512, "max prompt + response tokens", ge=2)
    steps: int = setting(10, "timed optimizer steps (after one warm-up step)")
    rounds: int = setting(2, "rounds of alternating runs; figures are medians")
    systems: str = setting("directpo,trl", "comma-separated: directpo, trl (or none)")
    out: str | None = setting(None, "write everything as JSON here")
    threads: int = setting(0, "torch CPU threads in every run (0: torch's default)", ge=0)
    device: str | None = setting(None, "cpu or cuda (default: cuda when available)")
    vocab_sweep: str | None = setting(None, "comma-separated vocabulary sizes: directpo fp32 peak RSS of a "
                                            "random-init copy at each")
    memory_budget: str | None = setting(None, "directpo runs pick their micro-batch for this memory, e.g. 8GiB; the "
                                              "plan is printed")
    data_split: str | None = setting(None, "split name for `datasets` sources")
    keep_work: bool = setting(False, "keep the temporary work dir (specs, logs)", switch="--keep-work")

    def validate(self) -> "BenchConfig":
        """Required settings and ranges; --batch, --steps, --rounds, --lora-r and --nproc are checked by
        the measurement that uses them, with what they mean there."""
        check_settings(self)
        if self.plan_check and self.fsdp_memory:
            raise ConfigError("--plan-check and --fsdp-memory are two separate measurements: give one")
        return self
