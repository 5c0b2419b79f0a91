"""Win-rate statistics from per-comparison outcomes: pure numpy in float64 (no network, no model).

Outcomes are 1 (the policy wins), 0 (the reference wins), 0.5 (a tie) or None (no verdict; left
out of everything). Lengths are counted in whitespace-separated words (`word_count`), the same for
any tokenizer and any judge.

* `win_rate` is the mean outcome; `win_rate_se` its cluster-robust standard error: the n samples
  drawn for one prompt share that prompt, so they are not independent and the prompt (`clusters`)
  is the unit. With one comparison per cluster it is the sample standard deviation / √n.
* `win_rate_ci`: the 95 % bootstrap percentile interval, resampling whole clusters with
  replacement (`n_boot` resamples, seeded: the same data gives the same interval).
* `win_rate_lc`: the length-controlled win rate (in the manner of AlpacaEval's LC win rate): a
  logistic regression of the outcome on x = tanh((len_policy − len_ref) / s), s the standard
  deviation of the length difference, fitted with ties as ½ (fractional-response logistic
  regression, by Newton's method in float64 with a tiny ridge so that perfectly separated data,
  e.g. a judge that always prefers the longer answer, still has a finite fit); `win_rate_lc` =
  σ(intercept), the predicted win rate when the two answers are equally long. `win_rate_lc_ci`:
  its bootstrap interval (the same resamples, the feature x fixed).
"""
from __future__ import annotations

import math

import numpy as np

RIDGE = 1e-4  # on the summed log-likelihood: negligible next to any real data, finite under separation
_CHUNK = 256  # bootstrap resamples fitted at once (memory: _CHUNK × comparisons floats per array)


def word_count(text) -> int:
    """Length of a completion in whitespace-separated words."""
    return len(str(text).split())


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # σ without overflow warnings for large |z|


def fit_logistic(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None, ridge: float = RIDGE,
                 max_iter: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Maximise Σ_i w_i [y_i η_i − log(1 + e^{η_i})] − ridge/2 ‖β‖², η = β0 + β1 x, for each row of
    `weights` (shape (B, n), default one row of ones); y may be fractional (in [0, 1]). Returns (B, 2).

    Newton's method, every row at once; a step that lowers a row's objective is halved until it does
    not (the objective is strictly concave, so this converges from β = 0)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    w = np.ones((1, x.size)) if weights is None else np.atleast_2d(np.asarray(weights, np.float64))
    X = np.stack([np.ones_like(x), x], axis=1)  # (n, 2)
    beta = np.zeros((w.shape[0], 2))

    def objective(b, rows=slice(None)):
        eta = b @ X.T  # (B, n)
        return (w[rows] * (y * eta - np.logaddexp(0.0, eta))).sum(1) - 0.5 * ridge * (b * b).sum(1)

    current = objective(beta)
    for _ in range(max_iter):
        mu = _sigmoid(beta @ X.T)
        grad = (w * (y - mu)) @ X - ridge * beta  # (B, 2)
        h = (w * mu * (1 - mu)) @ np.stack([np.ones_like(x), x, x * x], axis=1)  # (B, 3): Σv, Σvx, Σvx²
        hess = np.stack([h[:, :2], h[:, 1:]], axis=1) + ridge * np.eye(2)  # [[Σv, Σvx], [Σvx, Σvx²]]
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        t = np.ones(len(beta))
        new = objective(beta + step)
        for _ in range(40):  # step halving, only for the rows whose objective went down
            worse = new < current - 1e-12 * np.abs(current)
            if not worse.any():
                break
            t[worse] *= 0.5
            new[worse] = objective(beta[worse] + t[worse, None] * step[worse], worse)
        beta = beta + t[:, None] * step
        current = new
        if np.abs(t[:, None] * step).max() < tol:
            break
    return beta


def length_feature(policy_lengths, reference_lengths) -> np.ndarray:
    """tanh((len_policy − len_ref) / s), s the (population) standard deviation of the difference;
    all zeros when every difference is equal (s = 0: length explains nothing)."""
    d = np.asarray(policy_lengths, np.float64) - np.asarray(reference_lengths, np.float64)
    s = d.std()
    return np.tanh(d / s) if s > 0 else np.zeros_like(d)


def _cluster_se(y: np.ndarray, groups: np.ndarray, n_groups: int) -> float:
    """Cluster-robust (sandwich) standard error of the mean, with the G/(G−1) small-sample factor."""
    if n_groups < 2:
        return float("nan")
    resid = np.bincount(groups, weights=y - y.mean(), minlength=n_groups)
    return math.sqrt((resid ** 2).sum() * n_groups / (n_groups - 1)) / y.size


def _bootstrap(y, x, groups, n_groups, n_boot, seed, with_lc):
    """(n_boot,) raw win rates and (n_boot,) LC win rates (or None) over cluster resamples."""
    rng = np.random.default_rng(seed)
    raw, lc = [], []
    for start in range(0, n_boot, _CHUNK):
        b = min(_CHUNK, n_boot - start)
        counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=b)  # clusters drawn
        w = counts[:, groups].astype(np.float64)  # (b, n): each comparison weighted by its cluster's draws
        raw.append((w @ y) / w.sum(1))
        if with_lc:
            lc.append(_sigmoid(fit_logistic(x, y, w)[:, 0]))
    return np.concatenate(raw), (np.concatenate(lc) if with_lc else None)


def _interval(values) -> list:
    if values is None or len(values) == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def win_rate_stats(outcomes, policy_lengths=None, reference_lengths=None, clusters=None, n_boot: int = 2000,
                   seed: int = 0) -> dict:
    """The win rate of `outcomes` with its standard error, bootstrap interval and length-controlled
    counterpart (see the module's doc). Lengths in words, one per comparison (None: no LC rate);
    `clusters`: one id per comparison (the prompt index; None: every comparison its own cluster)."""
    outcomes = list(outcomes)
    keep = [i for i, o in enumerate(outcomes) if o is not None]
    nan = float("nan")
    out = {"win_rate": nan, "win_rate_se": nan, "win_rate_ci": [nan, nan], "win_rate_lc": nan,
           "win_rate_lc_ci": [nan, nan], "length_diff_mean": nan, "judged": len(keep), "n_boot": int(n_boot)}
    with_lc = policy_lengths is not None and reference_lengths is not None
    if with_lc and not len(policy_lengths) == len(reference_lengths) == len(outcomes):
        raise ValueError(f"{len(outcomes)} outcomes but {len(policy_lengths)} policy and {len(reference_lengths)} "
                         "reference lengths")
    if clusters is not None and len(clusters) != len(outcomes):
        raise ValueError(f"{len(outcomes)} outcomes but {len(clusters)} cluster ids")
    if not keep:
        return out
    y = np.asarray([outcomes[i] for i in keep], np.float64)
    ids = [clusters[i] for i in keep] if clusters is not None else keep
    _, groups = np.unique(np.asarray(ids), return_inverse=True)
    n_groups = int(groups.max()) + 1
    out["win_rate"] = float(y.mean())
    out["win_rate_se"] = _cluster_se(y, groups, n_groups)
    x = None
    if with_lc:
        pol = np.asarray([policy_lengths[i] for i in keep], np.float64)
        ref = np.asarray([reference_lengths[i] for i in keep], np.float64)
        out["length_diff_mean"] = float((pol - ref).mean())
        x = length_feature(pol, ref)
        out["win_rate_lc"] = float(_sigmoid(fit_logistic(x, y)[0, 0]))
    if n_boot > 0:
        raw, lc = _bootstrap(y, x, groups, n_groups, int(n_boot), seed, with_lc)
        out["win_rate_ci"], out["win_rate_lc_ci"] = _interval(raw), _interval(lc)
    return out
