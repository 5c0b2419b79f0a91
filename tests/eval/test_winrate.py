"""Win-rate statistics against independent computations: the standard error by hand, the
length-controlled rate where it is known in closed form, the Newton fit against a brute-force
maximiser of the same log-likelihood on a grid."""
import math
import warnings

import numpy as np
import pytest

from directpo.eval.winrate import RIDGE, fit_logistic, length_feature, win_rate_stats, word_count


def logit(p):
    return math.log(p / (1 - p))


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def test_word_count_is_whitespace_words():
    assert word_count("  two\twords\n") == 2 and word_count("") == 0 and word_count("a b  c") == 3


def test_raw_rate_and_se_by_hand_ties_and_failures_left_out():
    outcomes = [1, 0, 0.5, None, 1, 1, 0, None, 0.5, 1]
    judged = np.array([o for o in outcomes if o is not None], float)
    s = win_rate_stats(outcomes, n_boot=0)
    assert s["judged"] == 8 and s["win_rate"] == pytest.approx(judged.mean())
    # every comparison its own cluster: the sample standard deviation / √n
    assert s["win_rate_se"] == pytest.approx(judged.std(ddof=1) / math.sqrt(8))
    assert all(math.isnan(v) for v in s["win_rate_ci"])  # no resamples asked for


def test_clusters_correlated_samples_widen_the_error():
    """Four identical samples per prompt carry one prompt's worth of information: the cluster SE is
    the SE of the 25 prompt means, twice the naive one."""
    rng = np.random.default_rng(1)
    per_prompt = (rng.random(25) < 0.6).astype(float)
    y = np.repeat(per_prompt, 4)
    clusters = np.repeat(np.arange(25), 4)
    naive = win_rate_stats(y, n_boot=500)
    clustered = win_rate_stats(y, clusters=clusters, n_boot=500)
    assert clustered["win_rate"] == naive["win_rate"] == pytest.approx(per_prompt.mean())
    assert clustered["win_rate_se"] == pytest.approx(per_prompt.std(ddof=1) / 5)
    assert clustered["win_rate_se"] > 1.8 * naive["win_rate_se"]
    width = lambda s: s["win_rate_ci"][1] - s["win_rate_ci"][0]  # noqa: E731
    assert width(clustered) > 1.6 * width(naive)


def test_bootstrap_interval_seeded_and_close_to_the_normal_one():
    rng = np.random.default_rng(2)
    y = (rng.random(400) < 0.3).astype(float)
    a, b = win_rate_stats(y, seed=5), win_rate_stats(y, seed=5)
    assert a["win_rate_ci"] == b["win_rate_ci"] and a["n_boot"] == 2000
    assert win_rate_stats(y, seed=6)["win_rate_ci"] != a["win_rate_ci"]
    lo, hi = a["win_rate_ci"]
    p, se = a["win_rate"], a["win_rate_se"]
    assert lo < p < hi
    assert lo == pytest.approx(p - 1.96 * se, abs=0.012) and hi == pytest.approx(p + 1.96 * se, abs=0.012)


def test_lc_two_length_differences_closed_form():
    """Length differences ±k only: the model is saturated, σ(β0 ± β1 c) equals the mean outcome of
    each group, so β0 = (logit p₊ + logit p₋)/2, whatever the group sizes (the raw rate is weighted
    by them, the LC rate not)."""
    y_plus = [1, 1, 1, 0.5, 0] * 6  # mean 0.7 over 30 comparisons where the policy is 3 words longer
    y_minus = [1, 0, 0, 0, 0.5] * 2  # mean 0.3 over 10 where it is 3 words shorter
    outcomes = y_plus + y_minus
    pol = [8] * 30 + [5] * 10
    ref = [5] * 30 + [8] * 10
    s = win_rate_stats(outcomes, pol, ref, n_boot=0)
    assert s["win_rate"] == pytest.approx(0.6)
    assert s["win_rate_lc"] == pytest.approx(sigmoid((logit(0.7) + logit(0.3)) / 2), abs=1e-4)  # = 0.5
    y_minus = [1, 1, 0, 0, 0.5] * 2  # mean 0.5
    s = win_rate_stats(y_plus + y_minus, pol, ref, n_boot=0)
    assert s["win_rate_lc"] == pytest.approx(sigmoid((logit(0.7) + logit(0.5)) / 2), abs=1e-4)
    assert s["length_diff_mean"] == pytest.approx((30 * 3 - 10 * 3) / 40)


def test_lc_symmetric_data_is_one_half_and_length_free_data_the_raw_rate():
    # mirror image: each (difference d, outcome y) has a twin (−d, 1 − y): the likelihood is even in β0
    rng = np.random.default_rng(3)
    d = rng.integers(-20, 21, 50)
    y = rng.choice([0, 0.5, 1], 50)
    pol = np.concatenate([d, -d]) + 30
    outcomes = np.concatenate([y, 1 - y]).tolist()
    s = win_rate_stats(outcomes, pol.tolist(), [30] * 100, n_boot=200)
    assert s["win_rate_lc"] == pytest.approx(0.5, abs=1e-9)
    assert s["win_rate_lc_ci"][0] < 0.5 < s["win_rate_lc_ci"][1]
    # outcomes drawn independently of length: the LC rate is the raw rate, up to noise
    n = 2000
    pol = rng.integers(5, 60, n)
    y = (rng.random(n) < 0.7).astype(float)
    s = win_rate_stats(y, pol, rng.integers(5, 60, n), n_boot=0)
    assert s["win_rate_lc"] == pytest.approx(s["win_rate"], abs=0.02)


def test_lc_removes_a_pure_length_preference():
    """A judge that always prefers the longer answer (equal lengths: a tie), the policy longer in
    most comparisons: the raw rate is high, the rate at equal length one half."""
    pol = [12] * 20 + [9] * 5 + [10] * 5
    ref = [10] * 30
    outcomes = [1.0] * 20 + [0.0] * 5 + [0.5] * 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # perfectly separated: no overflow, no divergence
        s = win_rate_stats(outcomes, pol, ref, n_boot=300)
    assert s["win_rate"] == pytest.approx(0.75)
    assert s["win_rate_lc"] == pytest.approx(0.5, abs=0.01)
    assert all(math.isfinite(v) for v in s["win_rate_lc_ci"])


def test_newton_fit_matches_a_grid_maximiser():
    rng = np.random.default_rng(4)
    x = rng.uniform(-1, 1, 60)
    y = np.clip(0.6 + 0.8 * x + rng.normal(0, 0.5, 60), 0, 1)  # fractional outcomes
    beta = fit_logistic(x, y)[0]
    b0, b1 = np.meshgrid(np.arange(-3, 3, 0.01), np.arange(-3, 3, 0.01), indexing="ij")
    eta = b0[..., None] + b1[..., None] * x
    ll = (y * eta - np.logaddexp(0, eta)).sum(-1) - 0.5 * RIDGE * (b0 ** 2 + b1 ** 2)
    i, j = np.unravel_index(ll.argmax(), ll.shape)
    assert abs(beta[0] - b0[i, j]) <= 0.011 and abs(beta[1] - b1[i, j]) <= 0.011
    at_beta = (y * (beta[0] + beta[1] * x) - np.logaddexp(0, beta[0] + beta[1] * x)).sum() - 0.5 * RIDGE * beta @ beta
    assert at_beta >= ll.max() - 1e-12


def test_weighted_rows_are_fits_of_resampled_data():
    """The bootstrap fits each resample as weights (how often each comparison was drawn): the same
    as fitting the resampled data itself."""
    rng = np.random.default_rng(5)
    x, y = rng.uniform(-1, 1, 30), rng.choice([0.0, 0.5, 1.0], 30)
    w = rng.multinomial(30, np.full(30, 1 / 30), size=3)
    fits = fit_logistic(x, y, w)
    for row, beta in zip(w, fits):
        assert beta == pytest.approx(fit_logistic(np.repeat(x, row), np.repeat(y, row))[0], abs=1e-8)


def test_degenerate_inputs():
    # equal lengths everywhere (s = 0): length explains nothing, the LC rate is the raw rate
    assert list(length_feature([3, 3], [1, 1])) == [0.0, 0.0]
    s = win_rate_stats([1, 1, 0, 0.5], [4] * 4, [4] * 4, n_boot=50)
    assert s["win_rate_lc"] == pytest.approx(s["win_rate"], abs=1e-4)
    # nothing judged: numbers are NaN, not an error
    s = win_rate_stats([None, None], [1, 2], [2, 1])
    assert s["judged"] == 0 and math.isnan(s["win_rate"]) and math.isnan(s["win_rate_lc_ci"][0])
    # a single prompt: no standard error across prompts
    assert math.isnan(win_rate_stats([1, 0], clusters=[0, 0], n_boot=0)["win_rate_se"])
    with pytest.raises(ValueError, match="3 outcomes but 2 policy and 3 reference lengths"):
        win_rate_stats([1, 0, 1], [1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="2 outcomes but 1 cluster ids"):
        win_rate_stats([1, 0], clusters=[0])
