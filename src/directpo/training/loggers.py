"""Where a run's metrics go besides metrics.jsonl: `--report-to none|tensorboard|wandb`.

    make_logger(report_to, run_dir, config) -> a logger with .log(scalars, step, split) and .close()

    none         nothing (metrics.jsonl is always written)
    tensorboard  event files in RUN_DIR/tensorboard/ (`tensorboard --logdir RUN_DIR`), tags
                 `train/loss`, `eval/rewards/accuracies`, ...; the settings as text
    wandb        a Weights & Biases run in RUN_DIR/wandb/, offline unless WANDB_MODE says otherwise
                 (`wandb sync RUN_DIR/wandb/offline-run-*` uploads it later); project from
                 WANDB_PROJECT (default: directpo), the settings as the run's config

Both back ends are optional (`pip install 'directpo[report]'`); asking for one that is not
installed is a ValueError saying so, raised by `check_report_to` before anything loads.
Only numbers are logged: strings (the split), booleans and None are skipped.
"""
from __future__ import annotations

import importlib.util
import json
import os
from numbers import Real
from pathlib import Path

from ..errors import UserValueError

REPORT_TO = ("none", "tensorboard", "wandb")
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}
SKIPPED_KEYS = frozenset({"step", "split"})  # the record's coordinates, not metrics


def check_report_to(report_to: str) -> None:
    """A known back end whose package is installed, else a ValueError saying what to do."""
    if report_to not in REPORT_TO:
        raise UserValueError(f"--report-to must be one of {', '.join(REPORT_TO)}; got {report_to!r}")
    package = _PACKAGE.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise UserValueError(f"--report-to {report_to} needs `pip install 'directpo[report]'` (the {package} package "
                             "is not installed)")


def scalars_of(record: dict) -> dict[str, float]:
    """The numeric entries of a metrics record (not its step or split)."""
    return {k: float(v) for k, v in record.items()
            if k not in SKIPPED_KEYS and isinstance(v, Real) and not isinstance(v, bool)}


class NullLogger:
    """--report-to none."""

    def log(self, scalars: dict, step: int, split: str = "train") -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Scalars as `split/name` into RUN_DIR/tensorboard/. On resume (`start_step` > 0) the events
    a killed run wrote after its checkpoint are purged from view, as the steps are redone."""

    def __init__(self, run_dir: str | Path, config: dict | None = None, start_step: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserValueError("--report-to tensorboard needs `pip install 'directpo[report]'`") from None
        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=start_step + 1 if start_step else None)
        if config and not start_step:
            self.writer.add_text("settings", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, scalars: dict, step: int, split: str = "train") -> None:
        for k, v in scalars_of(scalars).items():
            self.writer.add_scalar(f"{split}/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A W&B run in RUN_DIR/wandb/: offline (nothing leaves the machine) unless WANDB_MODE is set."""

    def __init__(self, run_dir: str | Path, config: dict | None = None, project: str | None = None):
        try:
            import wandb
        except ImportError:
            raise UserValueError("--report-to wandb needs `pip install 'directpo[report]'`") from None
        mode = os.environ.get("WANDB_MODE") or "offline"
        self.run = wandb.init(project=project or os.environ.get("WANDB_PROJECT") or "directpo", dir=str(run_dir),
                              config=config or {}, mode=mode, name=Path(run_dir).resolve().name)

    def log(self, scalars: dict, step: int, split: str = "train") -> None:
        values = {f"{split}/{k}": v for k, v in scalars_of(scalars).items()}
        if values:
            self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def make_logger(report_to: str, run_dir: str | Path, config: dict | None = None, start_step: int = 0):
    """The logger for `--report-to`: `.log(scalars, step, split)` for each metrics record, `.close()`
    at the end. `config`: the run's settings (directpo_config.json), shown beside the curves."""
    check_report_to(report_to)
    if report_to == "tensorboard":
        return TensorBoardLogger(run_dir, config, start_step)
    if report_to == "wandb":
        return WandbLogger(run_dir, config)
    return NullLogger()
