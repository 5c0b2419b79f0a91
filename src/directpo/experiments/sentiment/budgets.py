"""Equal budgets by rule: what each method was given (settings, steps, FLOPs) and which must train on.

The rule, the same for every method (not only DPO, as `--dpo-cover` alone was):
  * coverage: a method whose largest KL falls short of `cover` × the largest KL of the other methods
    it is compared with is trained on (its furthest run, one checkpoint interval at a time);
  * a PPO-type run trains on until its ground-truth reward plateaus (the last checkpoint's gain is
    within 2 s.e. of zero) or it has spent as many training FLOPs as DPO's run (the furthest one);
  * every method gets the same number of strength settings (β, KL coefficients, α), reported.

FLOPs are estimates, ≈ 2·N per token of a forward pass and 4·N more of a backward one (N: the
policy's parameters, without the embeddings' lookups), counted on padded lengths (prompt_max_tokens +
max_new_tokens); a PPO step is one generation, the reference, value and (PPO) reward-model forwards
and `ppo_epochs` updates; a DPO step the policy's forward and backward and πref's forward on both
responses. They compare methods; they are not a measurement.
"""
from __future__ import annotations

import math

from .config import SentimentConfig, parse_numbers

PPO_TYPE = ("ppo", "ppo_gt")
KNOBS = {"dpo": "dpo_betas", "unlikelihood": "ul_weights", "ppo": "ppo_kl_coefs", "ppo_gt": "ppo_gt_kl_coefs"}


def model_params(cfg: SentimentConfig) -> float:
    """Parameters of the from-scratch Llama (attention 4·h², MLP 3·h·4h per layer; untied embeddings
    count once: the output layer is a matmul, the input one a lookup)."""
    return cfg.layers * (4 + 12) * cfg.hidden ** 2 + cfg.vocab_size * cfg.hidden


def step_flops(cfg: SentimentConfig, method: str) -> float:
    """Training FLOPs of one optimizer step (PPO: one rollout batch with its updates) of `method`."""
    n, seq = model_params(cfg), cfg.prompt_max_tokens + cfg.max_new_tokens
    if method in PPO_TYPE:
        tokens = cfg.ppo_batch * seq
        generate = 2 * n * cfg.ppo_batch * cfg.max_new_tokens
        forwards = 2 * n * tokens * (3 if method == "ppo" else 2)  # πref, value (and the reward model)
        return generate + forwards + cfg.ppo_epochs * 6 * n * tokens
    responses = 1 if method == "preferred_ft" else 2
    tokens = cfg.batch_size * responses * seq
    return 6 * n * tokens + (2 * n * tokens if method == "dpo" else 0)  # DPO: πref's forward too


def method_budgets(cfg: SentimentConfig, points: list[dict]) -> dict:
    """Per method: its strength settings, the steps its runs reached (from the points) and the training
    FLOPs of its furthest run, and the total over its runs."""
    out = {}
    for m in sorted({p["method"] for p in points} - {"sft", "best_of_n", "online_dpo"}):
        steps = {}
        for p in points:
            if p["method"] == m:
                steps[p["knob"]] = max(steps.get(p["knob"], 0), int(p["step"]))
        per_step = step_flops(cfg, m)
        out[m] = {"settings": sorted(steps, key=lambda k: (k is None, k)), "steps": steps,
                  "flops_max_run": per_step * max(steps.values()), "flops_total": per_step * sum(steps.values())}
    return out


def settings_counts(cfg: SentimentConfig) -> dict:
    """How many strength settings each method that has one is given (the rule: the same number)."""
    return {m: len(parse_numbers(getattr(cfg, name), name)) for m, name in KNOBS.items() if cfg.runs_method(m)}


def coverage_decisions(points: list[dict], cover: float = 1.0, compared=None) -> dict:
    """Per method: its largest KL (`reach`), the target (`cover` × the largest KL of the other compared
    methods) and whether it must train on (`short`). πSFT and Best-of-N (no training) are not decided."""
    reach = {}
    for p in points:
        if p["method"] not in ("sft", "best_of_n"):
            reach[p["method"]] = max(reach.get(p["method"], 0.0), max(p["kl"], 0.0))
    compared = set(compared or reach)
    out = {}
    for m, r in reach.items():
        others = [reach[o] for o in compared if o != m and o in reach]
        target = cover * max(others) if others and cover > 0 else None
        out[m] = {"reach": r, "target": target, "short": target is not None and r < target}
    return out


def plateaued(rewards: list[float], ses: list[float]) -> bool:
    """Has a run's ground-truth reward stopped rising? Its last checkpoint's gain over the one before is
    within 2 s.e. of the difference (or negative). One checkpoint: not known, so no."""
    if len(rewards) < 2:
        return False
    return rewards[-1] - rewards[-2] <= 2 * math.hypot(ses[-1], ses[-2])


def ppo_action(decision: dict, rewards: list[float], ses: list[float], flops_spent: float, flop_budget: float) -> str:
    """The rule for a PPO-type run: 'covers' (nothing to do), 'train on', or why it stops short:
    'plateau' (its reward stopped rising) or 'FLOP budget' (it has spent what DPO's run did)."""
    if not decision["short"]:
        return "covers"
    if plateaued(rewards, ses):
        return "plateau"
    if flops_spent >= flop_budget:
        return "FLOP budget"
    return "train on"


def budget_lines(cfg: SentimentConfig, points: list[dict]) -> list[str]:
    """The report's table: each method's settings, steps per setting, and FLOPs."""
    budgets = method_budgets(cfg, points)
    lines = ["| method | settings | steps reached per setting | FLOPs, furthest run | FLOPs, all runs |",
             "|---|---|---|---|---|"]
    for m, b in budgets.items():
        knobs = ", ".join("—" if k is None else f"{k:g}" for k in b["settings"])
        steps = ", ".join(str(b["steps"][k]) for k in b["settings"])
        lines.append(f"| {m} | {len(b['settings'])} ({knobs}) | {steps} | {b['flops_max_run']:.2e} | "
                     f"{b['flops_total']:.2e} |")
    return lines
