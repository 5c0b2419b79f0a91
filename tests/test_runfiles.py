"""`directpo.runfiles`: the one reader of metrics.jsonl."""
import json

import pytest

from directpo.runfiles import read_metrics


def test_read_metrics_by_split_and_torn_last_line(tmp_path):
    lines = [{"split": "eval", "step": 0}, {"split": "train", "step": 1}, {"step": 2}, {"split": "eval", "step": 2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"split": "tr')
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 2]
    assert [r["step"] for r in read_metrics(tmp_path, split="eval")] == [0, 2]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl", split="train")] == [1, 2]  # PPO: no split
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl, line 2: not JSON"):
        read_metrics(tmp_path)
