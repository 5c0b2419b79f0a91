"""Paired per-prompt tests between the win-rate study's methods (one seed and pooled over seeds), and
the paper's findings judged from them."""
import random

import pytest

from directpo.experiments.winrate.config import DialogueConfig
from directpo.experiments.winrate.findings import NOT_REPRODUCED, NOT_TESTABLE, REPRODUCED, Evidence, findings
from directpo.experiments.winrate.paired import lookup, paired_difference, paired_tests, pool_paired, sign_test


def test_sign_test_is_the_exact_two_sided_binomial():
    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    assert sign_test(5, 0) == pytest.approx(2 / 32)  # 2 · 0.5^5
    assert sign_test(0, 5) == sign_test(5, 0)
    assert sign_test(9, 1) == pytest.approx(2 * 11 / 1024)  # P(≤ 1 of 10) = 11/1024, both tails
    assert sign_test(61, 39) < 0.05 < sign_test(60, 40)  # n = 100: 60 of 100 gives p = 0.0569, 61 gives 0.035


def test_paired_difference_counts_prompts_and_skips_failed_judgements():
    a = [1.0, 1.0, 0.5, 0.0, 1.0, None]
    b = [0.0, 1.0, 0.0, 0.0, 0.5, 1.0]
    r = paired_difference(a, b, draws=500)
    assert r["n"] == 5 and (r["a_better"], r["b_better"]) == (3, 0)  # the None prompt is left out of the pair
    assert r["estimate"] == pytest.approx((1 + 0 + 0.5 + 0 + 0.5) / 5)
    assert r["low"] <= r["estimate"] <= r["high"] and r["p_sign"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference(a, b[:3])


def test_pairing_removes_the_prompts_shared_difficulty():
    """Two methods whose outcomes track the same hard prompts: the paired interval of their
    difference is far narrower than two separate win-rate intervals would suggest."""
    rng = random.Random(0)
    easy = [rng.random() < 0.5 for _ in range(400)]
    a = [1.0 if e or rng.random() < 0.1 else 0.0 for e in easy]
    b = [x if rng.random() < 0.9 else 0.0 for x in a]  # b loses a tenth of a's wins
    r = paired_difference(a, b, draws=1000, seed=1)
    assert r["low"] > 0 and r["b_better"] == 0 and r["p_sign"] == pytest.approx(2.0 ** (1 - r["a_better"]))
    unpaired_half_width = 1.96 * (0.25 / 400) ** 0.5 * 2 ** 0.5  # two independent proportions near 0.5
    assert r["high"] - r["low"] < unpaired_half_width


def point(method, t, outcomes, knob=None):
    return {"method": method, "knob": knob, "temperature": t, "outcomes": outcomes,
            "win_rate": sum(outcomes) / len(outcomes)}


def test_paired_tests_pair_methods_per_temperature_and_dpos_temperatures():
    points = [point("dpo", 0.0, [1, 1, 0, 1]), point("preferred_ft", 0.0, [0, 1, 0, 0]),
              point("dpo", 1.0, [0, 1, 0, 0]), point("preferred_ft", 1.0, [0, 0, 0, 0]),
              point("best_of_n", 1.0, [1, 1, 1, 0], knob=4), {"method": "ppo", "knob": None, "temperature": 0.0}]
    records = paired_tests(points, draws=200)
    pairs = {(r["a"], r["b"]): r for r in records}
    assert set(pairs) == {("dpo@0", "preferred_ft@0"), ("dpo@1", "preferred_ft@1"), ("dpo@1", "best_of_n_4@1"),
                          ("best_of_n_4@1", "preferred_ft@1"), ("dpo@1", "dpo@0")}  # no outcomes: ppo unpaired
    assert pairs[("dpo@0", "preferred_ft@0")]["estimate"] == pytest.approx(0.5)
    assert pairs[("dpo@1", "dpo@0")]["temperature"] is None and pairs[("dpo@1", "dpo@0")]["b_better"] == 2
    flipped = lookup(records, "preferred_ft@0", "dpo@0")
    assert flipped["estimate"] == pytest.approx(-0.5) and flipped["high"] == -pairs[("dpo@0", "preferred_ft@0")]["low"]
    assert (flipped["a_better"], flipped["b_better"]) == (0, 2)


def test_pooled_over_seeds_uses_the_seeds_spread_and_every_prompt():
    per_seed = {s: [{"a": "dpo@0", "b": "preferred_ft@0", "temperature": 0.0, "estimate": d, "low": d - 0.1,
                     "high": d + 0.1, "n": 100, "a_better": w, "b_better": 10, "p_sign": 0.5}]
                for s, d, w in ((0, 0.10, 20), (1, 0.14, 24), (2, 0.12, 22))}
    (r,) = pool_paired(per_seed)
    assert r["estimate"] == pytest.approx(0.12) and r["seed_interval"]["n"] == 3
    assert r["low"] < 0.12 < r["high"] and r["low"] > 0  # t-interval on 2 df: 0.12 ± 4.30 · 0.02 / √3
    assert r["high"] - 0.12 == pytest.approx(4.303 * 0.02 / 3 ** 0.5, rel=1e-3)
    assert (r["n"], r["a_better"], r["b_better"]) == (300, 66, 30) and r["p_sign"] < 0.001


def test_findings_from_pooled_paired_evidence():
    wins = {"dpo@0": (0.62, 0.56, 0.68), "dpo@1": (0.50, 0.45, 0.55), "preferred_ft@0": (0.55, 0.49, 0.61),
            "preferred_ft@1": (0.45, 0.40, 0.50)}
    paired = [{"a": "dpo@0", "b": "preferred_ft@0", "temperature": 0.0, "estimate": 0.07, "low": 0.02, "high": 0.12,
               "a_better": 30, "b_better": 10, "p_sign": 0.002},
              {"a": "dpo@1", "b": "preferred_ft@1", "temperature": 1.0, "estimate": 0.05, "low": 0.01, "high": 0.09,
               "a_better": 30, "b_better": 10, "p_sign": 0.002},
              {"a": "dpo@1", "b": "dpo@0", "temperature": None, "estimate": -0.12, "low": -0.2, "high": -0.04,
               "a_better": 5, "b_better": 40, "p_sign": 1e-7}]
    cfg = DialogueConfig(output_dir="x")
    got = findings([], {"judge": {"heldout_accuracy": 0.7}}, cfg, Evidence(wins, paired))
    # the overlapping win-rate intervals of DPO and πSFT at T=0 do not decide: the paired difference does
    assert [v for _, v, _ in got] == [REPRODUCED, NOT_TESTABLE, NOT_REPRODUCED, REPRODUCED]
    assert "dpo@1" in got[2][2] and "paired" in got[3][2]
    # DPO's temperatures not told apart by the paired test: robust
    paired[2].update(low=-0.2, high=0.01)
    assert findings([], {"judge": {"heldout_accuracy": 0.7}}, cfg, Evidence(wins, paired))[2][1] == REPRODUCED
    # the separate judge below the floor (forced): nothing is testable, whatever the evidence says
    forced = DialogueConfig(output_dir="x", force=True)
    assert {v for _, v, _ in findings([], {"judge": {"heldout_accuracy": 0.6}}, forced, Evidence(wins, paired))} \
        == {NOT_TESTABLE}
