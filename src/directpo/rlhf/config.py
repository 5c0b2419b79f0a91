"""Settings of `directpo rm` and `directpo ppo`: dataclasses whose fields are their flags (and YAML keys)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import FixedLengthSettings, setting
from ..training.config import LoraSettings, PreferenceRunConfig, RunConfig
from ..training.optim import OPTIMIZERS


@dataclass
class RewardModelConfig(PreferenceRunConfig):
    """Bradley–Terry reward model: the LM with a scalar head, trained on preference pairs"""

    model: str = setting(None, "the model to put a reward head on (usually the SFT model): hub id or local directory",
                        required=True, input=True)
    output_dir: str = setting(None, "where the reward model, tokenizer and metrics.jsonl go", required=True, resumable=True)


@dataclass
class PPOConfig(RunConfig, LoraSettings, FixedLengthSettings):
    """PPO: rollouts, rewards, the KL penalty"""

    model: str = setting(None, "policy to start from (and πref, unless --ref): hub id or local directory", required=True,
                         input=True)
    prompts: str = setting(None, "prompts: JSONL with a 'prompt' field, or any preference file directpo reads",
                      required=True, input=True)
    output_dir: str = setting(None, "where the policy, tokenizer, value head and metrics.jsonl go", required=True, resumable=True)
    reward_model: str | None = setting(None, "reward model directory (`directpo rm` output)", input=True)
    reward_fn: str | None = setting(None, "reward callable 'module:function' (f(prompt, completion) -> float)")
    ref: str | None = setting(None, "reference model πref of the KL penalty (default: the starting policy; with "
                                    "--lora-r the policy with its adapters disabled, no second copy)", input=True)
    kl_coef: float = setting(0.1, "β of the KL penalty r − β·(log πθ − log πref) (initial value with --adaptive-kl)", ge=0)
    adaptive_kl: bool = setting(False, "adapt β so that the KL tracks --target-kl (Ziegler et al., 2019)")
    target_kl: float = setting(6.0, "target sequence-level KL (nats) of the adaptive controller", gt=0)
    kl_horizon: int = setting(10000, "horizon (rollouts) of the adaptive KL controller", ge=1)
    lr: float = setting(1e-5, "learning rate", gt=0)
    optimizer: str = setting("adamw", "optimizer", choices=list(OPTIMIZERS))
    batch_size: int = setting(64, "rollouts (prompts, one completion each) per PPO step", ge=1)
    mini_batch_size: int = setting(16, "rollouts per gradient step", ge=1)
    ppo_epochs: int = setting(4, "optimisation passes over each batch of rollouts", ge=1)
    max_steps: int = setting(100, "PPO steps (rollout batches)", ge=1, resumable=True)
    max_new_tokens: int = setting(64, "max tokens per completion", ge=1)
    max_prompt_length: int | None = setting(None, "max prompt tokens; longer prompts are cut from the left", ge=1)
    generation_batch_size: int = setting(0, "completions generated at once (0: the whole rollout batch)", ge=0)
    gamma: float = setting(1.0, "discount γ of GAE", ge=0, le=1)
    lam: float = setting(0.95, "λ of GAE", ge=0, le=1)
    cliprange: float = setting(0.2, "ε of the clipped policy ratio", gt=0)
    cliprange_value: float = setting(0.2, "clip of the value update around the rollout's values", gt=0)
    vf_coef: float = setting(0.1, "weight of the value loss", ge=0)
    whiten_advantages: bool = setting(True, "normalise advantages to mean 0, variance 1 over each batch")
    max_grad_norm: float = setting(1.0, "clip the gradient norm to this (0: no clipping)", ge=0)
    warmup_steps: int = setting(0, "linear learning-rate warm-up over this many optimizer steps", ge=0)
    on_invalid: str = setting("error", "bad prompt rows: stop with an error naming file/row/field, or skip them",
                         choices=["error", "skip"])
    data_split: str | None = setting(None, "split name for `datasets` sources (default: train)")
    snapshot_every: int = setting(0, "also save the policy (HF format) every N steps to OUTPUT/snapshots/step-N, to "
                                "evaluate a run at several points (0: never)", ge=0, resumable=True)

    def validate(self) -> "PPOConfig":
        super().validate()
        self.check_lora_settings()
        return self
