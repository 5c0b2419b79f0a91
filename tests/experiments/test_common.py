"""What the studies share: the study clock keeps counting across a resume."""
import json
import time

from directpo.experiments.common import StudyClock


def test_study_clock_adds_the_time_of_earlier_sessions(tmp_path):
    record = tmp_path / "study_time.json"
    first = StudyClock("s", 2, record)
    first.step(1, "slow", time.sleep, 0.05)
    spent = json.loads(record.read_text())["seconds"]
    assert spent >= 0.05
    again = StudyClock("s", 2, record)  # a resumed study: its finished stages take no time now
    again.step(1, "slow", lambda: None)
    assert again.elapsed() >= spent and json.loads(record.read_text())["seconds"] >= spent
    assert StudyClock("s", 2).elapsed() < spent  # without a record: this session only
