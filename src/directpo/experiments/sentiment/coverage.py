"""The end of stage 7: every method's frontier must cover the KL range the others reach (the rule of
`budgets`, for every method in `cover_methods`, not only DPO).

A comparison of frontiers only means something where both methods have points. How far a run goes
in KL depends on its strength setting, the learning rate, the steps and the seed (the same preset
reached KL 8.5 with one seed and 4.2 with another). So once every run is evaluated, a method whose
largest KL is below `dpo_cover` × the largest KL of the other covered methods trains its furthest
run on, one checkpoint interval at a time, each new final model evaluated as a point:

  * a preference run (DPO, Unlikelihood) until it covers the range or reaches its cap
    (`dpo_max_steps`, default 3 × its steps); its learning rate is constant after warm-up and its
    batches are a function of the step, so this is exactly a longer run;
  * a PPO-type run until it covers the range, its ground-truth reward plateaus, or it has spent the
    training FLOPs of DPO's furthest run (`budgets.ppo_action`).

PPO-type methods go first, then the preference methods against the updated range. Every step is
resumable like the rest: a finished extension is skipped, a killed one continues from its last
checkpoint, a measured point is read back.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ...console import log
from .budgets import PPO_TYPE, coverage_decisions, ppo_action, step_flops
from .config import SentimentConfig
from .evaluation import eval_point
from .runs import Run, save_interval, train_ppo_run, train_preference_run

BASELINES = ("ppo", "ppo_gt")


def cover_kl_range(cfg: SentimentConfig, out: Path, sft: str, scorer, runs: list[Run], points: list[dict]) -> list[dict]:
    """The new points of every covered method that fell short (none when all cover the range)."""
    covered = cfg.cover_list()  # compared with each other; those this study runs are trained on
    trained = [m for m in covered if cfg.runs_method(m)]
    order = [m for m in trained if m in PPO_TYPE] + [m for m in trained if m not in PPO_TYPE]
    new: list[dict] = []
    for method in order:
        new += cover_method(cfg, out, sft, scorer, runs, points + new, method, covered)
    return new


def cover_method(cfg: SentimentConfig, out: Path, sft: str, scorer, runs: list[Run], points: list[dict], method: str,
                 covered: list[str]) -> list[dict]:
    """Train `method`'s furthest run on while the rule says so; its new points."""
    decision = coverage_decisions(points, cfg.dpo_cover, compared=covered).get(method)
    finals = [p for p in points if p["method"] == method and any(
        r.method == method and r.knob == p["knob"] and r.steps == p["step"] for r in runs)]
    if not decision or not decision["short"] or not finals:
        return []
    far = max(finals, key=lambda p: p["kl"])
    run = next(r for r in runs if r.method == method and r.knob == far["knob"])
    every = save_interval(run.steps, cfg.eval_points)
    cap = cfg.dpo_max_steps or 3 * run.steps
    flop_budget = step_flops(cfg, "dpo") * max([p["step"] for p in points if p["method"] == "dpo"] or [cfg.dpo_steps])
    log(f"sentiment: {method} reaches KL {decision['reach']:.2f}, below the others' {decision['target']:.2f}: "
        f"training {run.name} on, {every} steps at a time")
    trajectory = sorted((p for p in points if p["method"] == method and p["knob"] == run.knob), key=lambda p: p["step"])
    new, steps, reached, why = [], run.steps, decision["reach"], "covers"
    while reached < decision["target"]:
        if method in PPO_TYPE:
            why = ppo_action({**decision, "short": True}, [p["reward"] for p in trajectory],
                             [p["reward_se"] or 0.0 for p in trajectory], step_flops(cfg, method) * steps, flop_budget)
            if why != "train on":
                break
        elif steps + every > cap:
            why = f"cap (step {steps})"
            break
        steps += every
        extend_run(cfg, out, sft, run, steps, scorer)
        point = eval_point(cfg, out, sft, scorer, method, run.knob, steps, str(out / "runs" / run.name))
        new.append(point)
        trajectory.append(point)
        reached = max(reached, point["kl"])
    log(f"sentiment: {method} now reaches KL {reached:.2f}: "
        f"{'covers the range' if reached >= decision['target'] else 'stops short: ' + why}")
    return new


def coverage_target(cfg: SentimentConfig, points: list[dict]) -> float | None:
    """`dpo_cover` × the largest KL of PPO and PPO-GT (None: off, or no baseline point)."""
    kls = [p["kl"] for p in points if p["method"] in BASELINES]
    return cfg.dpo_cover * max(kls) if cfg.dpo_cover and kls else None


def extend_run(cfg: SentimentConfig, out: Path, sft: str, run: Run, steps: int, scorer=None) -> None:
    """Train `run` on to `steps` (its saved checkpoints and settings, a larger max_steps, the same
    checkpoint interval); nothing when its directory already holds a run finished at `steps` or later."""
    from ...training.run import COMPLETE_MARKER

    marker = out / "runs" / run.name / COMPLETE_MARKER
    done = finished_step(marker)
    if done >= steps:
        return
    marker.unlink(missing_ok=True)  # unfinished until it reaches `steps` (then written again)
    every = save_interval(run.steps, cfg.eval_points)
    if run.method in PPO_TYPE:
        train_ppo_run(cfg, out, sft, replace(run, steps=steps), scorer, every=every)
    else:
        train_preference_run(cfg, out, sft, replace(run, steps=steps), save_every=every)


def finished_step(marker: Path) -> int:
    """The step a finished run's completion marker records (0: none)."""
    if not marker.exists():
        return 0
    return int((json.loads(marker.read_text()).get("train") or {}).get("step", 0))
