"""Resumable steps: a killed job continues where it stopped, and redoes nothing that finished.

Every step of a multi-stage job that is not a trainer run (trainers keep their own completion
marker and checkpoints) goes through `resumable`: its result is recorded as JSON, and the record
is written last, so it exists only for a step that finished. Used by online DPO's rounds
(`rlhf.online`) and the paper's studies (`experiments.resume` re-exports it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ..diskio import write_text

STAGE_RECORD = "done.json"


def resumable(record: Path, compute: Callable[[], Any]) -> Any:
    """`compute()`'s result, computed at most once: the JSON in `record` when it exists (the step
    finished before), else `compute()` run now, with its result written to `record` afterwards,
    atomically (a kill leaves no record, and the step is redone)."""
    record = Path(record)
    if record.exists():
        return json.loads(record.read_text())
    record.parent.mkdir(parents=True, exist_ok=True)
    result = compute()
    write_text(record, json.dumps(result))
    return result


def stage(out_dir: Path, name: str, fn: Callable[[Path], Any]) -> Any:
    """Stage `name` of the job in `out_dir`: `fn(out_dir / name)` writes its files into that
    directory (created for it) and returns what it found, recorded as `out_dir/name/done.json`."""
    stage_dir = Path(out_dir) / name
    return resumable(stage_dir / STAGE_RECORD, lambda: fn(stage_dir))
