"""The judge floor (refuse win rates from a judge under 0.65 held-out accuracy unless --force) and the
table of the paper's dialogue findings, each verdict generated from constructed results."""
import json

import pytest

from directpo.errors import UserError
from directpo.experiments.winrate.config import DialogueConfig
from directpo.experiments.winrate.findings import NOT_REPRODUCED, NOT_TESTABLE, REPRODUCED, check_judge_floor, \
    findings


def wp(method, t, rate, half=0.05, knob=None):
    return {"method": method, "knob": knob, "temperature": t, "win_rate": rate, "win_rate_ci": [rate - half, rate + half]}


def info(accuracy):
    return {"rm": {"rm": "rm", "heldout_accuracy": accuracy}}


def verdicts(points, accuracy=0.7, **settings):
    return [v for _, v, _ in findings(points, info(accuracy), DialogueConfig(output_dir="x", **settings))]


def test_findings_follow_the_intervals():
    robust_and_good = [wp("dpo", 0.0, 0.70), wp("dpo", 1.0, 0.66), wp("preferred_ft", 0.0, 0.55),
                       wp("best_of_n", 0.0, 0.72, knob=128)]
    assert verdicts(robust_and_good) == [REPRODUCED, REPRODUCED, REPRODUCED, REPRODUCED]
    # DPO falls with temperature, overlaps Preferred-FT, straddles 0.5; no Best-of-128 run
    falling = [wp("dpo", 0.0, 0.53), wp("dpo", 1.0, 0.30), wp("preferred_ft", 0.0, 0.50),
               wp("best_of_n", 0.0, 0.80, knob=16)]
    assert verdicts(falling) == [NOT_REPRODUCED, NOT_TESTABLE, NOT_REPRODUCED, NOT_REPRODUCED]
    below_bon = [wp("dpo", 0.0, 0.6), wp("best_of_n", 0.0, 0.9, knob=128)]
    assert verdicts(below_bon)[1] == NOT_REPRODUCED


def test_a_judge_below_the_floor_is_refused_unless_forced():
    cfg = DialogueConfig(output_dir="x")
    assert cfg.judge_floor == 0.65
    with pytest.raises(UserError, match=r"58\.6% .*below --judge-floor 0\.65.*--force"):
        check_judge_floor(info(0.586), cfg)
    check_judge_floor(info(0.7), cfg)  # above: fine
    check_judge_floor(info(0.586), DialogueConfig(output_dir="x", force=True))
    check_judge_floor({"rm": {"heldout_accuracy": 0.5}}, DialogueConfig(output_dir="x", judge_classifier="c"))
    # forced through: every finding is "not testable here", whatever the win rates say
    points = [wp("dpo", 0.0, 0.9), wp("preferred_ft", 0.0, 0.5)]
    assert set(verdicts(points, accuracy=0.586, force=True)) == {NOT_TESTABLE}


def test_report_only_refuses_then_reports_marked_with_force(tmp_path):
    from directpo.cli import main

    out = tmp_path / "hh"
    out.mkdir()
    points = [wp("preferred_ft", 0.0, 0.6), wp("dpo", 0.0, 0.7)]
    for p in points:
        p.update(length_mean=20.0, judge_kind="local reward model")
    (out / "points.json").write_text(json.dumps(points))
    evaluation = {"judge": "local reward model", "judge_kind": [], "kl": {"dpo": 1.0, "preferred_ft": 0.0},
                  "reference_length": 30.0, "samples": []}
    summary_info = {"data": {"source": "d", "eval_source": "d", "synthetic": False, "rows_read": 10, "skipped": 0,
                             "single_turn": True, "train_pairs": 8, "train_prompts": 8, "eval_prompts": 2},
                    "base": {"base": str(out / "base")}, "sft": {"sft": "sft", "steps": 1},
                    "rm": {"rm": "rm", "steps": 1, "heldout_accuracy": 0.6}, "dpo": {"dpo": "dpo", "steps": 1},
                    "evaluation": evaluation}
    (out / "summary.json").write_text(json.dumps({"info": summary_info, "seconds": 60.0}))
    argv = ["experiment", "dialogue", "--report-only", "--output-dir", str(out), "--temperatures", "0"]
    assert main(argv) == 2 and not (out / "summary.md").exists()
    assert main(argv + ["--force"]) == 0
    md = (out / "summary.md").read_text()
    assert "BELOW THE FLOOR" in md and "| DPO beats Preferred-FT | not testable here |" in md


@pytest.mark.usefixtures("one_thread")
def test_a_study_refuses_its_judge_before_training_dpo(tmp_path, capsys):
    """The judge's floor is checked as soon as the judge is trained: no DPO or PPO run is spent on a
    study whose win rates could not be reported."""
    from conftest import HH_FILE
    from directpo.cli import main
    from directpo.runfiles import read_metrics

    if not HH_FILE.exists():
        pytest.skip(f"real HH data not found at {HH_FILE}")
    out = tmp_path / "hh"
    argv = ["experiment", "dialogue", "--preset", "smoke", "--output-dir", str(out), "--no-progress", "--threads", "1",
            "--data", str(HH_FILE), "--judge-floor", "1.0", "--temperatures", "1", "--bon-ns", ""]
    assert main(argv) == 2
    accuracy = read_metrics(out / "judge", split="eval")[-1]["accuracy"]
    assert accuracy < 1.0  # (the 3-step smoke judge)
    assert f"{accuracy:.1%} of the held-out pairs, below --judge-floor 1" in capsys.readouterr().err
    assert (out / "judge" / "model.safetensors").exists() and not (out / "dpo").exists() and not (out / "ppo").exists()
