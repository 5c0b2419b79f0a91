"""`directpo demo`: the built-in task learns (held-out accuracy from 0 to ≥ 0.8), and a healthy run
raises no health alarm."""
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
