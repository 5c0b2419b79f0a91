"""Intervals for the studies' verdicts: over seeds (Student's t) and within a seed (a bootstrap over prompts).

Across seeds, the unit of evidence is one seed's difference between two methods: the pooled verdict
is their mean with a t-interval on seeds − 1 degrees of freedom and the count of seeds on each side
of zero. Within a seed, samples are not independent: every prompt has several samples, and all
methods are evaluated on the same prompts. So the within-seed interval resamples PROMPTS (all of a
prompt's samples together) and uses the same resampled prompts for every method (paired), which
removes the prompts' shared effect from a difference.

The t quantile is computed (the regularized incomplete beta function, inverted by bisection), not
looked up, so any number of seeds works; scipy is not a dependency.
"""
from __future__ import annotations

import math
import statistics
from typing import Callable, Sequence

import numpy as np


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes §6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    # the continued fraction converges fast on this side; the other side by symmetry
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (bisection on `t_cdf`, to ~1e-12)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:  # bracket: the t tails are heavy for small df (df 1, p 0.9995: 636.6)
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def seed_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean, t-interval (df = n − 1) and sign count of per-seed differences, and the prediction
    interval for one more seed (`pred_low`, `pred_high`: mean ± t·sd·√(1 + 1/n), where a new seed's
    value falls with probability `level` under normal seed-to-seed spread; the interval for the mean is
    √(n + 1) times narrower and says where the mean is, not where a seed lands). With one seed there is
    no interval (None): nothing about the seed-to-seed spread is known."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "low": None, "high": None, "pred_low": None, "pred_high": None,
                "positive": 0, "negative": 0}
    mean = statistics.fmean(xs)
    out = {"n": n, "mean": mean, "sd": None, "low": None, "high": None, "pred_low": None, "pred_high": None, "t": None,
           "positive": sum(x > 0 for x in xs), "negative": sum(x < 0 for x in xs)}
    if n > 1:
        sd = statistics.stdev(xs)
        q = t_quantile(0.5 + level / 2.0, n - 1)
        half, spread = q * sd / math.sqrt(n), q * sd * math.sqrt(1 + 1 / n)
        out.update(sd=sd, low=mean - half, high=mean + half, pred_low=mean - spread, pred_high=mean + spread,
                   t=mean / (sd / math.sqrt(n)) if sd > 0 else None)
    return out


def interval_word(iv: dict) -> str:
    """What an interval allows one to say about the sign of a difference (no more)."""
    if iv.get("low") is None:
        return "one seed: no interval"
    if iv["low"] > 0:
        return "above 0"
    if iv["high"] < 0:
        return "below 0"
    return "includes 0"


def prompt_bootstrap(statistic: Callable[[list[np.ndarray]], float], per_prompt: list[np.ndarray],
                     draws: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """A percentile interval of `statistic` over bootstrap draws of the prompts.

    `per_prompt`: one array per measured policy, shaped (prompts, samples per prompt) or (prompts,),
    row i of every array being the same prompt. A draw picks prompts with replacement and takes the
    SAME rows from every array, so a prompt's samples move together and methods stay paired.
    `statistic` maps the resampled arrays to one number (e.g. a difference of means)."""
    n = {len(a) for a in per_prompt}
    if len(n) != 1:
        raise ValueError(f"prompt_bootstrap: every array needs the same prompts (rows); got {sorted(n)}")
    n_prompts = n.pop()
    rng = np.random.default_rng(seed)
    values = np.empty(draws)
    for d in range(draws):
        rows = rng.integers(0, n_prompts, size=n_prompts)
        values[d] = statistic([a[rows] for a in per_prompt])
    alpha = (1.0 - level) / 2.0
    return {"estimate": float(statistic(per_prompt)), "low": float(np.quantile(values, alpha)),
            "high": float(np.quantile(values, 1.0 - alpha)), "se": float(values.std(ddof=1)), "draws": draws}
