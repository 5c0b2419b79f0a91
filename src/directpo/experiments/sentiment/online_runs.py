"""Online (iterative) DPO as a method of the study (`--methods ...,online_dpo`): offline DPO against
the same thing done in rounds.

Offline DPO learns once from pairs of πSFT's samples. Online DPO (`directpo online`) samples
`online_samples` completions per train prompt from the *current* policy each round, labels them
with the same ground truth, pairs best vs worst, and trains DPO from that policy (πref: the round's
start, or πSFT). Each round's policy is a point of the frontier, evaluated by the same
`eval_point` as every other method (same eval prompts, samples, seed), so the two are compared at
matched KL by the report's frontier comparison. Best-vs-worst keeps the training budget close to
offline DPO's (≤ one pair per prompt and round: about as many steps over 3 rounds as one offline
run); what online DPO spends more of is labels and sampling, which the cost table reports.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .config import SentimentConfig
from .evaluation import eval_point

METHOD = "online_dpo"


def run_online_dpo(cfg: SentimentConfig, out: Path, sft: str, scorer) -> tuple[list[dict], dict]:
    """Train the rounds (resumable: `directpo online` records every stage) and evaluate each round's
    policy: the points, one per round (step = the round), and what the rounds cost."""
    from ...rlhf.online import OnlineConfig, run_online

    run_dir = out / "runs" / f"{METHOD}_{cfg.online_beta:g}"
    result = run_online(OnlineConfig(
        model=sft, prompts=str(out / "prompts" / "train.jsonl"), output_dir=str(run_dir),
        rounds=cfg.online_rounds, samples_per_prompt=cfg.online_samples, pairs="best_worst",
        ref=cfg.online_ref, beta=cfg.online_beta, lr=cfg.dpo_lr, optimizer=cfg.optimizer,
        batch_size=cfg.batch_size, micro_batch_size=cfg.batch_size, warmup_steps=cfg.warmup_steps,
        max_new_tokens=cfg.max_new_tokens, sample_batch_size=cfg.eval_batch,
        # the rounds' own evaluation is only their log line (one sample per prompt); the points
        # below are measured like every other method's
        eval_prompts=str(out / "prompts" / "eval.jsonl"), eval_samples=1, max_length=cfg.max_length,
        seed=cfg.seed, device=cfg.device, threads=cfg.threads, progress=cfg.progress, overwrite=False,
        fixed_length=cfg.fixed_length),
        scorer=scorer)
    points = [eval_point(cfg, out, sft, scorer, METHOD, cfg.online_beta, r, str(run_dir / f"round-{r}" / "policy"))
              for r in range(1, cfg.online_rounds + 1)]
    return points, online_cost(cfg, out, run_dir, result["rounds"])


def online_cost(cfg: SentimentConfig, out: Path, run_dir: Path, rounds: list[dict]) -> dict:
    """What the rounds spent: labelled samples, pairs, optimizer steps, and minutes of sampling +
    labelling and of training (evaluation left out), as each round's stages recorded them."""
    trained = [line for line in rounds if line["round"] > 0]

    def minutes(name: str) -> float:
        return sum(json.loads((run_dir / f"round-{line['round']}" / name).read_text())["seconds"]
                   for line in trained) / 60

    return {"labelled_samples": len(trained) * count_lines(out / "prompts" / "train.jsonl") * cfg.online_samples,
            "pairs": sum(line["pairs"] for line in trained),
            "steps": sum(math.ceil(line["pairs"] / cfg.batch_size) for line in trained),
            "sampling_minutes": minutes("pairs.done.json"), "training_minutes": minutes("train.done.json")}


def offline_cost(cfg: SentimentConfig, out: Path) -> dict:
    """The same for the offline DPO run at the online β: πSFT's labelled samples (shared by every
    offline run), the run's pairs, steps and training time (its trainer's record)."""
    sampling = json.loads((out / "pairs" / "done.json").read_text()).get("seconds")
    done = out / "runs" / f"dpo_{cfg.online_beta:g}" / "run_complete.json"
    train = (json.loads(done.read_text()).get("train") or {}).get("elapsed_s") if done.exists() else None
    return {"labelled_samples": count_lines(out / "prompts" / "train.jsonl") * cfg.samples_per_prompt,
            "pairs": count_lines(out / "pairs" / "train.jsonl"), "steps": cfg.dpo_steps,
            "sampling_minutes": None if sampling is None else sampling / 60,
            "training_minutes": None if train is None else train / 60}


def count_lines(path: Path) -> int:
    with open(path) as f:
        return sum(1 for line in f if line.strip())


