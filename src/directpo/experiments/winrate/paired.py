"""Paired per-prompt tests between methods: every method is judged on the same eval prompts, so two
methods are compared prompt by prompt, not by their separate intervals.

A prompt's outcome for one method is 1 (its answer beat the reference), 0.5 (tie) or 0 (lost); the
difference of two methods on a prompt is one of −1 … 1. Per pair of entries: the mean difference
with a 95 % bootstrap interval that resamples prompts (both methods' outcomes of a prompt move
together: `intervals.prompt_bootstrap`), the prompts each side won, and a two-sided sign test
(exact binomial on the prompts whose outcomes differ). A prompt the judge failed on for either
side is left out of that pair.

Within one study (one seed) the pairs are (1) every two methods at the same temperature and (2)
DPO at every two temperatures (its robustness). Over seeds (`pool_paired`): each pair's per-seed
mean differences, their mean, a t-interval over seeds and the sign count (`intervals.seed_interval`),
and the sign test over every prompt of every seed.
"""
from __future__ import annotations

import math
from itertools import combinations

# A pair's label order: the method first in this list is "a" (the difference is a − b).
METHOD_ORDER = ("dpo", "ppo", "best_of_n", "preferred_ft")


def label(point: dict) -> str:
    """`dpo@0.5`, `best_of_n_4@1`: one entry of a study."""
    knob = "" if point.get("knob") is None else f"_{point['knob']}"
    return f"{point['method']}{knob}@{point['temperature']:g}"


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: P(a split at least this uneven | each side equally likely); ties
    left out. 1.0 when no prompt differs."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2 ** n)


def paired_difference(a: list, b: list, draws: int = 2000, seed: int = 0) -> dict:
    """a − b over the prompts both have an outcome for (the same prompt order in both)."""
    import numpy as np

    from ..intervals import prompt_bootstrap

    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} and {len(b)} outcomes (the same prompts are needed)")
    keep = [i for i, (x, y) in enumerate(zip(a, b)) if x is not None and y is not None]
    xa, xb = np.array([a[i] for i in keep], float), np.array([b[i] for i in keep], float)
    d = xa - xb
    out = {"n": len(keep), "a_better": int((d > 0).sum()), "b_better": int((d < 0).sum())}
    out["p_sign"] = sign_test(out["a_better"], out["b_better"])
    if not keep:
        return {**out, "estimate": None, "low": None, "high": None}
    boot = prompt_bootstrap(lambda arrays: float(arrays[0].mean() - arrays[1].mean()), [xa, xb], draws=draws,
                            seed=seed)
    return {**out, "estimate": boot["estimate"], "low": boot["low"], "high": boot["high"]}


def ordered(p: dict, q: dict) -> tuple[dict, dict]:
    """The pair in label order: by METHOD_ORDER, then the larger N, then the higher temperature."""
    def rank(x):
        return (METHOD_ORDER.index(x["method"]) if x["method"] in METHOD_ORDER else len(METHOD_ORDER),
                -(x.get("knob") or 0), -x["temperature"])
    return (p, q) if rank(p) <= rank(q) else (q, p)


def pairs_of(points: list[dict]) -> list[tuple[dict, dict]]:
    """Every two methods at one temperature, and DPO at every two temperatures."""
    judged = [p for p in points if p.get("outcomes")]
    same_t = [ordered(p, q) for p, q in combinations(judged, 2)
              if p["temperature"] == q["temperature"] and (p["method"], p.get("knob")) != (q["method"], q.get("knob"))]
    same_t.sort(key=lambda pair: pair[0]["temperature"])  # stable: the table grouped by temperature
    dpo = sorted((p for p in judged if p["method"] == "dpo"), key=lambda p: p["temperature"])
    return same_t + [(q, p) for p, q in combinations(dpo, 2)]


def paired_tests(points: list[dict], draws: int = 2000, seed: int = 0) -> list[dict]:
    """One record per pair of `pairs_of(points)`: labels, temperature (None across temperatures) and
    `paired_difference`."""
    records = []
    for a, b in pairs_of(points):
        same_t = a["temperature"] == b["temperature"]
        records.append({"a": label(a), "b": label(b), "temperature": a["temperature"] if same_t else None,
                        **paired_difference(a["outcomes"], b["outcomes"], draws, seed)})
    return records


def pool_paired(per_seed: dict[int, list[dict]]) -> list[dict]:
    """Each pair over the seeds that measured it: the per-seed mean differences, their mean,
    t-interval and sign count; the prompts won by each side over all seeds and their sign test."""
    from ..intervals import seed_interval

    keys = list(dict.fromkeys((r["a"], r["b"]) for records in per_seed.values() for r in records))
    pooled = []
    for a, b in keys:
        got = {s: r for s, records in per_seed.items() for r in records if (r["a"], r["b"]) == (a, b)
               and r.get("estimate") is not None}
        if not got:
            continue
        wins, losses = sum(r["a_better"] for r in got.values()), sum(r["b_better"] for r in got.values())
        iv = seed_interval([r["estimate"] for r in got.values()])
        pooled.append({"a": a, "b": b, "temperature": next(iter(got.values()))["temperature"],
                       "estimate_by_seed": {s: r["estimate"] for s, r in got.items()},
                       "estimate": iv["mean"], "low": iv["low"], "high": iv["high"], "seed_interval": iv,
                       "n": sum(r["n"] for r in got.values()), "a_better": wins, "b_better": losses,
                       "p_sign": sign_test(wins, losses)})
    return pooled


def lookup(records: list[dict], a: str, b: str) -> dict | None:
    """The record of a − b (a record of b − a turned around), or None."""
    def neg(x):
        return None if x is None else -x

    for r in records:
        if (r["a"], r["b"]) == (a, b):
            return r
        if (r["a"], r["b"]) == (b, a):
            return {**r, "a": a, "b": b, "estimate": neg(r.get("estimate")), "low": neg(r.get("high")),
                    "high": neg(r.get("low")), "a_better": r["b_better"], "b_better": r["a_better"]}
    return None


def fmt_diff(r: dict) -> str:
    if r.get("estimate") is None:
        return "–"
    text = f"{r['estimate']:+.3f}"
    if r.get("low") is not None:
        text += f" [{r['low']:+.3f}, {r['high']:+.3f}]"
    return text


def paired_markdown(records: list[dict], names: dict, over_seeds: int = 0) -> list[str]:
    """The table of summary.md: one row per pair."""
    how = (f"the mean over {over_seeds} seeds of each seed's mean per-prompt difference, with a 95 % t-interval over "
           "seeds; prompts won by each side and the sign test pooled over every seed's prompts") if over_seeds > 1 \
        else "the mean per-prompt difference with a 95 % bootstrap interval over prompts (resampled in pairs)"
    lines = ["## Paired per-prompt comparisons", "",
             "Per prompt: 1 if a method's answer beat the reference, ½ tie, 0 lost; the difference of two methods "
             f"on the same prompts (A − B): {how}. *A / B better*: prompts where A's outcome was higher / lower; "
             "*p (sign)*: the two-sided sign test on those prompts.", "",
             "| T | A | B | A − B | A better | B better | p (sign) |", "|---|---|---|---|---|---|---|"]
    for r in records:
        t = "all" if r["temperature"] is None else f"{r['temperature']:g}"
        lines.append(f"| {t} | {describe(r['a'], names)} | {describe(r['b'], names)} | {fmt_diff(r)} | "
                     f"{r['a_better']} | {r['b_better']} | {r['p_sign']:.3g} |")
    return lines + [""]


def describe(text: str, names: dict) -> str:
    """`best_of_n_4@1` -> `Best-of-4, T=1`."""
    key, t = text.rsplit("@", 1)
    if key.startswith("best_of_n_"):
        return f"Best-of-{key.removeprefix('best_of_n_')}, T={t}"
    return f"{names.get(key, key)}, T={t}"
