"""Reward–KL frontiers: the hull of each method's points, the gap between two hulls, crossings and dominance."""
import json
import statistics

import numpy as np
import pytest

from directpo.experiments.frontier import budget_markdown, budget_table, budget_verdict, compare_frontiers, \
    crossing_text, frontier_at, hull, hull_difference, hull_of, length_controlled, length_fit, length_markdown, markdown, plot_frontier, predict_at, \
    summarize, write_points


def pt(method, kl, reward, kl_se=0.0, reward_se=0.0, knob=None, step=0):
    return {"method": method, "knob": knob, "step": step, "kl": kl, "kl_se": kl_se, "reward": reward,
            "reward_se": reward_se, "length": 10.0}


def test_hull_is_the_upper_envelope_made_flat_past_the_best_point():
    # (1, 2) is above the line from (0, 0) to (3, 3.5)? the line is at 1.17 there: kept; (2, 2.1) is below
    # the line (1, 2)–(3, 3.5) (2.75 at KL 2): dropped; after the best point, flat to the largest KL
    xs, ys = hull([1.0, 2.0, 3.0, 5.0], [2.0, 2.1, 3.5, 1.0], 0.0)
    assert xs.tolist() == [0.0, 1.0, 3.0, 5.0] and ys.tolist() == [0.0, 2.0, 3.5, 3.5]
    # a negative KL (sampling noise) counts as 0; the same KL twice keeps the higher reward
    xs, ys = hull([-0.1, 2.0, 2.0], [0.5, 1.0, 1.5], 0.0)
    assert xs.tolist() == [0.0, 2.0] and ys.tolist() == [0.5, 1.5]
    # straight lines between points: a method with one point at KL 2 is at half its gain at KL 1
    assert frontier_at([pt("a", 2.0, 1.0)], 1.0, 0.0) == pytest.approx(0.5)
    assert frontier_at([pt("a", 2.0, 1.0)], 9.0, 0.0) == pytest.approx(1.0)


def test_two_crossing_lines_cross_where_they_meet():
    start = pt("sft", 0.0, 0.0)
    # a: steep then flat (0,0)-(2,2)-(6,2.4); b: a straight line to (6, 3) with slope 0.5; they meet where
    # 2 + 0.1 (k − 2) = 0.5 k, k = 4.5
    a = [pt("dpo", 2.0, 2.0, 0.01, 0.01), pt("dpo", 6.0, 2.4, 0.01, 0.01)]
    b = [pt("ppo", 6.0, 3.0, 0.01, 0.01)]
    c = compare_frontiers(a, b, start)
    assert c["kl_range"] == 6.0 and c["crossings"] == [pytest.approx(4.5)]
    assert c["verdict"] == "crosses" and c["first_sign"] == 1
    # the exact mean gap: ∫ a − ∫ b over [0, 6], over 6
    area_a, area_b = 2.0 + (2.0 + 2.4) / 2 * 4, 3.0 * 6 / 2
    assert c["diff"] == pytest.approx((area_a - area_b) / 6)
    assert c["min"] == pytest.approx(2.4 - 3.0) and c["max"] == pytest.approx(2.0 - 1.0)
    assert "4.50" in crossing_text(c) and "above" in crossing_text(c)


def test_one_hull_above_the_other_everywhere_dominates():
    start = pt("sft", 0.0, 0.0)
    better = [pt("dpo", 1.0, 1.0, 0.01, 0.01), pt("dpo", 2.0, 1.5, 0.01, 0.01)]
    worse = [pt("ppo", 1.0, 0.5, 0.01, 0.01), pt("ppo", 4.0, 2.0, 0.01, 0.01)]
    c = compare_frontiers(better, worse, start)
    assert c["kl_range"] == 2.0 and c["crossings"] == []  # the range both reach
    assert c["diff"] == pytest.approx((0.5 + 1.25) / 2 - 0.5)  # hull areas 1.75 and 1.0 over [0, 2]
    assert c["verdict"] == "dominates" and 0 < c["diff_se"] < 0.05
    assert compare_frontiers(worse, better, start)["verdict"] == "is dominated by"
    noisy = [pt("ppo", 1.0, 0.5, 0.5, 2.0), pt("ppo", 2.0, 1.0, 0.5, 2.0)]
    assert compare_frontiers(better, noisy, start)["verdict"] == "ties with"  # above everywhere, within error


def test_few_points_are_not_penalised_against_many_on_the_same_line():
    """A method measured at 2 KLs against one measured at 20 on the same line: no gap, no crossing, a tie
    (a step frontier would have put the sparse one below between its points)."""
    start = pt("sft", 0.0, 0.0)
    many = [pt("dpo", k, 0.3 * k, 0.01, 0.01) for k in np.linspace(0.25, 5.0, 20)]
    few = [pt("ppo", 2.5, 0.75, 0.01, 0.01), pt("ppo", 5.0, 1.5, 0.01, 0.01)]
    c = compare_frontiers(many, few, start)
    assert c["diff"] == pytest.approx(0.0, abs=1e-9) and c["crossings"] == [] and c["verdict"] == "ties with"
    assert hull_difference(hull_of(many, 0.0), hull_of(few, 0.0))["max"] == pytest.approx(0.0, abs=1e-9)


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


def seeded(points, seed):
    return [dict(p, seed=seed, reward_lc=p["reward"], reward_lc_se=p["reward_se"]) for p in points]


def test_pooled_verdicts_come_from_the_seeds_and_say_no_more_than_their_interval():
    from directpo.experiments.sentiment.seeds import pool

    points = []
    for s, lift in enumerate((0.30, 0.32, 0.28, 0.31)):  # DPO's hull clearly above Unlikelihood's in every seed
        points += seeded([pt("sft", 0.0, 0.0, reward_se=0.01), pt("dpo", 2.0, lift * 2, 0.01, 0.01),
                          pt("dpo", 6.0, lift * 2 + 0.1, 0.01, 0.01),
                          pt("unlikelihood", 2.0, 0.2, 0.01, 0.01),
                          # PPO-GT: below DPO at low KL, above past the crossing in two seeds, below in two
                          pt("ppo_gt", 1.0, 0.1, 0.01, 0.01), pt("ppo_gt", 4.0, 0.8 + (0.4 if s % 2 else -0.4), 0.01, 0.01)],
                         s)
    pooled = pool(points, [0, 1, 2, 3])
    ul = pooled["unlikelihood"]
    assert ul["interval"]["n"] == 4 and ul["interval"]["low"] > 0 and ul["interval"]["positive"] == 4
    assert ul["verdict"].startswith("DPO dominates in every seed")
    assert ul["grid"][1.0]["mean"] == pytest.approx(statistics.fmean(
        [lift - 0.1 for lift in (0.30, 0.32, 0.28, 0.31)]))  # the hulls at KL 1: lift·1 vs 0.2·0.5
    assert ul["grid"][4.0]["n"] == 0  # past the range both reach: nothing pooled
    gt = pooled["ppo_gt"]
    assert all(gt["crossings_by_seed"][s] for s in (1, 3)) and not any(gt["crossings_by_seed"][s] for s in (0, 2))
    assert gt["verdict_by_seed"][0] == "dominates" and "dominates" not in gt["verdict"]
    assert gt["verdict"].endswith("hulls cross in 2 of 4 seeds")


def test_budget_rule_decisions_on_constructed_points():
    from directpo.experiments.sentiment.budgets import coverage_decisions, plateaued, ppo_action, settings_counts, \
        step_flops
    from directpo.experiments.sentiment.config import SentimentConfig, preset_defaults

    points = [pt("sft", 0.0, 0.0), pt("dpo", 3.0, 0.5), pt("dpo", 8.0, 0.7), pt("ppo_gt", 5.0, 0.6),
              pt("ppo", 9.0, 0.4), pt("best_of_n", 1.8, 0.3)]
    d = coverage_decisions(points)
    assert d["dpo"] == {"reach": 8.0, "target": 9.0, "short": True}  # PPO went further: DPO trains on
    assert d["ppo_gt"]["short"] and not d["ppo"]["short"] and "best_of_n" not in d
    assert not coverage_decisions(points, compared={"dpo", "ppo_gt"})["dpo"]["short"]  # only PPO-GT compared
    assert not coverage_decisions(points, cover=0.0)["dpo"]["short"]  # off
    # PPO-type: train on while short, rising and within DPO's FLOPs
    short = d["ppo_gt"]
    assert ppo_action(short, [0.3, 0.5], [0.01, 0.01], 1e12, 2e12) == "train on"
    assert ppo_action(short, [0.5, 0.51], [0.01, 0.01], 1e12, 2e12) == "plateau"  # gain within 2 s.e.
    assert ppo_action(short, [0.3, 0.5], [0.01, 0.01], 2e12, 2e12) == "FLOP budget"
    assert ppo_action(d["ppo"], [0.3, 0.5], [0.01, 0.01], 0, 1) == "covers"
    assert not plateaued([0.4], [0.01])
    cfg = SentimentConfig(output_dir="x", **preset_defaults("cpu-small"))
    assert step_flops(cfg, "dpo") > step_flops(cfg, "unlikelihood") > step_flops(cfg, "preferred_ft")
    assert step_flops(cfg, "ppo") > step_flops(cfg, "ppo_gt")  # the learned RM's forward
    counts = settings_counts(cfg)
    assert set(counts) == {"dpo", "unlikelihood", "ppo", "ppo_gt"} and len(set(counts.values())) == 1


def test_hull_gap_error_is_a_paired_prompt_bootstrap_when_points_carry_per_prompt_rewards():
    """Every method evaluated on the same 300 prompts with a large shared prompt effect: the paired
    bootstrap's s.e. of the gap is far below what the points' own (unpaired) errors give, and the
    gap itself is unchanged; without per-prompt rewards the point errors are used."""
    rng = np.random.default_rng(0)
    effect = rng.normal(0, 0.5, size=300)

    def point(method, kl, lift):
        r = effect + lift + rng.normal(0, 0.05, size=300)
        return dict(pt(method, kl, float(r.mean()), 0.0, float(r.std(ddof=1) / np.sqrt(300))), prompt_rewards=r.tolist())

    start, a, b = point("sft", 0.0, 0.0), [point("dpo", 2.0, 0.3)], [point("ppo", 2.0, 0.2)]
    paired = compare_frontiers(a, b, start)
    strip = [{k: v for k, v in p.items() if k != "prompt_rewards"} for p in (start, *a, *b)]
    unpaired = compare_frontiers(strip[1:2], strip[2:], strip[0])
    assert paired["error"] == "prompt bootstrap (paired)" and unpaired["error"] == "point errors"
    assert paired["diff"] == pytest.approx(unpaired["diff"])
    assert paired["diff_se"] < unpaired["diff_se"] / 4
    assert paired["diff_ci"][0] < paired["diff"] < paired["diff_ci"][1]
    assert paired["verdict"] == "dominates"  # the 0.05 lead (half of 0.1 over [0, 2]) is clear once paired
    assert length_controlled([dict(start, reward_lc=0.1, reward_lc_se=0.01)])[0]["prompt_rewards"] is None


def test_study_settings_of_the_budget_rule_are_checked():
    from directpo.experiments.sentiment.config import SentimentConfig, preset_defaults

    with pytest.raises(ValueError, match="--cover-methods: unknown ppo_typo"):
        SentimentConfig(output_dir="x", cover_methods="dpo,ppo_typo", **preset_defaults("smoke")).validate()
    SentimentConfig(output_dir="x", fixed_length=True, methods="dpo,online_dpo", **preset_defaults("smoke")).validate()
