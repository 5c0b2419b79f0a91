"""Training configuration: one dataclass, each field with its help text.

The CLI turns every field into a flag (`max_prompt_length` -> `--max-prompt-length`), and a YAML
`--config FILE` may set the same keys; flags given on the command line win over the file.
Defaults are the paper's (appendix B): β = 0.1, batch 64, RMSprop at lr 1e-6, 150 warm-up steps.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    model: str = _f(None, "policy to train: a Hugging Face model id or local directory", required=True)
    data: str = _f(None, "preference data: .jsonl/.json/.parquet file, or a `datasets` name/dir", required=True)
    output_dir: str = _f(None, "where the final model, tokenizer and metrics.jsonl go", required=True)
    ref: str | None = _f(None, "reference model πref (default: a frozen copy of the starting policy)")
    loss: str = _f("dpo", "loss: dpo, cdpo, ipo, hinge, reference_free, plackett_luce (rankings), sft, "
                          "unlikelihood (see directpo.losses.LOSSES)")
    beta: float = _f(0.1, "β: strength of the implicit KL penalty (paper default 0.1)")
    label_smoothing: float = _f(0.0, "ε of conservative DPO: probability that a preference label is flipped")
    sft_weight: float = _f(0.0, "add this × the NLL per token of the best response to the loss (RPO-style)")
    unlikelihood_weight: float = _f(1.0, "α of the unlikelihood loss: weight of the rejected-token term")
    ranking_to_pairs: bool = _f(False, "expand ranked rows (K > 2) into pairs for pairwise losses")
    ranking_pairs: str = _f("all", "with ranking_to_pairs: every (better, worse) pair, or only best vs worst",
                            choices=["all", "best_worst"])
    lr: float = _f(1e-6, "peak learning rate (paper: 1e-6)")
    optimizer: str = _f("rmsprop", "optimizer (paper: rmsprop)", choices=["rmsprop", "adamw"])
    weight_decay: float = _f(0.0, "weight decay (adamw)")
    batch_size: int = _f(64, "preference pairs per optimizer step (paper: 64)")
    micro_batch_size: int = _f(8, "pairs per forward/backward; batch_size/micro_batch_size steps are accumulated")
    micro_batch_tokens: int = _f(0, "instead: fill each forward/backward with examples up to this many tokens "
                                    "(bounds activation memory whatever the lengths; 0: off)")
    max_steps: int | None = _f(None, "optimizer steps to run (overrides epochs)")
    epochs: float = _f(1.0, "passes over the training data, when max_steps is not set")
    warmup_steps: int = _f(150, "linear learning-rate warm-up from 0 (paper: 150)")
    max_grad_norm: float = _f(10.0, "clip the gradient norm to this (0: no clipping)")
    max_length: int | None = _f(512, "max tokens of prompt + response; responses are cut from the right")
    max_prompt_length: int | None = _f(None, "max prompt tokens; longer prompts are cut from the left")
    eval_data: str | None = _f(None, "held-out preference data for periodic evaluation")
    eval_every: int = _f(0, "evaluate every N optimizer steps (0: only at the end, when eval_data is set)")
    seed: int = _f(0, "seed for initialisation-independent randomness: data order")
    precompute_ref: bool = _f(True, "compute reference log-probs once before training (cached on disk) and free the "
                                    "reference model; --no-precompute-ref runs the reference live at every step")
    ref_cache: str = _f("auto", "where reference log-prob tables are cached: auto (~/.cache/directpo, or "
                                "$DIRECTPO_CACHE), off, or a directory")
    on_invalid: str = _f("error", "bad rows: stop with an error naming file/row/field, or skip them (counted)",
                         choices=["error", "skip"])
    data_split: str | None = _f(None, "split name for `datasets` sources (default: train)")
    layout: str = _f("packed", "packed: each prompt computed once for all its responses, several examples per row "
                               "(exact); padded: one padded row per prompt+response", choices=["packed", "padded"])
    row_tokens: int = _f(0, "packed layout: tokens per row (0: the whole micro-batch in one unpadded row when the "
                             "model attends segment by segment, else rows as long as its longest example)")
    precision: str = _f("fp32", "bf16: autocast matmuls to bfloat16 (fp32 master weights and loss)",
                        choices=["fp32", "bf16"])
    device: str | None = _f(None, "cpu or cuda (default: cuda when available)")
    nproc: int = _f(0, "launch N data-parallel processes with torchrun (same global batch; gloo on CPU, NCCL on GPU)")
    fsdp: bool = _f(False, "with several processes: shard the model with FSDP2 (fully_shard) instead of "
                           "replicating it")
    threads: int = _f(0, "CPU threads for torch (0: torch's default)")
    log_every: int = _f(1, "print a metrics line every N steps (metrics.jsonl always gets every step)")
    overwrite: bool = _f(False, "allow writing into an output directory that already holds a run")
    lora_r: int = _f(0, "LoRA rank (0: full fine-tuning); the reference is the model with adapters disabled")
    lora_alpha: float = _f(16.0, "LoRA scaling α")
    lora_dropout: float = _f(0.0, "dropout on the LoRA path")
    lora_target_modules: str = _f("all-linear", "modules to adapt: all-linear, or a comma list (q_proj,v_proj)")
    merge: bool = _f(False, "with LoRA: save the merged full model instead of the adapters")
    save_every: int = _f(0, "write a checkpoint (weights, optimizer, scheduler, RNG) every N steps (0: never)")
    keep_last: int = _f(0, "keep only the newest K checkpoints (0: keep all)")
    resume: str | None = _f(None, "continue from the latest checkpoint in output_dir (--resume), or from PATH",
                            nargs="?", const="latest")
    skip_nonfinite: bool = _f(False, "skip (and count) steps whose loss or gradient is NaN/inf instead of stopping")
    trust_remote_code: bool = _f(False, "allow model/tokenizer repos to run their own Python code (off: safer)")
    progress: bool = _f(True, "show a progress bar with ETA")

    def validate(self) -> "TrainConfig":
        missing = [f.name for f in fields(self) if f.metadata.get("required") and getattr(self, f.name) is None]
        if missing:
            raise ValueError("missing required setting(s): " + ", ".join("--" + m.replace("_", "-") for m in missing))
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("batch_size and micro_batch_size must be ≥ 1")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                             f"({self.micro_batch_size})")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError("max_prompt_length must be ≥ 1")
        from ..losses import get_loss

        get_loss(self.loss)
        if self.beta <= 0:
            raise ValueError("beta must be > 0")
        if self.max_length is not None and self.max_prompt_length is not None and \
                self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        return self


def config_fields(cls=TrainConfig):
    """(name, type, default, metadata) of a config dataclass, for building CLI flags."""
    for f in fields(cls):
        default = None if f.default is MISSING else f.default
        yield f.name, f.type, default, f.metadata
