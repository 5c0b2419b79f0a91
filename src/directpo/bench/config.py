"""Settings of `directpo bench`: a dataclass whose fields are its flags and YAML keys (see
`directpo.config`). `run_bench`, `plan_check` and `fsdp_memory` read them as attributes."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, check_settings, setting
from ..training.optim import OPTIMIZERS
from .plan_check import ALLOCATORS
from .wall_time import WALL_COMMANDS, parse_commands


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
class SampleBenchSettings:
    """Sampling speed (instead of the training comparison)"""

    sample: bool = setting(False, "directpo's sampler against transformers' `generate` on --model, prompts from --data "
                                  "(each K times), temperature 1, top-p 1, each run its own process, alternating: "
                                  "tokens/s, samples/s, peak RSS; --out FILE.json also gets FILE.md (the table)",
                           switch="--sample")
    sample_k: str = setting("1,16", "--sample: samples per prompt K, comma-separated (one comparison each)")
    sample_rows: int = setting(64, "--sample: rows sampled per run: the first rows/K prompts of --data, K times each",
                               ge=1)
    sample_batch: int = setting(16, "--sample: rows decoded at once, both systems", ge=1)
    max_new_tokens: int = setting(64, "--sample: new tokens per row at most (prompts cut to --max-length minus "
                                      "this)", ge=1)


@dataclass
class EndToEndSettings:
    """The user's whole command (instead of the timed steps)"""

    end_to_end: bool = setting(False, "time the whole `directpo train` command (import, load, tokenize, reference "
                                      "pass, --steps steps, save) against TRL's equivalent script, same pairs and "
                                      "settings, each its own process, alternating for --rounds: the seconds of each "
                                      "phase; --out FILE.json also gets FILE.md (the table)", switch="--end-to-end")
    end_to_end_pairs: int = setting(0, "--end-to-end: the first N usable pairs of --data (0: all of them); "
                                       "--steps 0 trains one epoch over them", ge=0)


@dataclass
class VisionBenchSettings:
    """Vision-language pairs (instead of text pairs)"""

    vision: bool = setting(False, "directpo against TRL's DPOTrainer (with the processor) on image pairs: a tiny "
                                  "Qwen2-VL built on the spot (or --model, a vision-language model) and colour "
                                  "pictures made on the spot (or --data, TRL's vision format), each run its own "
                                  "process, alternating: pairs/s, peak RSS and RSS above the import baseline; "
                                  "--out FILE.json also gets FILE.md (the table)", switch="--vision")
    image_size: int = setting(224, "--vision: side in pixels of the pictures made on the spot, and of the image "
                                   "the tiny model's processor resizes to ((side/28)² image tokens)", ge=28)


@dataclass
class WallTimeSettings:
    """Before vs after: the user's sampling-bound commands on two trees of directpo's code"""

    wall_time: bool = setting(False, "time whole sampling-bound commands (--wall-commands) of an older tree of "
                                     "directpo's code (--before REV, checked out in a temporary git worktree) "
                                     "against this checkout's, each its own `python -m directpo` process on the "
                                     "same libraries, alternating for --rounds: wall s, phases, peak RSS; --out "
                                     "FILE.json also gets FILE.md (the table)", switch="--wall-time")
    before: str | None = setting(None, "--wall-time: the git revision of the 'before' tree (e.g. 080cef2), a commit "
                                       "of the repository holding this checkout")
    wall_commands: str = setting(",".join(WALL_COMMANDS), "--wall-time: the commands timed, comma-separated: "
                                 "online (`online --rounds 2` on the first 32 prompts of --data), sentiment-stage "
                                 "(`experiment sentiment`'s sampling stages with --model as πSFT)")
    wall_scale: float = setting(1.0, "--wall-time: the commands' prompt counts × this (online: 32 prompts of --data, "
                                     "sentiment-stage: 64 eval prompts); lower it to fit a time window", gt=0)
    wall_corpus: str | None = setting(None, "--wall-time: the sentiment study's --corpus (default: what the study "
                                            "finds from this checkout: the SST sentences shipped beside it)",
                                      input=True)


@dataclass
class BenchConfig(WallTimeSettings, VisionBenchSettings, EndToEndSettings, SampleBenchSettings, MemoryCheckSettings):
    """directpo against TRL's DPOTrainer, same model and pairs"""

    # Required, except with --vision, which builds both (`validate`).
    model: str = setting(None, "model (hub id or local dir) both systems train (required; --vision: optional)",
                         input=True)
    data: str = setting(None, "preference data (any format `train` reads) (required; --vision: optional)",
                        input=True)
    batch: int = setting(8, "pairs per optimizer step (one micro-batch)")
    micro_batch: int = setting(0, "pairs per forward/backward, accumulated to --batch, both systems (0: one "
                                  "micro-batch); smaller lowers peak memory, the optimizer step is the same", ge=0)
    trl_micro_batch: int = setting(0, "TRL's own micro-batch instead (0: the same as --micro-batch), to show each "
                                      "system at its best; the table gives each run's micro-batch × accumulation",
                                   ge=0)
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
        missing = [flag for flag, value in (("--model", self.model), ("--data", self.data)) if value is None]
        if self.wall_time and "online" not in self.wall_commands:  # only the online command reads --data
            missing = [flag for flag in missing if flag != "--data"]
        if missing and not self.vision:
            raise ConfigError("missing required setting(s): " + ", ".join(missing))
        self._validate_wall_time()
        if self.vision and (self.sample or self.plan_check or self.fsdp_memory or self.end_to_end):
            other = next(f for f, on in (("--sample", self.sample), ("--plan-check", self.plan_check),
                                         ("--fsdp-memory", self.fsdp_memory), ("--end-to-end", self.end_to_end)) if on)
            raise ConfigError(f"--vision and {other} are two separate measurements: give one")
        if self.plan_check and self.fsdp_memory:
            raise ConfigError("--plan-check and --fsdp-memory are two separate measurements: give one")
        if self.sample and (self.plan_check or self.fsdp_memory):
            other = "--plan-check" if self.plan_check else "--fsdp-memory"
            raise ConfigError(f"--sample and {other} are two separate measurements: give one")
        if self.end_to_end and (self.sample or self.plan_check or self.fsdp_memory):
            other = "--sample" if self.sample else "--plan-check" if self.plan_check else "--fsdp-memory"
            raise ConfigError(f"--end-to-end and {other} are two separate measurements: give one")
        return self

    def _validate_wall_time(self) -> None:
        """--wall-time is its own measurement, and needs --before (which means nothing without it)."""
        others = [f for f, on in (("--vision", self.vision), ("--sample", self.sample), ("--end-to-end",
                  self.end_to_end), ("--plan-check", self.plan_check), ("--fsdp-memory", self.fsdp_memory)) if on]
        if self.wall_time and others:
            raise ConfigError(f"--wall-time and {others[0]} are two separate measurements: give one")
        if self.before is not None and not self.wall_time:
            raise ConfigError("--before REV is the 'before' tree of --wall-time: add --wall-time")
        if self.wall_time and not self.before:
            raise ConfigError("--wall-time needs --before REV: the git revision to compare this checkout with")
        if self.wall_time:
            parse_commands(self.wall_commands)  # (unknown or no commands: a one-line error)
