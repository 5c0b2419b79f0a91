"""Stage 7's training: one run per method and knob (DPO β, Unlikelihood α, PPO KL coefficient), each
saving the checkpoints that are evaluated along its trajectory."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...diskio import default_mode
from .config import SentimentConfig, parse_numbers
from ..common import continue_run
from .stages import NO_LOG_LINES, shared_run_settings, train_resumable

PREFERENCE_LOSSES = {"dpo": "dpo", "unlikelihood": "unlikelihood", "preferred_ft": "sft"}


@dataclass
class Run:
    method: str  # dpo, unlikelihood, preferred_ft, ppo, ppo_gt
    knob: float | None  # β, α or the KL coefficient; None for Preferred-FT
    steps: int

    @property
    def name(self) -> str:
        return self.method if self.knob is None else f"{self.method}_{self.knob:g}"


def plan_runs(cfg: SentimentConfig) -> list[Run]:
    runs = [Run("dpo", beta, cfg.dpo_steps) for beta in parse_numbers(cfg.dpo_betas, "dpo_betas")]
    runs += [Run("unlikelihood", alpha, cfg.ul_steps) for alpha in parse_numbers(cfg.ul_weights, "ul_weights")]
    runs += [Run("preferred_ft", None, cfg.pft_steps)]
    runs += [Run("ppo", kl, cfg.ppo_steps) for kl in parse_numbers(cfg.ppo_kl_coefs, "ppo_kl_coefs")]
    runs += [Run("ppo_gt", kl, cfg.ppo_steps) for kl in parse_numbers(cfg.ppo_gt_kl_coefs, "ppo_gt_kl_coefs")]
    return [run for run in runs if cfg.runs_method(run.method)]


def save_interval(steps: int, points: int) -> int:
    """Steps between the saved checkpoints of a run evaluated at `points` points."""
    return max(1, steps // points)


def run_method(cfg: SentimentConfig, out: Path, sft: str, run: Run, scorer) -> None:
    """Train `run` into OUT/runs/NAME (skipped when finished; a killed preference run resumes)."""
    from ...training.run import is_complete

    if run.method in PREFERENCE_LOSSES:
        train_preference_run(cfg, out, sft, run)
    elif not is_complete(out / "runs" / run.name):
        # A killed PPO run continues from its last checkpoint (saved at every snapshot).
        train_ppo_run(cfg, out, sft, run, scorer)


def train_preference_run(cfg: SentimentConfig, out: Path, sft: str, run: Run, save_every: int | None = None) -> dict:
    """`save_every`: the interval between checkpoints (default: `eval_points` over the run's steps)."""
    lr = {"dpo": cfg.dpo_lr, "unlikelihood": cfg.ul_lr, "preferred_ft": cfg.pft_lr}[run.method]
    knob = {"dpo": {"beta": run.knob, "ref": sft}, "unlikelihood": {"unlikelihood_weight": run.knob},
            "preferred_ft": {}}[run.method]
    return train_resumable(model=sft, data=str(out / "pairs" / "train.jsonl"), output_dir=str(out / "runs" / run.name),
                           loss=PREFERENCE_LOSSES[run.method], optimizer=cfg.optimizer, lr=lr,
                           batch_size=cfg.batch_size, micro_batch_size=cfg.batch_size, max_steps=run.steps,
                           warmup_steps=cfg.warmup_steps,
                           save_every=save_every or save_interval(run.steps, cfg.eval_points),
                           fixed_length=cfg.fixed_length, **knob, **shared_run_settings(cfg))


def train_ppo_run(cfg: SentimentConfig, out: Path, sft: str, run: Run, scorer, every: int | None = None) -> dict:
    """PPO against the learned reward model, or (PPO-GT) against the ground-truth scorer itself.
    `every`: the interval between snapshots and checkpoints (default: `eval_points` over the run's steps;
    a run trained on keeps its first one)."""
    every = every or save_interval(run.steps, cfg.eval_points)
    from ...rlhf.config import PPOConfig
    from ...rlhf.ppo import ppo

    reward = scorer if run.method == "ppo_gt" else None
    reward_model = str(out / "rm") if run.method == "ppo" else None
    run_dir = out / "runs" / run.name
    return ppo(PPOConfig(model=sft, prompts=str(out / "prompts" / "train.jsonl"), output_dir=str(run_dir),
                         reward_model=reward_model, kl_coef=run.knob, lr=cfg.ppo_lr, batch_size=cfg.ppo_batch,
                         mini_batch_size=cfg.ppo_mini_batch, ppo_epochs=cfg.ppo_epochs, max_steps=run.steps,
                         max_new_tokens=cfg.max_new_tokens, snapshot_every=every, save_every=every, keep_last=1,
                         **continue_run(run_dir),
                         seed=cfg.seed, precision=cfg.precision, device=cfg.device, threads=cfg.threads,
                         progress=cfg.progress, log_every=NO_LOG_LINES,
                         generation_batch_size=cfg.eval_batch, fixed_length=cfg.fixed_length), reward=reward)


def checkpoints_of(run_dir: Path, run: Run, cfg: SentimentConfig) -> list[tuple[int, Path]]:
    """(step, where its weights are) for the evaluated points of a finished run, the final model last."""
    every = save_interval(run.steps, cfg.eval_points)
    steps = list(range(every, run.steps, every))[-(cfg.eval_points - 1):] if cfg.eval_points > 1 else []
    if run.method.startswith("ppo"):
        saved = [(s, run_dir / "snapshots" / f"step-{s}") for s in steps]
    else:
        saved = [(s, run_dir / "checkpoints" / f"step-{s:08d}") for s in steps]
    return [(s, path) for s, path in saved if path.exists()] + [(run.steps, run_dir)]


def export_checkpoint(checkpoint: Path, base: str, dest: Path) -> Path:
    """A training checkpoint (trainable weights only) as a loadable HF model directory."""
    from safetensors.torch import load_file

    from ...models import load_model, load_tokenizer

    model = load_model(base, "cpu")
    _, unexpected = model.load_state_dict(load_file(str(checkpoint / "model.safetensors")), strict=False)
    if unexpected:
        raise ValueError(f"{checkpoint}: weights {unexpected[:3]} do not belong to {base}")
    model.save_pretrained(dest)
    for f in Path(dest).glob("*.safetensors"):  # safetensors writes 0600
        default_mode(f)
    load_tokenizer(base).save_pretrained(dest)
    return dest
