"""`directpo demo`: the built-in task learns (held-out accuracy from 0 to ≥ 0.8), and a healthy run
raises no health alarm."""
import pytest

from directpo.cli import main


def test_demo_learns_and_raises_no_alarm(tmp_path, capsys, one_thread):
    assert main(["demo", "--output-dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "health alarms: none" in out
    import json

    done = json.loads((tmp_path / "demo" / "dpo" / "run_complete.json").read_text())
    assert done["alerts"] == [] and done["eval"]["rewards/accuracies"] >= 0.8
    lines = [json.loads(x) for x in open(tmp_path / "demo" / "dpo" / "metrics.jsonl")]
    assert not any("alerts" in x for x in lines)
    assert lines[0]["split"] == "eval" and lines[0]["rewards/accuracies"] == 0.0  # policy = reference at step 0


@pytest.mark.slow
def test_colours_demo_reads_the_pictures(tmp_path, capsys):
    """`directpo demo --task colours` (issue #30): vision-language DPO on a tiny Qwen2-VL, offline;
    the chosen answer names the picture's colour, so held-out accuracy ≥ 0.9 needs the picture."""
    assert main(["demo", "--task", "colours", "--output-dir", str(tmp_path / "demo"), "--steps", "30"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out
    from directpo.vision import load_processor

    assert load_processor(str(tmp_path / "demo" / "dpo")).image_processor is not None  # saved with the model
