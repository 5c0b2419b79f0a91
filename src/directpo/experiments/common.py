"""What the paper's studies share: their output folder (checked and locked), the trainer settings
of their runs, a resumable `train`, a step clock, reading JSONL, comma-separated numbers, and finding the data shipped next to the
checkout. Torch and the trainers are imported where they are used (`--help` loads neither)."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

from .. import outputs
from ..config import input_paths
from ..console import log
from ..diskio import write_text
from ..errors import UserValueError

NO_LOG_LINES = 10 ** 9  # a study logs its own progress; trainers' per-step lines are off


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def parse_numbers(text: str, name: str) -> list[float]:
    """The comma-separated numbers of setting `name` (e.g. --dpo-betas 0.1,1.0)."""
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UserValueError(f"--{name.replace('_', '-')}: expected comma-separated numbers, got {text!r}") from None


STUDY_RECORD = "study_config.json"


@contextmanager
def study_dir(cfg, command: str):
    """The study's output folder for the length of the `with` block: refused when it holds someone
    else's files or is an input's folder (`outputs.check_output_dir`), made, and locked, so two
    studies never share it. A study continues in its own folder (it has no --overwrite)."""
    out = Path(cfg.output_dir)
    outputs.check_output_dir(out, input_paths(cfg), None, markers=(STUDY_RECORD, outputs.LOCK_FILE),
                             what="directpo study")
    with outputs.RunLock(out, command):
        yield out


def shared_run_settings(cfg) -> dict:
    """The trainer settings every training run of a study shares (from its precision, device,
    threads, seed, progress and max_length settings)."""
    return dict(precision=cfg.precision, device=cfg.device, threads=cfg.threads, seed=cfg.seed,
                progress=cfg.progress, log_every=NO_LOG_LINES, max_length=cfg.max_length)


def continue_run(output_dir) -> dict:
    """The resume settings of a study's stage run: from its last checkpoint; a run stopped before
    its first checkpoint has nothing to continue from, so it is started again (its partial log
    replaced, said in the log) instead of stopping the whole study on `--resume`'s refusal."""
    from ..training.checkpoint import latest_checkpoint
    from ..training.run import METRICS_FILE, is_complete

    out = Path(output_dir)
    if (out / METRICS_FILE).exists() and not is_complete(out) and latest_checkpoint(out) is None:
        log(f"{out}: stopped before its first checkpoint: started again")
        return {"resume": None, "overwrite": True}
    return {"resume": "latest"}


def train_resumable(**settings) -> dict:
    """`train` that continues a killed run from its last checkpoint, and skips a finished one (its
    completion record returned)."""
    from ..training.config import TrainConfig
    from ..training.loop import train
    from ..training.run import COMPLETE_MARKER, is_complete

    out = Path(settings["output_dir"])
    if is_complete(out):
        return json.loads((out / COMPLETE_MARKER).read_text())
    return train(TrainConfig(**continue_run(out), **settings))


class StudyClock:
    """Logs each step of a study as it starts, and adds up the seconds spent per step name.

    With `record` (OUT/study_time.json) the study's time survives resuming: the seconds of earlier
    sessions are read back and the running total is written after every step, so a study killed and
    continued reports the time it took in all, not the few seconds its last session spent reading
    finished stages back."""

    def __init__(self, study: str, n_stages: int, record: Path | None = None):
        self.study, self.n_stages, self.record = study, n_stages, record
        self.before = json.loads(record.read_text())["seconds"] if record is not None and record.exists() else 0.0
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start

    def step(self, number: int, name: str, fn, *args):
        log(f"{self.study}: stage {number}/{self.n_stages}: {name}  ({self.elapsed():.0f} s so far)")
        began = time.perf_counter()
        result = fn(*args)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - began
        if self.record is not None:
            write_text(self.record, json.dumps({"seconds": self.elapsed()}))
        return result


def find_shared(relative: Path, here: Path) -> Path | None:
    """`relative` (e.g. shared/data/sst/...) in the working directory or a directory above it, else
    above `here` (the calling module): data shipped next to the checkout, found wherever the study is
    started from. None when absent (the caller's error names its flag)."""
    for base in dict.fromkeys((Path.cwd(), *Path.cwd().parents, *here.parents)):
        candidate = base / relative
        if candidate.exists():
            return candidate
    return None


def relative_to(path: str, root: str) -> str:
    """`sft` for OUTPUT/sft: a report does not depend on where the study ran."""
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return path
