"""Reward–KL frontiers: the step frontier's mean height, and dominance with error bars."""
import json

import numpy as np
import pytest

from directpo.experiments.frontier import budget_markdown, budget_table, budget_verdict, compare_frontiers, \
    frontier_at, frontier_mean, length_controlled, length_fit, length_markdown, markdown, plot_frontier, predict_at, \
    summarize, write_points


def pt(method, kl, reward, kl_se=0.0, reward_se=0.0, knob=None, step=0):
    return {"method": method, "knob": knob, "step": step, "kl": kl, "kl_se": kl_se, "reward": reward,
            "reward_se": reward_se, "length": 10.0}


def test_frontier_mean_is_the_step_function_area():
    # start 0 on [0, 1), then 2 (the point at KL 1); the later, worse point (3, 1) does not lower it
    assert frontier_mean(np.array([1.0, 3.0]), np.array([2.0, 1.0]), 0.0, 4.0) == pytest.approx(6.0 / 4.0)
    # points beyond K do not count; a point at KL < 0 (sampling noise) counts from 0
    assert frontier_mean(np.array([-0.1, 5.0]), np.array([1.0, 9.0]), 0.0, 2.0) == pytest.approx(1.0)
    assert frontier_at([pt("a", 1.0, 2.0), pt("a", 3.0, 1.0)], 2.0, 0.0) == 2.0
    assert frontier_at([pt("a", 1.0, 2.0)], 0.5, -1.0) == -1.0


def test_compare_verdicts_follow_the_error_bars():
    start = pt("sft", 0.0, 0.0)
    better = [pt("dpo", 1.0, 1.0, 0.01, 0.01), pt("dpo", 2.0, 1.5, 0.01, 0.01)]
    worse = [pt("ppo", 1.0, 0.5, 0.01, 0.01), pt("ppo", 4.0, 2.0, 0.01, 0.01)]
    c = compare_frontiers(better, worse, start)
    assert c["kl_range"] == 2.0  # the range both reach
    assert c["diff"] == pytest.approx((1.0 * 1 + 1.5 * 0) / 2 - 0.5 / 2, abs=1e-9)
    assert c["verdict"] == "dominates" and 0 < c["diff_se"] < 0.05
    assert compare_frontiers(worse, better, start)["verdict"] == "is dominated by"
    noisy = [pt("ppo", 1.0, 0.5, 0.5, 2.0), pt("ppo", 2.0, 1.0, 0.5, 2.0)]
    assert compare_frontiers(better, noisy, start)["verdict"] == "ties with"


def test_report_files(tmp_path):
    points = [pt("sft", 0.0, 0.1), pt("dpo", 1.0, 0.5, 0.1, 0.05, knob=0.1, step=10),
              pt("ppo", 1.5, 0.3, 0.1, 0.05, knob=0.2, step=5), pt("best_of_n", 0.8, 0.2, knob=4)]
    write_points(points, tmp_path)
    plot_frontier(points, tmp_path / "frontier.png")
    loaded = json.loads((tmp_path / "points.json").read_text())
    assert [set(p) for p in loaded] == [{"method", "knob", "step", "kl", "kl_se", "reward", "reward_se", "length",
                                         "seed", "reward_lc", "reward_lc_se"}] * 4
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    assert (tmp_path / "points.csv").read_text().splitlines()[0] == \
        "method,knob,step,kl,kl_se,reward,reward_se,length,seed,reward_lc,reward_lc_se"
    comps = summarize(points)
    assert set(comps) == {"ppo", "best_of_n"}
    md = markdown(points, comps, "# title")
    assert "PPO (learned RM)" in md and "Best-of-N" in md and "≤ 0.80" in md


def test_budget_table_best_reward_within_each_budget():
    points = [pt("sft", 0.0, 0.1, reward_se=0.01), pt("dpo", 1.5, 0.5, reward_se=0.01),
              pt("dpo", 3.0, 0.6, reward_se=0.01), pt("ppo", 0.5, 0.2, reward_se=0.01),
              pt("ppo", 7.0, 0.9, reward_se=0.01)]
    table = budget_table(points)
    assert [b for b, _ in table["dpo"]] == [1.0, 2.0, 4.0, 7.0]  # the largest KL reached closes the table
    assert [p["reward"] for _, p in table["dpo"]] == [0.1, 0.5, 0.6, 0.6]  # πSFT's until a point is inside
    assert [p["reward"] for _, p in table["ppo"]] == [0.2, 0.2, 0.2, 0.9]
    verdicts = [budget_verdict(a, b) for (_, a), (_, b) in zip(table["dpo"], table["ppo"])]
    assert verdicts == ["below", "above", "above", "below"]  # "above at low KL, below past 4" is a result
    md = budget_markdown(points)
    assert "| PPO (learned RM) | below | above | above | below |" in md
    assert budget_verdict(pt("a", 1, 0.5, reward_se=0.2), pt("b", 1, 0.4, reward_se=0.2)) == "tie"


def test_length_fit_predicts_reward_at_a_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 40, size=400)
    rewards = 0.02 * lengths + 0.1 + rng.normal(0, 0.05, size=400)
    fit = length_fit(rewards, lengths)
    assert fit["slope"] == pytest.approx(0.02, abs=0.002)
    # at the samples' own mean length the prediction is their mean reward, with the mean's s.e.
    r, se = predict_at(fit, float(np.mean(lengths)))
    assert r == pytest.approx(float(np.mean(rewards)), abs=1e-9)
    assert se == pytest.approx(float(np.std(rewards - 0.02 * lengths, ddof=2)) / np.sqrt(400), rel=0.05)
    # at a shorter length the predicted reward is lower: the length-driven part is removed
    assert predict_at(fit, 10.0)[0] == pytest.approx(0.3, abs=0.02)
    flat = length_fit([0.5, 0.7, 0.6], [8, 8, 8])  # no spread of lengths: the plain mean
    assert predict_at(flat, 20.0)[0] == pytest.approx(0.6)


def test_length_controlled_comparison_removes_a_length_advantage():
    def lc(method, kl, reward, lc_reward):
        return dict(pt(method, kl, reward, 0.01, 0.01), reward_lc=lc_reward, reward_lc_se=0.01)

    points = [lc("sft", 0.0, 0.1, 0.1), lc("dpo", 0.5, 0.8, 0.2), lc("dpo", 1.0, 0.8, 0.2),
              lc("ppo", 0.5, 0.5, 0.5), lc("ppo", 1.0, 0.5, 0.5)]
    assert [p["reward"] for p in length_controlled(points)] == [0.1, 0.2, 0.2, 0.5, 0.5]
    assert summarize(points)["ppo"]["verdict"] == "dominates"
    assert summarize(length_controlled(points))["ppo"]["verdict"] == "is dominated by"
    assert "DPO is dominated by PPO (learned RM)" in length_markdown(points)
