"""The end of stage 7: DPO's frontier must cover the KL range the baselines reach.

A comparison of frontiers only means something where both methods have points. How far a DPO run
goes in KL depends on β, the learning rate, the steps and the seed (the same preset reached KL
8.5 with one seed and 4.2 with another), while PPO's range is set by its KL coefficient. So once
every run is evaluated, if DPO's largest KL is below `dpo_cover` × the largest KL of PPO and
PPO-GT, the DPO run whose final point went furthest trains on, one checkpoint interval at a time
(its learning rate is constant after warm-up and its batches are a function of the step, so this
is exactly a longer run), each new final model evaluated as a point, until it covers the range
or reaches `dpo_max_steps`. Every step is resumable like the rest: a finished extension is
skipped, a killed one continues from its last checkpoint, a measured point is read back.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ...console import log
from .config import SentimentConfig
from .evaluation import eval_point
from .runs import Run, save_interval, train_preference_run

BASELINES = ("ppo", "ppo_gt")


def cover_kl_range(cfg: SentimentConfig, out: Path, sft: str, scorer, runs: list[Run], points: list[dict]) -> list[dict]:
    """The new DPO points (none when DPO already covers the range, or nothing to cover)."""
    target = coverage_target(cfg, points)
    finals = [p for p in points if p["method"] == "dpo" and any(
        r.method == "dpo" and r.knob == p["knob"] and r.steps == p["step"] for r in runs)]
    if target is None or not finals:
        return []
    reached = max(p["kl"] for p in points if p["method"] == "dpo")
    if reached >= target:
        return []
    far = max(finals, key=lambda p: p["kl"])
    run = next(r for r in runs if r.method == "dpo" and r.knob == far["knob"])
    every = save_interval(run.steps, cfg.eval_points)
    cap = cfg.dpo_max_steps or 3 * run.steps
    log(f"sentiment: DPO reaches KL {reached:.2f}, below {cfg.dpo_cover:g} × the baselines' {target / cfg.dpo_cover:.2f}: "
        f"training {run.name} on, {every} steps at a time (up to step {cap})")
    new, steps = [], run.steps
    while reached < target and steps + every <= cap:
        steps += every
        extend_run(cfg, out, sft, run, steps)
        point = eval_point(cfg, out, sft, scorer, "dpo", run.knob, steps, str(out / "runs" / run.name))
        new.append(point)
        reached = max(reached, point["kl"])
    verdict = "covers" if reached >= target else f"stops short of (at the cap, step {steps})"
    log(f"sentiment: DPO now reaches KL {reached:.2f}: it {verdict} {cfg.dpo_cover:g} × the baselines' range")
    return new


def coverage_target(cfg: SentimentConfig, points: list[dict]) -> float | None:
    """`dpo_cover` × the largest KL of PPO and PPO-GT (None: off, or no baseline point)."""
    kls = [p["kl"] for p in points if p["method"] in BASELINES]
    return cfg.dpo_cover * max(kls) if cfg.dpo_cover and kls else None


def extend_run(cfg: SentimentConfig, out: Path, sft: str, run: Run, steps: int) -> None:
    """Train `run` on to `steps` (its saved checkpoints and settings, a larger max_steps); nothing
    when its directory already holds a run finished at `steps` or later."""
    from ...training.run import COMPLETE_MARKER

    marker = out / "runs" / run.name / COMPLETE_MARKER
    done = (json.loads(marker.read_text()).get("train") or {}).get("step", 0) if marker.exists() else 0
    if done >= steps:
        return
    marker.unlink(missing_ok=True)  # unfinished until it reaches `steps` (then written again)
    train_preference_run(cfg, out, sft, replace(run, steps=steps), save_every=save_interval(run.steps, cfg.eval_points))
