"""The files of a run's output folder, by name, and the one reader of its metrics.

    directpo_config.json   every setting of the run and what it derived (`training.rundir.RunDir.record_config`)
    metrics.jsonl          one JSON object a line: each training step ("split": "train"; PPO's lines
                           have no "split") and each evaluation ("split": "eval"), with "step"
    run_complete.json      written last: the run finished; its summary
    checkpoints/           step-NNNNNNNN/ folders (`training.checkpoint`)

Every module that reads these asks here (`read_metrics`, `is_complete`) instead of parsing them
itself.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserValueError

CONFIG_FILE = "directpo_config.json"
METRICS_FILE = "metrics.jsonl"
COMPLETE_MARKER = "run_complete.json"
_SPLITS = ("train", "eval")


def is_complete(output_dir: str | Path) -> bool:
    """Whether the run in `output_dir` finished (its completion marker is written last)."""
    return (Path(output_dir) / COMPLETE_MARKER).exists()


def read_summary(output_dir: str | Path) -> dict:
    """What a finished run's run_complete.json records."""
    return json.loads((Path(output_dir) / COMPLETE_MARKER).read_text())


def metrics_path(run: str | Path) -> Path:
    """A run directory's metrics.jsonl (a metrics file itself is taken as it is)."""
    run = Path(run)
    if run.is_dir():
        path = run / METRICS_FILE
        if not path.exists():
            raise FileNotFoundError(f"{run}: no {METRICS_FILE} (is it a directpo run directory?)")
        return path
    if run.is_file():
        return run
    raise FileNotFoundError(f"{run}: no such run directory")


def read_metrics(path: str | Path, split: str | None = None) -> list[dict]:
    """The records of a metrics.jsonl (or of a run folder's), in file order; only those of `split`
    ("train", "eval") when given. A line that is not a JSON object with an
    integer "step" is a ValueError naming the file and the line; blank lines are skipped, and so
    is an unfinished last line (no newline yet: the run is writing it)."""
    path = metrics_path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):  # the last line, without its newline: still being written
                continue
            raise UserValueError(f"{path}, line {n}: not JSON ({e.msg}): {_short(line)}") from None
        if not isinstance(rec, dict):
            raise UserValueError(f"{path}, line {n}: expected a JSON object, got {type(rec).__name__}: {_short(line)}")
        step = rec.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise UserValueError(f"{path}, line {n}: no integer \"step\" (got {step!r}): {_short(line)}")
        kind = rec.get("split", "train")
        if kind not in _SPLITS:
            raise UserValueError(f"{path}, line {n}: \"split\" must be train or eval, got {kind!r}")
        if split is None or split == kind:
            records.append(rec)
    return records


def _short(line: str, limit: int = 80) -> str:
    line = line.strip()
    return line if len(line) <= limit else line[:limit - 3] + "..."


