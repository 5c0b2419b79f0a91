"""Reward–KL frontiers: which method buys more reward for the same divergence from πref (Fig. 2 left).

A point is one evaluated policy: mean ground-truth reward and sequence-level KL(π‖πref), each with
its standard error. A method's frontier is the best reward it reaches within a KL budget,

    f(k) = max { reward_p : p a point of the method (or the shared πSFT start), kl_p ≤ k },

a non-decreasing step function (no interpolation: a point not measured is not claimed). Two
methods are compared on the KL range both cover, [0, K] with K the smaller of their largest KLs, by
the mean frontier height over that range, ∫₀ᴷ f(k) dk / K. Its uncertainty comes from the points'
own: the comparison is redone on draws of every point from N(mean, se²) (rewards and KLs), and the
standard deviation of the difference over the draws is its error bar.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

POINT_FIELDS = ("method", "knob", "step", "kl", "kl_se", "reward", "reward_se", "length", "seed", "reward_lc",
                "reward_lc_se")
BUDGETS = (1.0, 2.0, 4.0, 8.0)  # KL budgets (nats) of the per-budget table; the maximum is added
METHODS = ("dpo", "online_dpo", "ppo", "ppo_gt", "unlikelihood", "preferred_ft", "best_of_n", "sft")
LABELS = {"dpo": "DPO", "online_dpo": "online DPO", "ppo": "PPO (learned RM)", "ppo_gt": "PPO-GT",
          "unlikelihood": "Unlikelihood", "preferred_ft": "Preferred-FT", "best_of_n": "Best-of-N (learned RM)",
          "sft": "πSFT"}
COLORS = {"dpo": "tab:red", "online_dpo": "tab:brown", "ppo": "tab:blue", "ppo_gt": "tab:purple",
          "unlikelihood": "tab:green", "preferred_ft": "tab:orange", "best_of_n": "tab:gray", "sft": "black"}


def frontier_mean(kls: np.ndarray, rewards: np.ndarray, start: float, K: float) -> float:
    """∫₀ᴷ f(k) dk / K for the step frontier through (0, start) and the points (kls, rewards)."""
    if K <= 0:
        return start
    order = np.argsort(kls, kind="stable")
    area, best, prev = 0.0, start, 0.0
    for k, r in zip(np.clip(kls[order], 0.0, None), rewards[order]):
        if k >= K:
            break
        area += best * (k - prev)
        best, prev = max(best, r), k
    return (area + best * (K - prev)) / K


def frontier_at(points: list[dict], k: float, start: float) -> float:
    """f(k): the best reward of `points` at KL ≤ k (the start when none)."""
    return max([start] + [p["reward"] for p in points if max(p["kl"], 0.0) <= k])


def compare_frontiers(a: list[dict], b: list[dict], start: dict, draws: int = 2000, seed: int = 0) -> dict:
    """Mean frontier height of method a minus method b over the KL range both reach."""
    if not a or not b:
        return {}
    K = min(max(max(p["kl"], 0.0) for p in a), max(max(p["kl"], 0.0) for p in b))
    rng = np.random.default_rng(seed)

    def arrays(ps):
        return (np.array([p["kl"] for p in ps]), np.array([_se(p["kl_se"]) for p in ps]),
                np.array([p["reward"] for p in ps]), np.array([_se(p["reward_se"]) for p in ps]))

    (ka, kas, ra, ras), (kb, kbs, rb, rbs) = arrays(a), arrays(b)
    s0, s0se = start["reward"], _se(start["reward_se"])
    diff = frontier_mean(ka, ra, s0, K) - frontier_mean(kb, rb, s0, K)
    sims = []
    for _ in range(draws):
        s = s0 + s0se * rng.standard_normal()
        sims.append(frontier_mean(ka + kas * rng.standard_normal(len(ka)), ra + ras * rng.standard_normal(len(ra)),
                                  s, K)
                    - frontier_mean(kb + kbs * rng.standard_normal(len(kb)), rb + rbs * rng.standard_normal(len(rb)),
                                    s, K))
    se = float(np.std(sims))
    verdict = "dominates" if diff > 2 * se else ("is dominated by" if diff < -2 * se else "ties with")
    return {"kl_range": K, "mean_a": frontier_mean(ka, ra, s0, K), "mean_b": frontier_mean(kb, rb, s0, K),
            "diff": diff, "diff_se": se, "verdict": verdict}


def _se(x) -> float:
    return 0.0 if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def write_points(points: list[dict], out: Path) -> None:
    (out / "points.json").write_text(json.dumps([{k: p.get(k) for k in POINT_FIELDS} for p in points], indent=1))
    with open(out / "points.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=POINT_FIELDS)
        w.writeheader()
        for p in points:
            w.writerow({k: p.get(k) for k in POINT_FIELDS})


def plot_frontier(points: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    start = next((p for p in points if p["method"] == "sft"), None)
    for m in METHODS:
        ps = [p for p in points if p["method"] == m]
        if not ps:
            continue
        ax.errorbar([p["kl"] for p in ps], [p["reward"] for p in ps], xerr=[_se(p["kl_se"]) for p in ps],
                    yerr=[_se(p["reward_se"]) for p in ps], fmt="*" if m == "sft" else "o", ms=9 if m == "sft" else 4,
                    color=COLORS[m], alpha=0.75, capsize=2, lw=0.8, label=LABELS[m])
        if m != "sft" and start is not None:  # the method's frontier: a step line through its best points
            ks = sorted({0.0} | {max(p["kl"], 0.0) for p in ps})
            ax.step(ks, [frontier_at(ps, k, start["reward"]) for k in ks], where="post", color=COLORS[m], lw=1.2,
                    alpha=0.9)
    ax.set_xlabel("KL(π ‖ πref)  (nats, sequence level)")
    ax.set_ylabel("mean ground-truth reward")
    ax.set_title(title or "reward vs KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(points: list[dict], reference: str = "dpo") -> dict:
    """`reference` vs every other method (πSFT is the shared start, not a competitor)."""
    start = next(p for p in points if p["method"] == "sft")
    ref_pts = [p for p in points if p["method"] == reference]
    out = {}
    for m in METHODS:
        if m in (reference, "sft"):
            continue
        ps = [p for p in points if p["method"] == m]
        if ps and ref_pts:
            out[m] = compare_frontiers(ref_pts, ps, start)
    return out


def markdown(points: list[dict], comparisons: dict, header: str = "", reference: str = "dpo") -> str:
    lines = [header.rstrip(), "", f"## Does {LABELS[reference]}'s frontier dominate each baseline?", "",
             "Mean frontier reward over the KL range both methods reach (step frontier through the πSFT start; "
             "± 1 s.e. from the points' errors, 2 000 draws). *dominates*: difference > 2 s.e.", "",
             f"| baseline | KL range (nats) | {LABELS[reference]} | baseline | difference | verdict |",
             "|---|---|---|---|---|---|"]
    for m, c in comparisons.items():
        lines.append(f"| {LABELS[m]} | 0–{c['kl_range']:.2f} | {c['mean_a']:.3f} | {c['mean_b']:.3f} | "
                     f"{c['diff']:+.3f} ± {c['diff_se']:.3f} | {LABELS[reference]} {c['verdict']} {LABELS[m]} |")
    lines += ["", "## Every point", "", "| method | knob | step | KL | reward | length |", "|---|---|---|---|---|---|"]
    for p in points:
        kl = f"{p['kl']:.2f} ± {_se(p['kl_se']):.2f}" if p["method"] != "best_of_n" else f"≤ {p['kl']:.2f}"
        lines.append(f"| {p['method']} | {p['knob']} | {p['step']} | {kl} | {p['reward']:.3f} ± "
                     f"{_se(p['reward_se']):.3f} | {p['length']:.1f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# What a reader checks first: the best reward each method reaches within a KL budget.


def best_within(points: list[dict], budget: float, start: dict) -> dict:
    """The point of highest reward among `points` with KL ≤ budget (πSFT's when none is)."""
    inside = [p for p in points if max(p["kl"], 0.0) <= budget]
    return max(inside, key=lambda p: p["reward"]) if inside else start


def budget_table(points: list[dict], budgets=BUDGETS, top: float | None = None) -> dict:
    """{method: [(budget, best point within it), ...]} for every method but πSFT; the last budget is
    `top`, by default the largest KL any point reaches ("any KL")."""
    start = next(p for p in points if p["method"] == "sft")
    top = max(max(p["kl"], 0.0) for p in points) if top is None else top
    budgets = [b for b in budgets if b < top] + [top]
    return {m: [(b, best_within([p for p in points if p["method"] == m], b, start)) for b in budgets]
            for m in METHODS if m != "sft" and any(p["method"] == m for p in points)}


def budget_verdict(a: dict, b: dict) -> str:
    """a's best reward against b's within one budget: 'above', 'below' or 'tie' at 2 s.e. (the two
    points' errors combined; the best of several noisy points is biased upwards alike for both)."""
    se = math.hypot(_se(a["reward_se"]), _se(b["reward_se"]))
    diff = a["reward"] - b["reward"]
    return "above" if diff > 2 * se else ("below" if diff < -2 * se else "tie")


def budget_markdown(points: list[dict], reference: str = "dpo") -> str:
    """The per-budget table, a verdict line per baseline, and which KL each method covers."""
    table = budget_table(points)
    if reference not in table:
        return ""
    budgets = [b for b, _ in table[reference]]
    heads = [f"KL ≤ {b:g}" for b in budgets[:-1]] + [f"any KL (≤ {budgets[-1]:.2f})"]
    lines = ["", "## Best reward within each KL budget", "",
             "The highest mean reward a method reaches at KL(π‖πSFT) ≤ the budget (± its s.e., @ its KL); a "
             "method with no point inside a budget is at πSFT. Verdicts against "
             f"{LABELS[reference]}: above / below / tie at 2 s.e.", "",
             "| method | " + " | ".join(heads) + " | largest KL reached |", "|---|" + "---|" * (len(heads) + 1)]
    for m, row in table.items():
        cells = [f"{p['reward']:.3f} ± {_se(p['reward_se']):.3f} @ {max(p['kl'], 0.0):.2f}" for _, p in row]
        reach = max(max(p["kl"], 0.0) for p in points if p["method"] == m)
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + f" | {reach:.2f} |")
    lines += ["", f"| {LABELS[reference]} vs | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for m, row in table.items():
        if m != reference:
            verdicts = [budget_verdict(a, b) for (_, a), (_, b) in zip(table[reference], row)]
            lines.append(f"| {LABELS[m]} | " + " | ".join(verdicts) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Length: a reward that grows with length favours whatever lengthens its answers.


def length_controlled(points: list[dict]) -> list[dict]:
    """The points with reward := the reward predicted at πSFT's mean length (`reward_lc`, from each
    point's own per-sample regression of reward on length); points without it are left out."""
    return [dict(p, reward=p["reward_lc"], reward_se=p.get("reward_lc_se")) for p in points
            if p.get("reward_lc") is not None]


def length_markdown(points: list[dict], reference: str = "dpo") -> str:
    """The frontier comparison again, on length-controlled rewards."""
    lc = length_controlled(points)
    if not any(p["method"] == "sft" for p in lc) or not any(p["method"] == reference for p in lc):
        return ""
    comparisons = summarize(lc, reference)
    lines = ["", "## Length-controlled", "",
             "Each point's reward predicted at πSFT's mean length, from a least-squares fit of reward on "
             "completion length over that point's samples (± the fit's s.e.). A method that buys reward by "
             "lengthening its answers loses that part here.", "",
             f"| baseline | KL range (nats) | {LABELS[reference]} | baseline | difference | verdict |",
             "|---|---|---|---|---|---|"]
    for m, c in comparisons.items():
        lines.append(f"| {LABELS[m]} | 0–{c['kl_range']:.2f} | {c['mean_a']:.3f} | {c['mean_b']:.3f} | "
                     f"{c['diff']:+.3f} ± {c['diff_se']:.3f} | {LABELS[reference]} {c['verdict']} {LABELS[m]} |")
    return "\n".join(lines) + "\n"


def length_fit(rewards, lengths) -> dict:
    """Least squares reward = a + b·length over one point's samples: a, b and their covariance, so
    the reward at any length L is a + b·L with variance [1 L] Σ [1 L]ᵀ."""
    y = np.asarray(rewards, dtype=np.float64)
    x = np.asarray(lengths, dtype=np.float64)
    X = np.stack([np.ones_like(x), x], axis=1)
    if len(y) < 3 or np.ptp(x) == 0:  # no spread of lengths: nothing to control for
        return {"intercept": float(y.mean()) if len(y) else float("nan"), "slope": 0.0,
                "cov": [[float(y.var(ddof=1) / len(y)) if len(y) > 1 else 0.0, 0.0], [0.0, 0.0]]}
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    cov = (resid @ resid / (len(y) - 2)) * np.linalg.inv(X.T @ X)
    return {"intercept": float(coef[0]), "slope": float(coef[1]), "cov": cov.tolist()}


def predict_at(fit: dict, length: float) -> tuple[float, float]:
    """(reward, s.e.) of a `length_fit` at `length`."""
    v = np.array([1.0, length])
    var = float(v @ np.asarray(fit["cov"]) @ v)
    return fit["intercept"] + fit["slope"] * length, math.sqrt(max(var, 0.0))
