"""PPO settings: one dataclass, each field a `directpo ppo` flag (and a YAML key of `--config`)."""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..train.config import _f


@dataclass
class PPOConfig:
    model: str = _f(None, "policy to start from (and πref, unless --ref): hub id or local directory", required=True)
    prompts: str = _f(None, "prompts: JSONL with a 'prompt' field, or any preference file directpo reads",
                      required=True)
    output_dir: str = _f(None, "where the policy, tokenizer, value head and metrics.jsonl go", required=True)
    reward_model: str | None = _f(None, "reward model directory (`directpo rm` output)")
    reward_fn: str | None = _f(None, "reward callable 'module:function' (f(prompt, completion) -> float)")
    ref: str | None = _f(None, "reference model πref of the KL penalty (default: the starting policy)")
    kl_coef: float = _f(0.1, "β of the KL penalty r − β·(log πθ − log πref) (initial value with --adaptive-kl)")
    adaptive_kl: bool = _f(False, "adapt β so that the KL tracks --target-kl (Ziegler et al., 2019)")
    target_kl: float = _f(6.0, "target sequence-level KL (nats) of the adaptive controller")
    kl_horizon: int = _f(10000, "horizon (rollouts) of the adaptive KL controller")
    lr: float = _f(1e-5, "learning rate")
    optimizer: str = _f("adamw", "optimizer", choices=["rmsprop", "adamw"])
    weight_decay: float = _f(0.0, "weight decay (adamw)")
    batch_size: int = _f(64, "rollouts (prompts, one completion each) per PPO step")
    mini_batch_size: int = _f(16, "rollouts per gradient step")
    ppo_epochs: int = _f(4, "optimisation passes over each batch of rollouts")
    max_steps: int = _f(100, "PPO steps (rollout batches)")
    max_new_tokens: int = _f(64, "max tokens per completion")
    max_prompt_length: int | None = _f(None, "max prompt tokens; longer prompts are cut from the left")
    generation_batch_size: int = _f(0, "completions generated at once (0: the whole rollout batch)")
    gamma: float = _f(1.0, "discount γ of GAE")
    lam: float = _f(0.95, "λ of GAE")
    cliprange: float = _f(0.2, "ε of the clipped policy ratio")
    cliprange_value: float = _f(0.2, "clip of the value update around the rollout's values")
    vf_coef: float = _f(0.1, "weight of the value loss")
    whiten_advantages: bool = _f(True, "normalise advantages to mean 0, variance 1 over each batch")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (0: no clipping)")
    warmup_steps: int = _f(0, "linear learning-rate warm-up over this many optimizer steps")
    on_invalid: str = _f("error", "bad prompt rows: stop with an error naming file/row/field, or skip them",
                         choices=["error", "skip"])
    data_split: str | None = _f(None, "split name for `datasets` sources (default: train)")
    seed: int = _f(0, "seed: prompt order, sampling, mini-batch order")
    precision: str = _f("fp32", "bf16: autocast matmuls to bfloat16", choices=["fp32", "bf16"])
    device: str | None = _f(None, "cpu or cuda (default: cuda when available)")
    threads: int = _f(0, "CPU threads for torch (0: torch's default)")
    snapshot_every: int = _f(0, "also save the policy (HF format) every N steps to OUTPUT/snapshots/step-N, to "
                                "evaluate a run at several points (0: never)")
    log_every: int = _f(1, "print a metrics line every N steps (metrics.jsonl always gets every step)")
    overwrite: bool = _f(False, "allow writing into an output directory that already holds a run")
    progress: bool = _f(True, "show a progress bar")

    def validate(self) -> "PPOConfig":
        missing = [f.name for f in fields(self) if f.metadata.get("required") and getattr(self, f.name) is None]
        if missing:
            raise ValueError("missing required setting(s): " + ", ".join("--" + m.replace("_", "-") for m in missing))
        for name in ("batch_size", "mini_batch_size", "ppo_epochs", "max_steps", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1")
        if self.kl_coef < 0 or self.target_kl <= 0 or self.cliprange <= 0:
            raise ValueError("kl_coef must be ≥ 0, target_kl and cliprange > 0")
        return self
