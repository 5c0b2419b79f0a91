"""Stages 2–6, the models: the base LM, Preferred-FT (πSFT), the reward model, the judge, DPO, PPO.

Every trainer run continues a killed run from its last checkpoint and skips a finished one (its
completion marker). Torch and the trainers are imported where they are used: `directpo experiment
dialogue --help` loads neither.
"""
from __future__ import annotations

import math
from pathlib import Path

from ...runfiles import read_metrics
from ..common import continue_run, read_jsonl, shared_run_settings, train_resumable

CHECKPOINTS_PER_RUN = 4  # a killed run loses at most a quarter of its steps


def run_steps(cfg, steps: int, n_train: int) -> int:
    """A run's steps: the given number, else --epochs over the `n_train` training pairs."""
    return steps or max(1, math.ceil(cfg.epochs * math.ceil(n_train / cfg.batch_size)))


def common_settings(cfg, steps: int) -> dict:
    """Settings of every fine-tuning run on the preference pairs (SFT, DPO, reward model)."""
    return dict(optimizer=cfg.optimizer, batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
                max_steps=steps, warmup_steps=min(cfg.warmup_steps, steps // 2),
                save_every=max(1, steps // CHECKPOINTS_PER_RUN), keep_last=1, max_prompt_length=cfg.max_prompt_length,
                **shared_run_settings(cfg))


# ----------------------------------------------------------------------------------------------
# 2. The base model

def stage_base(cfg, out: Path) -> dict:
    """The LM fine-tuned next: --base-model as is, or a small Llama pretrained here on the training
    text (the eval prompts' conversations left out: see `data.pretraining_texts`)."""
    if cfg.base_model:
        return {"base": cfg.base_model, "pretrained_here": False}
    pretrain = out / "data" / "pretrain.jsonl"
    texts = [row["completion"] for row in read_jsonl(pretrain)]
    init = build_initial_model(cfg, out / "init", texts)
    steps = max(1, round(cfg.pretrain_epochs * math.ceil(len(texts) / cfg.pretrain_batch)))
    train_resumable(model=init, data=str(pretrain), output_dir=str(out / "base"), loss="sft", optimizer="adamw",
                    lr=cfg.pretrain_lr, batch_size=cfg.pretrain_batch, micro_batch_size=cfg.pretrain_batch,
                    max_steps=steps, warmup_steps=min(100, steps // 10), save_every=max(1, steps // 4), keep_last=1,
                    **shared_run_settings(cfg))
    return {"base": str(out / "base"), "pretrained_here": True, "steps": steps, "texts": len(texts)}


def build_initial_model(cfg, init_dir: Path, texts: list[str]) -> str:
    """A small random Llama with a BPE tokenizer trained on `texts` (built once)."""
    from ...toy import build_tiny_model

    if not (init_dir / "config.json").exists():
        build_tiny_model(init_dir, texts, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                         vocab_size=cfg.vocab_size, seed=cfg.seed, add_bos=True)
    return str(init_dir)


# ----------------------------------------------------------------------------------------------
# 3–6. Preferred-FT, reward model, DPO, PPO

def stage_sft(cfg, out: Path, base: str, n_train: int) -> dict:
    """πSFT = Preferred-FT: maximum likelihood of the chosen responses of the training pairs."""
    steps = run_steps(cfg, cfg.sft_steps, n_train)
    train_resumable(model=base, data=str(out / "data" / "train.jsonl"), output_dir=str(out / "sft"), loss="sft",
                    lr=cfg.sft_lr, **common_settings(cfg, steps))
    return {"sft": str(out / "sft"), "steps": steps}


def stage_dpo(cfg, out: Path, sft: str, n_train: int) -> dict:
    """DPO from πSFT, with πSFT as πref (the paper's recipe)."""
    steps = run_steps(cfg, cfg.dpo_steps, n_train)
    result = train_resumable(model=sft, ref=sft, data=str(out / "data" / "train.jsonl"), output_dir=str(out / "dpo"),
                             loss="dpo", beta=cfg.beta, lr=cfg.dpo_lr, **common_settings(cfg, steps))
    return {"dpo": str(out / "dpo"), "steps": steps, "train_reward_accuracy": final_metric(result, "rewards/accuracies")}


def final_metric(result: dict, key: str):
    """`key` of a finished run's last training line, when it has one."""
    train = result.get("train") if isinstance(result, dict) else None
    return train.get(key) if isinstance(train, dict) else None


def stage_rm(cfg, out: Path, sft: str, n_train: int) -> dict:
    """A Bradley–Terry reward model on the policies' training pairs (from πSFT), with its accuracy on
    the held-out pairs: how often it agrees with the human label on prompts it never saw. Best-of-N's
    picker and PPO's reward (part of those methods, as in the paper); the judge only without a split
    of its own (--judge-fraction 0)."""
    steps = run_steps(cfg, cfg.rm_steps, n_train)
    return {"rm": str(out / "rm"), "steps": steps,
            "heldout_accuracy": train_bradley_terry(cfg, sft, out / "data" / "train.jsonl", out, out / "rm", steps,
                                                    cfg.rm_lr)}


def stage_judge(cfg, out: Path, base: str, sft: str, n_judge: int) -> dict:
    """The judge: a Bradley–Terry reward model on the judge's own pairs (prompts disjoint from the
    policies' and the eval prompts; see `data.split_judge`), started from the base LM (or πSFT, with
    --judge-init sft), with its held-out accuracy on the eval prompts' pairs."""
    steps = run_steps(cfg, cfg.judge_steps, n_judge)
    init = base if cfg.judge_init == "base" else sft
    return {"judge": str(out / "judge"), "steps": steps, "pairs": n_judge, "init": cfg.judge_init,
            "heldout_accuracy": train_bradley_terry(cfg, init, out / "data" / "judge.jsonl", out, out / "judge", steps,
                                                    cfg.judge_lr)}


def train_bradley_terry(cfg, init: str, data: Path, out: Path, rm_dir: Path, steps: int, lr: float) -> float | None:
    """Train (or finish) a reward model in `rm_dir`; its last held-out pair accuracy on OUT/data/eval.jsonl."""
    from ...rlhf.config import RewardModelConfig
    from ...rlhf.reward_model import train_reward_model
    from ...training.run import is_complete

    if not is_complete(rm_dir):
        train_reward_model(RewardModelConfig(
            model=init, data=str(data), eval_data=str(out / "data" / "eval.jsonl"), output_dir=str(rm_dir), lr=lr,
            **continue_run(rm_dir), **common_settings(cfg, steps)))
    evals = read_metrics(rm_dir, split="eval")
    return evals[-1].get("accuracy") if evals else None


def stage_ppo(cfg, out: Path, sft: str, rm: str) -> dict:
    """PPO from πSFT against the learned reward model, KL-penalised to πSFT (eq. 3), on the training prompts."""
    from ...rlhf.config import PPOConfig
    from ...rlhf.ppo import ppo
    from ...training.run import is_complete

    run_dir = out / "ppo"
    if not is_complete(run_dir):
        ppo(PPOConfig(model=sft, prompts=str(out / "data" / "train.jsonl"), output_dir=str(run_dir), reward_model=rm,
                      kl_coef=cfg.ppo_kl_coef, lr=cfg.ppo_lr, batch_size=cfg.ppo_batch,
                      mini_batch_size=cfg.ppo_mini_batch, ppo_epochs=cfg.ppo_epochs, max_steps=cfg.ppo_steps,
                      max_new_tokens=cfg.max_new_tokens, max_prompt_length=cfg.max_prompt_length,
                      generation_batch_size=cfg.eval_batch, save_every=max(1, cfg.ppo_steps // CHECKPOINTS_PER_RUN),
                      keep_last=1, **continue_run(run_dir), **{k: v for k, v in shared_run_settings(cfg).items()
                                                        if k != "max_length"}))
    return {"ppo": str(run_dir), "steps": cfg.ppo_steps}
