"""Reward–KL frontiers: which method buys more reward for the same divergence from πref (Fig. 2 left).

A point is one evaluated policy: mean ground-truth reward and sequence-level KL(π‖πref), each with
its standard error. A method's frontier is the upper piecewise-linear hull of its points and the
shared πSFT start (0, r₀), made non-decreasing (past its best point it stays flat: a policy with
less KL is within a larger budget too):

    f(k) = the upper concave envelope of {(0, r₀)} ∪ {(kl_p, reward_p)} at k, up to the method's largest KL.

Straight lines between points, not steps, so a method measured at few KLs is not penalised for the
gaps between them. Two methods are compared on the KL range both reach, [0, K] with K the smaller of
their largest KLs: the difference f_a − f_b is piecewise linear, so its mean over [0, K], the KLs
where it changes sign (the crossings) and whether one hull is above the other everywhere are exact.
"Dominates" means only that: a's hull is at or above b's at every KL of the common range (and above
somewhere) and its mean lead is more than 2 s.e. The s.e. comes from the points' own errors: the
comparison is redone on draws of every point from N(mean, se²) (rewards and KLs).
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
DRAWS = 500  # draws of the points for a comparison's s.e.


def hull(kls, rewards, start: float) -> tuple[np.ndarray, np.ndarray]:
    """The vertices (KL, reward) of the non-decreasing upper hull through (0, start) and the points
    (KLs below 0, sampling noise, count as 0)."""
    xs = np.concatenate([[0.0], np.clip(np.asarray(kls, dtype=np.float64), 0.0, None)])
    ys = np.concatenate([[float(start)], np.asarray(rewards, dtype=np.float64)])
    order = np.lexsort((ys, xs))
    upper: list[tuple[float, float]] = []
    for x, y in zip(xs[order], ys[order]):
        if upper and upper[-1][0] == x:  # the same KL: the higher reward (sorted last) wins
            upper.pop()
        # pop the last vertex while it lies on or below the line from the one before it to (x, y)
        while len(upper) >= 2 and ((upper[-1][0] - upper[-2][0]) * (y - upper[-2][1])
                                   - (upper[-1][1] - upper[-2][1]) * (x - upper[-2][0])) >= 0:
            upper.pop()
        upper.append((float(x), float(y)))
    peak = max(range(len(upper)), key=lambda i: upper[i][1])
    kept = upper[:peak + 1]
    if upper[-1][0] > kept[-1][0]:  # flat from the best point to the largest KL reached
        kept.append((upper[-1][0], kept[-1][1]))
    return np.array([x for x, _ in kept]), np.array([y for _, y in kept])


def hull_of(points: list[dict], start: float) -> tuple[np.ndarray, np.ndarray]:
    return hull([p["kl"] for p in points], [p["reward"] for p in points], start)


def frontier_at(points: list[dict], k: float, start: float) -> float:
    """f(k): the hull of `points` at KL k (its value at its largest KL beyond it)."""
    xs, ys = hull_of(points, start)
    return float(np.interp(k, xs, ys))


def hull_difference(ha, hb, K: float | None = None) -> dict:
    """f_a − f_b over [0, K] (default: the range both reach): its mean, smallest and largest value,
    and the KLs where it changes sign, all exact (both are piecewise linear; so is the difference)."""
    (xa, ya), (xb, yb) = ha, hb
    K = min(xa[-1], xb[-1]) if K is None else K
    if K <= 0:
        d0 = float(ya[0] - yb[0])
        return {"kl_range": 0.0, "diff": d0, "min": d0, "max": d0, "crossings": [], "first_sign": int(np.sign(d0))}
    ks = np.unique(np.concatenate([xa[xa < K], xb[xb < K], [0.0, K]]))
    d = np.interp(ks, xa, ya) - np.interp(ks, xb, yb)
    crossings, sign, last, first = [], 0, 0.0, 0
    for i in range(len(ks)):
        s = int(np.sign(d[i])) if abs(d[i]) > 1e-12 else 0
        if s and sign and s != sign:  # a sign change since the last nonzero value: where it was zero
            crossings.append(_root(ks, d, i, last))
        if s:
            sign, last, first = s, ks[i], first or s
    mean = float(np.sum((d[1:] + d[:-1]) / 2 * np.diff(ks)) / K)
    return {"kl_range": float(K), "diff": mean, "min": float(d.min()), "max": float(d.max()), "crossings": crossings,
            "first_sign": first}


def _root(ks: np.ndarray, d: np.ndarray, i: int, last: float) -> float:
    """The KL in (last, ks[i]] where the piecewise-linear difference reaches 0 (the segment ending at i,
    or the zero-valued stretch before it: its midpoint)."""
    if abs(d[i - 1]) > 1e-12:  # a sign change inside the segment
        return float(ks[i - 1] + (ks[i] - ks[i - 1]) * d[i - 1] / (d[i - 1] - d[i]))
    return float((last + ks[i - 1]) / 2) if ks[i - 1] > last else float(ks[i - 1])


def compare_frontiers(a: list[dict], b: list[dict], start: dict, draws: int = DRAWS, seed: int = 0) -> dict:
    """Method a's hull against method b's over the KL range both reach: the mean difference (± s.e.
    from the points' errors), the crossings, and the verdict ('dominates', 'is dominated by',
    'crosses', 'ties with')."""
    if not a or not b:
        return {}
    s0, s0se = start["reward"], _se(start["reward_se"])
    ha, hb = hull_of(a, s0), hull_of(b, s0)
    result = hull_difference(ha, hb)
    K = result["kl_range"]
    rng = np.random.default_rng(seed)

    def drawn(ps, s):
        kls = np.array([p["kl"] for p in ps]) + np.array([_se(p["kl_se"]) for p in ps]) * rng.standard_normal(len(ps))
        rs = np.array([p["reward"] for p in ps]) + np.array([_se(p["reward_se"]) for p in ps]) * rng.standard_normal(
            len(ps))
        return hull(kls, rs, s)

    paired = prompt_paired_gap(a, b, start, K, draws, seed)
    if paired is not None:  # the within-seed error from prompts resampled together, paired across methods
        se, result["error"] = paired["se"], "prompt bootstrap (paired)"
        result["diff_ci"] = [paired["low"], paired["high"]]
    else:
        sims = []
        for _ in range(draws):
            s = s0 + s0se * rng.standard_normal()
            sims.append(hull_difference(drawn(a, s), drawn(b, s), K)["diff"])
        se, result["error"] = float(np.std(sims)), "point errors"
    mean_a = hull_difference(ha, (np.array([0.0, K or 1.0]), np.zeros(2)), K)["diff"]
    return {**result, "mean_a": mean_a, "mean_b": mean_a - result["diff"], "diff_se": se,
            "verdict": hull_verdict(result, se)}


def prompt_paired_gap(a: list[dict], b: list[dict], start: dict, K: float, draws: int, seed: int) -> dict | None:
    """The hull gap's bootstrap over eval prompts, when every point records its per-prompt mean rewards
    (`prompt_rewards`, the same prompts in the same order): a draw resamples the prompts once for all
    points of both methods and πSFT, so the prompts' shared effect cancels; KLs stay at their means.
    None when any point lacks them (older points)."""
    from .intervals import prompt_bootstrap

    pts = [start] + a + b
    rows = [p.get("prompt_rewards") for p in pts]
    if any(r is None for r in rows) or len({len(r) for r in rows}) != 1:
        return None
    kls = [np.array([p["kl"] for p in ps]) for ps in (a, b)]

    def gap(arrays):
        means = [float(x.mean()) for x in arrays]
        s0, ra, rb = means[0], means[1:1 + len(a)], means[1 + len(a):]
        return hull_difference(hull(kls[0], ra, s0), hull(kls[1], rb, s0), K)["diff"]

    return prompt_bootstrap(gap, [np.asarray(r, dtype=np.float64) for r in rows], draws=draws, seed=seed)


def hull_verdict(c: dict, se: float) -> str:
    """'dominates' only where a's hull is at or above b's at every KL of the common range and the
    mean lead is beyond 2 s.e.; 'crosses' where the difference changes sign."""
    if c["crossings"]:
        return "crosses"
    if c["min"] >= 0 and c["diff"] > 2 * se:
        return "dominates"
    if c["max"] <= 0 and c["diff"] < -2 * se:
        return "is dominated by"
    return "ties with"


def crossing_text(c: dict, a: str = "DPO") -> str:
    """Where the hulls cross, in words: 'above at KL < 3.4, below past it'."""
    if not c.get("crossings"):
        return "—"
    marks = ", ".join(f"{k:.2f}" for k in c["crossings"])
    first = "above" if c.get("first_sign", 0) >= 0 else "below"
    return f"at KL {marks} ({a} {first} before the first)"


def _se(x) -> float:
    return 0.0 if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def write_points(points: list[dict], out: Path) -> None:
    """points.json (with each point's per-prompt rewards where measured: the report's prompt bootstrap
    reads them) and points.csv (the scalar fields)."""
    (out / "points.json").write_text(json.dumps([{**{k: p.get(k) for k in POINT_FIELDS}, **(
        {"prompt_rewards": p["prompt_rewards"]} if p.get("prompt_rewards") is not None else {})} for p in points],
        indent=1))
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
    seeds = sorted({p.get("seed") for p in points}, key=str)
    for m in METHODS:
        ps = [p for p in points if p["method"] == m]
        if not ps:
            continue
        ax.errorbar([p["kl"] for p in ps], [p["reward"] for p in ps], xerr=[_se(p["kl_se"]) for p in ps],
                    yerr=[_se(p["reward_se"]) for p in ps], fmt="*" if m == "sft" else "o", ms=9 if m == "sft" else 4,
                    color=COLORS[m], alpha=0.75 if len(seeds) == 1 else 0.4, capsize=2, lw=0.8, label=LABELS[m])
        for seed in seeds:  # the method's frontier in each seed: its hull through that seed's πSFT
            start = next((p for p in points if p["method"] == "sft" and p.get("seed") == seed), None)
            mine = [p for p in ps if p.get("seed") == seed]
            if m != "sft" and start is not None and mine:
                xs, ys = hull_of(mine, start["reward"])
                ax.plot(xs, ys, color=COLORS[m], lw=1.2 if len(seeds) == 1 else 0.8, alpha=0.9)
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


COMPARISON_NOTE = ("Each method's frontier is the upper piecewise-linear hull of its points and πSFT (0 KL), flat "
                   "past its best point; the difference is the mean of the two hulls' gap over the KL range both "
                   "reach (± 1 s.e.: a bootstrap over the eval prompts, paired across methods, where every point "
                   "carries its per-prompt rewards; else from the points' errors; {draws} draws). *dominates*: at "
                   "or above at every KL of that range and the mean gap > 2 s.e.; *crosses*: the gap changes sign "
                   "(where: the crossings); *ties with*: neither.").format(draws=DRAWS)


def comparison_rows(comparisons: dict, reference: str = "dpo") -> list[str]:
    lines = [f"| baseline | KL range (nats) | {LABELS[reference]} | baseline | difference | crossings | verdict |",
             "|---|---|---|---|---|---|---|"]
    for m, c in comparisons.items():
        lines.append(f"| {LABELS[m]} | 0–{c['kl_range']:.2f} | {c['mean_a']:.3f} | {c['mean_b']:.3f} | "
                     f"{c['diff']:+.3f} ± {c['diff_se']:.3f} | {crossing_text(c, LABELS[reference])} | "
                     f"{LABELS[reference]} {c['verdict']} {LABELS[m]} |")
    return lines


def markdown(points: list[dict], comparisons: dict, header: str = "", reference: str = "dpo") -> str:
    lines = [header.rstrip(), "", f"## {LABELS[reference]}'s frontier against each baseline's", "",
             COMPARISON_NOTE, ""] + comparison_rows(comparisons, reference)
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
    return [dict(p, reward=p["reward_lc"], reward_se=p.get("reward_lc_se"), prompt_rewards=None) for p in points
            if p.get("reward_lc") is not None]  # per-prompt rewards are raw ones: not for this view


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
             COMPARISON_NOTE, ""] + comparison_rows(comparisons, reference)
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
