"""Intervals over seeds (Student's t, computed) and within a seed (a paired bootstrap over prompts)."""
import math
import statistics

import numpy as np
import pytest

from directpo.experiments.intervals import betainc, interval_word, prompt_bootstrap, seed_interval, t_cdf, t_quantile


@pytest.mark.parametrize("df, q975, q995", [(1, 12.706, 63.657), (2, 4.303, 9.925), (4, 2.776, 4.604),
                                            (10, 2.228, 3.169), (30, 2.042, 2.750)])
def test_t_quantile_matches_the_textbook_table(df, q975, q995):
    assert t_quantile(0.975, df) == pytest.approx(q975, abs=1e-3)
    assert t_quantile(0.995, df) == pytest.approx(q995, abs=1e-3)
    assert t_quantile(0.025, df) == pytest.approx(-q975, abs=1e-3)


def test_t_distribution_limits_and_exact_cases():
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-4)  # → the normal's
    assert t_cdf(1.0, 1) == pytest.approx(0.5 + math.atan(1.0) / math.pi)  # df 1: Cauchy, closed form
    assert t_cdf(0.0, 7) == pytest.approx(0.5)
    assert betainc(1.0, 1.0, 0.3) == pytest.approx(0.3)  # I_x(1, 1) = x
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248)  # 1 − Σ_{j<2} C(4, j) 0.4^j 0.6^(4−j)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_seed_interval_on_known_data():
    # 1..5: mean 3, s 1.5811, s/√5 0.7071, t(0.975, 4) 2.7764: 3 ± 1.9632
    iv = seed_interval([1, 2, 3, 4, 5])
    assert iv["mean"] == 3.0 and iv["sd"] == pytest.approx(statistics.stdev([1, 2, 3, 4, 5]))
    assert (iv["low"], iv["high"]) == (pytest.approx(1.0368, abs=1e-4), pytest.approx(4.9632, abs=1e-4))
    assert iv["positive"] == 5 and iv["negative"] == 0 and interval_word(iv) == "above 0"
    assert interval_word(seed_interval([0.1, -0.2, 0.15])) == "includes 0"
    assert seed_interval([0.3])["low"] is None and interval_word(seed_interval([0.3])) == "one seed: no interval"


def test_paired_prompt_bootstrap_narrows_when_methods_share_prompt_effects():
    """Two methods on the same 200 prompts, 4 samples each; every prompt has a large effect both share
    (some prompts are easy to make positive). Resampling the prompts together for both (paired) cancels
    it in the difference; resampling them apart does not; and the interval covers the true gap 0.1."""
    rng = np.random.default_rng(0)
    prompt_effect = rng.normal(0, 1.0, size=(200, 1))
    a = prompt_effect + 0.1 + rng.normal(0, 0.2, size=(200, 4))
    b = prompt_effect + rng.normal(0, 0.2, size=(200, 4))

    def gap(arrays):
        return float(arrays[0].mean() - arrays[1].mean())

    paired = prompt_bootstrap(gap, [a, b], draws=500)
    apart_a = prompt_bootstrap(lambda x: float(x[0].mean()), [a], draws=500, seed=1)
    apart_b = prompt_bootstrap(lambda x: float(x[0].mean()), [b], draws=500, seed=2)
    unpaired_se = math.hypot(apart_a["se"], apart_b["se"])
    assert paired["se"] < unpaired_se / 5
    assert paired["low"] < 0.1 < paired["high"] and paired["estimate"] == pytest.approx(gap([a, b]))
    # samples of a prompt move together: the s.e. of one method's mean is the prompts' (≈ 1/√200), not
    # that of 800 independent samples (≈ 1/√800)
    assert apart_a["se"] == pytest.approx(1 / math.sqrt(200), rel=0.25)
    with pytest.raises(ValueError, match="same prompts"):
        prompt_bootstrap(gap, [a, b[:100]])


def test_the_prediction_interval_is_where_a_new_seed_lands():
    # 1..5: 3 ± t(0.975, 4)·s·√(1 + 1/5) = 3 ± 2.77645·1.58114·1.09545 = 3 ± 4.80894
    iv = seed_interval([1, 2, 3, 4, 5])
    assert (iv["pred_low"], iv["pred_high"]) == (pytest.approx(-1.80894, abs=1e-4), pytest.approx(7.80894, abs=1e-4))
    assert seed_interval([0.3])["pred_low"] is None
    # Five seeds, then a sixth: the prediction interval holds it ~95 % of the time, the mean's interval ~68 %.
    rng = np.random.default_rng(0)
    inside_pred = inside_mean = 0
    for _ in range(4000):
        xs = rng.normal(size=6)
        iv = seed_interval(xs[:5])
        inside_pred += iv["pred_low"] <= xs[5] <= iv["pred_high"]
        inside_mean += iv["low"] <= xs[5] <= iv["high"]
    assert 0.93 < inside_pred / 4000 < 0.97 and inside_mean / 4000 < 0.75
