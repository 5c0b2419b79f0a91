"""Reward–KL frontiers: the step frontier's mean height, and dominance with error bars."""
import json

import numpy as np
import pytest

from directpo.experiments.frontier import compare_frontiers, frontier_at, frontier_mean, markdown, plot_frontier, \
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
    assert [set(p) for p in loaded] == [{"method", "knob", "step", "kl", "kl_se", "reward", "reward_se", "length"}] * 4
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    assert (tmp_path / "points.csv").read_text().splitlines()[0] == "method,knob,step,kl,kl_se,reward,reward_se,length"
    comps = summarize(points)
    assert set(comps) == {"ppo", "best_of_n"}
    md = markdown(points, comps, "# title")
    assert "PPO (learned RM)" in md and "Best-of-N" in md and "≤ 0.80" in md
