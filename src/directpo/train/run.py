"""One run machinery for every trainer: DPO/SFT (`train.loop`), the reward model and PPO (`rlhf`).

    RunDir       the output directory: the overwrite/resume guard, the recorded settings
                 (directpo_config.json), metrics.jsonl, checkpoints with --save-every/--keep-last,
                 --resume, and the completion marker written last
    StepDriver   one optimizer step: micro-batch accumulation, the all-reduce over processes,
                 gradient clipping, the non-finite guard, optimizer and warm-up schedule
    Progress     a progress bar, or a log line every N steps

A trainer reads top to bottom as: settings -> data -> models -> RunDir.start -> for each step:
StepDriver.accumulate + StepDriver.step, metrics line, maybe evaluate, maybe checkpoint ->
save -> RunDir.complete.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..config import input_paths
from ..console import log
from ..outputs import RunLock, RunLockedError, check_output_dir
from .card import invoked_command_line, push_to_hub, recorded_alerts, write_model_card
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_sharded_checkpoint
from .distributed import Dist
from .loggers import make_logger

COMPLETE_MARKER = "run_complete.json"
CONFIG_FILE = "directpo_config.json"
METRICS_FILE = "metrics.jsonl"


def is_complete(output_dir: str | Path) -> bool:
    """Whether the run in `output_dir` finished (its completion marker is written last)."""
    return (Path(output_dir) / COMPLETE_MARKER).exists()


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient: the step was not applied."""

    user_error = True  # the CLI prints the message, no traceback


class DivergenceError(RuntimeError):
    """The loss or gradient norm exploded: the step was not applied."""

    user_error = True


class ModelDiedError(RuntimeError):
    """A fatal health alarm (`alarms.FATAL`): the model cannot recover, the run stopped."""

    user_error = True


def stop_if_fatal(alerts, cfg) -> None:
    """Stop the run on a fatal health alarm (after its metrics line is written), unless
    --no-stop-on-alarm: training on would only spend time and save a broken model as a success."""
    fatal = [a for a in alerts if a.fatal]
    if fatal and getattr(cfg, "stop_on_alarm", True):
        raise ModelDiedError(f"{fatal[0]}. Stopped: no final model saved, earlier checkpoints as they were "
                             "(--no-stop-on-alarm trains on)")


class BrokenWeightsError(RuntimeError):
    """NaN/inf or exploded weights found before a save: nothing was written."""

    user_error = True


def _local(p: torch.Tensor) -> torch.Tensor:
    """A parameter's tensor on this process (the local shard of an FSDP DTensor)."""
    return p.to_local() if hasattr(p, "to_local") else p


class Interrupted(RuntimeError):
    """Ctrl-C (or SIGTERM) stopped the run after a checkpoint."""

    user_error = True
    exit_code = 130


class StopRequest:
    """Ctrl-C or SIGTERM during training: the first finishes the current step, after which the
    trainer saves a checkpoint and stops (`Interrupted`); a second stops at once. Under torchrun the
    request is agreed over all processes, so they stop at the same step."""

    def __init__(self):
        self.flag, self.saved = False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.flag:  # the second one: stop now
            raise KeyboardInterrupt
        self.flag = True
        log("stopping after this step (a checkpoint will be saved; press Ctrl-C again to stop at once)")

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        return False

    def requested(self, dist=None) -> bool:
        if dist is not None and dist.enabled:
            return dist.sum_stats({"stop": float(self.flag)})["stop"] > 0
        return self.flag


def setup_torch(threads: int, seed: int) -> None:
    """Thread count and the global seed, the first thing every trainer does."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)


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
            keep = [line for line in open(path) if line.strip() and json.loads(line)["step"] <= start_step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, path)
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
        path = latest_checkpoint(self.path) if cfg.resume == "latest" else Path(cfg.resume)
        try:
            return json.loads((path / "state.json").read_text())["config"].get(name, default)
        except (OSError, TypeError, ValueError, KeyError):  # no checkpoint: `resume_point` says what is wrong
            return None

    def resume_point(self, cfg) -> Path | None:
        """The checkpoint to resume from (None: start fresh), after checking it belongs to this run:
        every setting that changes the trajectory must be the same."""
        if not cfg.resume:
            return None
        path = latest_checkpoint(self.path) if cfg.resume == "latest" else Path(cfg.resume)
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
        saved = json.loads((path / "state.json").read_text())["config"]
        now = asdict(cfg)
        # A setting the checkpoint does not record (made by an earlier directpo) had its default then.
        defaults = {f.name: f.default for f in fields(cfg)}
        diff = [f"{k}: {saved.get(k, defaults[k])!r} -> {now[k]!r}" for k in now
                if k not in cfg.RESUMABLE_CHANGES and saved.get(k, defaults[k]) != now[k]]
        if diff:
            raise ValueError(f"--resume {path}: the checkpoint was made with other settings ({'; '.join(diff)}); "
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


class StepDriver:
    """One optimizer step, the same for every trainer.

    `accumulate` runs forward/backward over the micro-batches of a batch, each loss divided by the
    whole batch's size, so the accumulated gradient is the full batch mean's whatever the split.
    `step` sums gradients (and metric sums) over processes, clips the global norm, and applies the
    update, unless the loss or gradient is not finite: then nothing touches the weights, and the
    step is skipped (counted) or the run stops with `NonFiniteError`.
    """

    def __init__(self, params, optimizer, scheduler, max_grad_norm: float, dist=None, sharded: bool = False,
                 skip_nonfinite: bool = False, divergence_factor: float = 0.0, hint: str = ""):
        self.params = [p for p in params if p.requires_grad]
        self.optimizer, self.scheduler, self.max_grad_norm = optimizer, scheduler, max_grad_norm
        self.dist, self.sharded, self.skip_nonfinite = dist, sharded, skip_nonfinite
        self.divergence_factor, self.hint = divergence_factor, hint
        self.first: tuple[float, float] | None = None  # (|loss|, gradient norm) of the first applied step
        self.skipped = self.applied = 0
        # Each trainable tensor's largest |value| as the run (or its resumption) starts: what
        # `check_weights` measures growth against.
        with torch.no_grad():
            self.start_absmax = [float(_local(p).abs().max()) if p.numel() else 0.0 for p in self.params]

    def accumulate(self, micro_batches, loss_of: Callable, batch_size: int) -> dict[str, float]:
        """Σ of the micro-batches' metric sums; `loss_of(mb) -> (per-example losses, metric sums)`."""
        sums: dict[str, float] = {}
        for mb in micro_batches:
            losses, stats = loss_of(mb)
            (losses.sum() / batch_size).backward()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
        return sums

    def step(self, sums: dict[str, float], where: Callable[[], str] = lambda: "") -> tuple[dict, float | None, float]:
        """(metric sums over all processes, gradient norm or None when skipped, lr of this step)."""
        if self.dist is not None:
            self.dist.all_reduce_grads(self.params)
            sums = self.dist.sum_stats(sums)
        if self.sharded:
            grad_norm = self.dist.clip_grad_norm(self.params, self.max_grad_norm)
        else:
            limit = self.max_grad_norm if self.max_grad_norm > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, limit)
        lr = self.scheduler.get_last_lr()[0]
        loss = sums.get("loss", 0.0)
        if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):
            self._non_finite("loss" if not math.isfinite(loss) else "gradient norm", where())
            return sums, None, lr
        self._check_divergence(abs(loss), float(grad_norm), where)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.applied += 1
        return sums, float(grad_norm), lr

    def check_weights(self, what: str, growth: float = 1e3) -> None:
        """Before `what` (a checkpoint, the final model) is saved: every trainable weight finite, and
        none over `growth` times the largest |value| its tensor had when the run started (floored at
        1, so weights that start at 0, LoRA's B, may grow). A broken model is never saved as a
        result (`BrokenWeightsError`); the checkpoints already written stay as they were."""
        nonfinite = exploded = 0
        largest = 0.0
        with torch.no_grad():
            for p, start in zip(self.params, self.start_absmax):
                w = _local(p)
                if not w.numel():
                    continue
                if not bool(torch.isfinite(w).all()):
                    nonfinite += 1
                    continue
                m = float(w.abs().max())
                if m > growth * max(start, 1.0):
                    exploded += 1
                    largest = max(largest, m)
        if self.dist is not None and self.dist.enabled:
            agreed = self.dist.sum_stats({"nonfinite": float(nonfinite), "exploded": float(exploded)})
            nonfinite, exploded = int(agreed["nonfinite"]), int(agreed["exploded"])
        if not (nonfinite or exploded):
            return
        seen = (f"{nonfinite} of {len(self.params)} trainable weight tensors hold NaN/inf" if nonfinite else
                f"{exploded} of {len(self.params)} trainable weight tensors grew over {growth:g}× their size at the "
                f"start (largest |w| {largest:.3g})" if largest else
                f"{exploded} trainable weight tensors grew over {growth:g}× their size at the start")
        raise BrokenWeightsError(f"not saving {what}: {seen} after {self.applied} update(s); the model is broken, "
                                 f"so nothing was written (earlier checkpoints are as they were). "
                                 f"{self.hint or 'Lower the learning rate'}")

    def _check_divergence(self, loss: float, grad_norm: float, where: Callable[[], str]) -> None:
        """Stop before applying an update whose loss or gradient norm is `divergence_factor` times
        its first step's (each floored at 1): the run has diverged, and every further step would
        only make the weights worse."""
        if not self.divergence_factor:
            return
        if self.first is None:
            self.first = (loss, grad_norm)
            return
        for name, now, first in (("loss", loss, self.first[0]), ("gradient norm", grad_norm, self.first[1])):
            if now > self.divergence_factor * max(first, 1.0):
                self.optimizer.zero_grad(set_to_none=True)
                raise DivergenceError(
                    f"training diverged {where()}: {name} {now:.3g}, {now / max(first, 1e-12):.3g}× its first "
                    f"step's ({first:.3g}); stopped before applying this update (earlier checkpoints are intact, no "
                    f"final model saved). {self.hint or 'Lower the learning rate'}, or raise --divergence-factor")

    def _non_finite(self, what: str, where: str) -> None:
        # Never let NaN/inf into the weights: stop (the last checkpoint stays as it was) or skip.
        self.optimizer.zero_grad(set_to_none=True)
        if not self.skip_nonfinite:
            # Before any update the learning rate cannot be the cause: the starting model or the data is.
            cause = (f"{self.hint or 'lower the learning rate'}" if self.applied else
                     "no update was applied yet, so the learning rate is not the cause: check the weights of the "
                     "starting model (and of the reference), the loss's settings (--beta, ...) and this batch")
            raise NonFiniteError(f"non-finite {what} {where}; stopped without updating the weights. Pass "
                                 f"--skip-nonfinite to skip such steps, or {cause[0].lower()}{cause[1:]}")
        self.skipped += 1
        self.scheduler.step()
        log(f"non-finite {what} {where}: step skipped ({self.skipped} so far)")


class Progress(_Closing):
    """A tqdm bar (rank 0, when asked), else a log line every `log_every` steps and at the end."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str, log_every: int = 1):
        self.total, self.log_every, self.bar = total, max(1, log_every), None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", mininterval=1.0,
                            dynamic_ncols=True)

    def update(self, step: int, short: str, long: str | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(short)
        elif step % self.log_every == 0 or step == self.total:
            log(f"step {step}/{self.total} {long or short}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
