"""A run's output directory: claimed before anything is written (`outputs`: never an input's folder
nor someone else's files; one run per folder), the recorded settings (directpo_config.json),
metrics.jsonl, checkpoints with --save-every/--keep-last, --resume (only with the settings the
checkpoint was made with), the precision the run computes in, and the completion marker written
last. Only the main process (rank 0) writes.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from .. import __version__
from ..config import changed_settings, input_paths
from ..console import log
from ..diskio import write_text
from ..errors import UserValueError
from ..outputs import RunLock, RunLockedError, check_output_dir
from ..runfiles import (  # noqa: F401
    COMPLETE_MARKER,
    CONFIG_FILE,
    METRICS_FILE,
    is_complete,
    read_metrics,
)
from .card import invoked_command_line, recorded_alerts, write_model_card
from .checkpoint import (checkpoint_state, latest_checkpoint, load_checkpoint, remove_checkpoints, save_checkpoint,
                         save_sharded_checkpoint)
from .distributed import Dist
from .hub import push_to_hub
from .loggers import make_logger


class _Closing:
    """`with x:` closes x at the end, however the block ends."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class MetricsLog(_Closing):
    """metrics.jsonl, one JSON object a line, flushed as written (rank 0 writes; others no-op)."""

    def __init__(self, path: Path | None, start_step: int = 0, logger=None):
        self.file, self.logger = None, logger
        if path is None:
            return
        if start_step and path.exists():  # resuming: drop the lines of steps after the checkpoint (redone)
            # (a line the killed run left unfinished is dropped with the rest)
            keep = [json.dumps(r) + "\n" for r in read_metrics(path) if r["step"] <= start_step]
            write_text(path, "".join(keep))
        self.file = open(path, "a" if start_step else "w")

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.logger is not None:  # --report-to: the same record to TensorBoard / W&B
            self.logger.log(record, record["step"], record.get("split", "train"))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.logger is not None:
            self.logger.close()


class RunDir:
    """A run's output directory. Only the main process (rank 0) writes to it."""

    def __init__(self, path: str | Path, main: bool = True):
        self.path, self.main = Path(path), main
        self.settings: dict = {}
        self.data_summary: str | None = None  # a paragraph on the training data, for the model card
        self.precision: dict | None = None  # --precision as asked, resolved, and why (`settle_precision`)
        self.lock: RunLock | None = None  # held from `prepare` to the end of the `with` block

    def prepare(self, cfg, command: str = "") -> None:
        """Claim the directory for this run, before anything is written: refuse one that must not be
        written into (`outputs.check_output_dir`: a file, an input's folder, a folder of someone
        else's files without --overwrite), take the run lock (a second run into the same folder is
        refused naming the first), refuse to clobber another run, make sure it can be written."""
        if not self.main:  # under torchrun rank 0 holds the lock for every process
            return
        check_output_dir(self.path, input_paths(cfg), cfg.overwrite)
        try:
            self.lock = RunLock(self.path, command).acquire()
        except RunLockedError:
            raise
        except OSError as e:
            raise PermissionError(f"cannot write to output directory {self.path}: {e.strerror or e}") from None
        # Under the lock, so a run that started and finished meanwhile is seen.
        if (self.path / METRICS_FILE).exists() and not (cfg.overwrite or cfg.resume):
            raise FileExistsError(f"{self.path} already holds a run ({METRICS_FILE}); pass --resume to continue it "
                                  "or --overwrite to replace it")
        if cfg.overwrite:  # the run starts again: until it finishes it is not complete
            (self.path / COMPLETE_MARKER).unlink(missing_ok=True)
        if cfg.overwrite and not cfg.resume:
            # The run it replaces goes with its checkpoints: left beside the new run's, a later --resume
            # would continue the old run from its (higher) step. Only directpo's step-N folders go.
            old = remove_checkpoints(self.path)
            if old:
                log(f"--overwrite: removed the {len(old)} checkpoint(s) of the run it replaces ({old[0].name} … "
                    f"{old[-1].name})")
        # A process killed while writing a checkpoint leaves its temporary directory: never a
        # checkpoint (those are renamed into place whole), so it can go.
        for tmp in (self.path / "checkpoints").glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> bool:
        """The run is over, however it ended: let go of the lock (and of a folder it made and left
        empty)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        return False

    def record_config(self, command: str, cfg, **extra) -> dict:
        """directpo_config.json: the version, the command, every setting, and what the run derived.
        --precision is recorded as asked (`auto` too, so a rerun with the same flags matches it),
        beside what it resolved to and why (`settle_precision`, which runs here if the trainer did
        not call it first)."""
        if hasattr(cfg, "precision") and self.precision is None:
            settle_precision(self, cfg, getattr(cfg, "device", None))
        settings = {"directpo_version": __version__, "command": command, **asdict(cfg), **extra}
        if self.precision is not None:
            settings.update(precision=self.precision["requested"], precision_resolved=self.precision["resolved"],
                            precision_reason=self.precision["reason"])
        if self.main:
            (self.path / CONFIG_FILE).write_text(json.dumps(settings, indent=2))
        self.settings = settings
        return settings

    def checkpoint_setting(self, cfg, name: str, default=None):
        """The value of setting `name` in the checkpoint that --resume will continue from (None:
        nothing to resume; `default` when the checkpoint predates the setting)."""
        if not cfg.resume:
            return None
        path = self._checkpoint(cfg)
        try:
            return checkpoint_state(path)["config"].get(name, default)
        except (OSError, TypeError, ValueError, KeyError):  # no checkpoint: `resume_point` says what is wrong
            return None

    def _checkpoint(self, cfg) -> Path | None:
        """The checkpoint --resume names: the latest intact one (--resume-from-last-good: past a
        damaged latest one), or the path given."""
        if cfg.resume != "latest":
            return Path(cfg.resume)
        return latest_checkpoint(self.path, last_good=getattr(cfg, "resume_from_last_good", False))

    def resume_point(self, cfg) -> Path | None:
        """The checkpoint to resume from (None: start fresh), after checking it belongs to this run:
        every setting that changes the trajectory must be the same."""
        if not cfg.resume:
            return None
        path = self._checkpoint(cfg)
        if path is None:
            if (self.path / METRICS_FILE).exists():  # a run is there: starting over would replace it
                what = "a finished run" if is_complete(self.path) else "a run"
                raise FileNotFoundError(f"--resume: no checkpoint to resume in {self.path} (it holds {what} without "
                                        "checkpoints; --save-every N writes them): pass --overwrite to start it "
                                        "again")
            log(f"--resume: no checkpoint in {self.path / 'checkpoints'}; starting from step 0")
            return None
        if not (path / "state.json").exists():
            raise FileNotFoundError(f"--resume {path}: not a checkpoint directory (no state.json)")
        saved = checkpoint_state(path)["config"]  # (checked against its manifest: a damaged file is named)
        diff = changed_settings(saved, cfg, cfg.RESUMABLE_CHANGES)
        if diff:
            raise UserValueError(f"--resume {path}: the checkpoint was made with other settings ({'; '.join(diff)}); "
                                 "resume with the same settings, or start a new run")
        return path

    def metrics(self, start_step: int) -> MetricsLog:
        logger = make_logger(self.settings.get("report_to", "none"), self.path, self.settings, start_step) \
            if self.main else None
        return MetricsLog(self.path / METRICS_FILE if self.main else None, start_step, logger)

    def save_checkpoint(self, step: int, epoch: int, model, optimizer, scheduler, cfg, dist=None,
                        sharded: bool = False, **kw) -> Path | None:
        """A checkpoint of this step (`checkpoint.py`); the path on rank 0, None elsewhere.
        `dist`: the run's `Dist`, under torchrun, where every rank must call: with
        --checkpoint-format sharded each rank writes its own shards; else, with `sharded` (an FSDP
        model), the whole state is gathered onto rank 0, which writes an ordinary checkpoint."""
        if getattr(cfg, "checkpoint_format", "full") == "sharded":
            path = save_sharded_checkpoint(self.path, step, epoch, model, optimizer, scheduler, asdict(cfg),
                                           dist or Dist(), cfg.keep_last, **kw)
            return path if self.main else None
        if sharded:
            kw["state"] = dist.gather_state(model, optimizer)  # every rank takes part; None but on rank 0
        if self.main:
            return save_checkpoint(self.path, step, epoch, model, optimizer, scheduler, asdict(cfg), cfg.keep_last,
                                   **kw)
        return None

    def complete(self, result: dict, data_summary: str | None = None, alerts: list[dict] | None = None) -> None:
        """The model card, then the completion marker, written last: a run without it did not
        finish. Then, with --push-to-hub, the upload (a failed one leaves the run complete)."""
        if not self.main:
            return
        settings = json.loads((self.path / CONFIG_FILE).read_text())  # as recorded (rm adds its offset)
        alerts = alerts if alerts is not None else recorded_alerts(self.path)  # resumed runs included
        write_model_card(self.path, settings, result, invoked_command_line(), data_summary or self.data_summary,
                         alerts)
        (self.path / COMPLETE_MARKER).write_text(json.dumps(result))
        if settings.get("push_to_hub"):
            url = push_to_hub(self.path, settings["push_to_hub"], private=settings.get("hub_private", False))
            log(f"uploaded {self.path} to {url}")

def settle_precision(run: RunDir, cfg, device, dist=None) -> str:
    """Set `cfg.precision` to what the run computes in, before anything computes: --precision
    auto resolved for `device` (`directpo.precision`); a resumed run keeps the precision its
    checkpoint was made with (resuming must not switch precision because this machine, or a
    re-probe, would now choose otherwise). Under torchrun the processes agree: bf16 only when every
    one of them chose it. Remembered on `run` for `record_config`."""
    from ..models import pick_device
    from ..precision import resolve_precision

    requested = cfg.precision
    started = run.checkpoint_setting(cfg, "precision", "fp32") if requested == "auto" else None
    if started in ("fp32", "bf16"):
        precision, reason = started, "kept from the checkpoint this run resumes"
        log(f"--precision auto: {precision} ({reason})")
    else:
        precision, reason = resolve_precision(requested, device if device is not None else pick_device(None))
    if requested == "auto" and dist is not None and dist.enabled:
        votes = dist.sum_stats({"bf16": float(precision == "bf16"), "ranks": 1.0})
        if precision == "bf16" and votes["bf16"] < votes["ranks"]:
            precision, reason = "fp32", "not every process computes bf16 fast"
            log(f"--precision auto: {precision} ({reason})")
    cfg.precision = precision
    run.precision = {"requested": requested, "resolved": precision, "reason": reason}
    return precision


def resume(run: RunDir, cfg, model, optimizer, scheduler, **kw) -> tuple[int, dict]:
    """(step, checkpoint state) to continue from: weights, optimizer, scheduler and RNG restored
    from the checkpoint `--resume` names; (0, {}) for a fresh run."""
    path = run.resume_point(cfg)
    if path is None:
        return 0, {}
    state = load_checkpoint(path, model, optimizer, scheduler, **kw)
    if run.main:  # the run goes on: until it finishes again it is not complete
        (run.path / COMPLETE_MARKER).unlink(missing_ok=True)
    log(f"resumed from {path} at step {state['step']}")
    return state["step"], state
