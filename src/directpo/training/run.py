"""One run machinery for every trainer: DPO/SFT (`training.loop`), the reward model and PPO (`rlhf`).

    Recipe       what a trainer fills in: `train_step`, `evaluate`, `save_checkpoint` (and a few
                 small hooks); the rest is written once, here
    run_steps    THE step loop: for each step, the trainer's step, its metrics line with the health
                 alarms, progress, callbacks, maybe an evaluation, maybe a checkpoint; Ctrl-C and a
                 callback's stop are seen here (once per step)
    RunDir       the output directory (`training.rundir`): claimed and locked, recorded settings,
                 metrics.jsonl, checkpoints, --resume, the completion marker written last
    StepDriver   one optimizer step (`training.step`): micro-batch accumulation, the all-reduce over
                 processes, clipping, the non-finite and divergence guards, the weights check
    Progress     a progress bar, or a log line every N steps

A trainer reads top to bottom as: settings -> data -> models -> RunDir.prepare -> optimizer, resume
-> run_steps(recipe) -> check the weights, save -> RunDir.complete.
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Callable

import torch

from ..console import log
from ..errors import UserError
from .rundir import (COMPLETE_MARKER, CONFIG_FILE, METRICS_FILE, MetricsLog, RunDir, _Closing, is_complete, resume,
                     settle_precision)
from .step import BrokenWeightsError, DivergenceError, NonFiniteError, StepDriver

__all__ = ["COMPLETE_MARKER", "CONFIG_FILE", "METRICS_FILE", "BrokenWeightsError", "Callback", "DivergenceError",
           "Interrupted", "MetricsLog", "ModelDiedError", "NonFiniteError", "Progress", "Recipe", "RunDir", "StepDriver",
           "StopRequest", "is_complete", "resume", "run_steps", "settle_precision", "setup_torch", "stop_if_fatal"]


class ModelDiedError(UserError, RuntimeError):
    """A fatal health alarm (`alarms.FATAL`): the model cannot recover, the run stopped."""


def stop_if_fatal(alerts, cfg) -> None:
    """Stop the run on a fatal health alarm (after its metrics line is written), unless
    --no-stop-on-alarm: training on would only spend time and save a broken model as a success."""
    fatal = [a for a in alerts if a.fatal]
    if fatal and getattr(cfg, "stop_on_alarm", True):
        raise ModelDiedError(f"{fatal[0]}. Stopped: no final model saved, earlier checkpoints as they were "
                             "(--no-stop-on-alarm trains on)")


class Interrupted(UserError, RuntimeError):
    """Ctrl-C (or SIGTERM) stopped the run after a checkpoint: on purpose, not an error (no "error:")."""

    exit_code = 130
    label = ""


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


# ----------------------------------------------------------------------------------------------
# The step loop, once for every trainer


class Callback:
    """Called by the step loop (the Python API's `callbacks=`): override what you need. A method
    that returns True stops the run after this step, as a finished run (final model saved, marked
    complete; the result says where it stopped) — early stopping from a notebook."""

    def on_step(self, record: dict) -> bool | None:
        """After each training step's metrics line (the dict written to metrics.jsonl)."""

    def on_eval(self, record: dict) -> bool | None:
        """After each evaluation's metrics line."""

    def on_checkpoint(self, step: int, path) -> bool | None:
        """After a checkpoint is written (`path`: its directory on rank 0, else None)."""


class Recipe:
    """A trainer as the step loop sees it. Set, before `run_steps`: `run` (RunDir), `cfg`,
    `driver` (StepDriver), `alarms` (HealthMonitor), `name` (the progress label); `dist` under
    torchrun. Fill in the hooks below; `epoch` is the epoch of the step last taken."""

    run: RunDir
    cfg: object
    driver: StepDriver
    alarms: object
    name: str = "train"
    dist = None
    epoch: int = 0

    def train_step(self, step: int) -> dict | None:
        """One optimizer step: its metrics line, or None when the step was skipped (non-finite)."""
        raise NotImplementedError

    @property
    def evaluates(self) -> bool:
        """Whether this run evaluates (on this process)."""
        return False

    def evaluate(self, step: int) -> dict:
        """An evaluation's metrics line ("split": "eval")."""
        raise NotImplementedError

    def save_checkpoint(self, step: int):
        """Write this step's checkpoint (every process calls it); its path on rank 0."""
        raise NotImplementedError

    def progress_text(self, record: dict) -> tuple[str, str]:
        """(short, long) text of a step's line for the progress bar / log line."""
        text = f"loss {record['loss']:.4f}"
        return text, text

    def eval_text(self, record: dict) -> str:
        """The console text of an evaluation's line."""
        return self.progress_text(record)[0]


def run_steps(recipe: Recipe, start_step: int, total_steps: int, callbacks=()) -> dict:
    """Steps start_step+1 .. total_steps of `recipe`: each step's metrics line (with its health
    alarms) written and shown, maybe an evaluation, maybe a checkpoint. Returns {"train": the last
    step's line, "eval": the last evaluation's, "stopped_at": the step a callback stopped the run
    at, or None}.

    Ctrl-C/SIGTERM is asked for once per step, after the step (and its evaluation): then a
    checkpoint is saved and `Interrupted` raised. A fatal alarm raises `ModelDiedError`. Every
    checkpoint is preceded by the weights check."""
    cfg, run = recipe.cfg, recipe.run
    out = {"train": {}, "eval": None, "stopped_at": None}
    metrics = run.metrics(start_step)
    progress = Progress(cfg.progress and run.main, total_steps, start_step, recipe.name, cfg.log_every)

    def record(line: dict, hook: Callable) -> bool:
        alerts = recipe.alarms.annotate(line)  # the alarms ride on the metrics line, a console line each
        metrics.write(line)
        if line.get("split") == "eval":
            log(f"eval @ step {line['step']}: {recipe.eval_text(line)}")
        else:
            progress.update(line["step"], *recipe.progress_text(line))
        for a in alerts:
            log(str(a))
        stop_if_fatal(alerts, cfg)
        return any(bool(hook(c)(line)) for c in callbacks)

    with StopRequest() as stop, metrics, progress:
        if recipe.evaluates and start_step == 0:  # the starting point (for DPO every implicit reward is 0)
            out["eval"] = recipe.evaluate(0)
            record(out["eval"], lambda c: c.on_eval)
        recipe.t_start = time.perf_counter()  # the lines' elapsed_s: training time
        for step in range(start_step + 1, total_steps + 1):
            line = recipe.train_step(step)
            if line is None:  # skipped (--skip-nonfinite): nothing to log, save or stop on
                continue
            out["train"] = line
            wants_stop = record(line, lambda c: c.on_step)
            if recipe.evaluates and ((getattr(cfg, "eval_every", 0) and step % cfg.eval_every == 0)
                                       or step == total_steps):
                out["eval"] = recipe.evaluate(step)
                wants_stop |= record(out["eval"], lambda c: c.on_eval)
            interrupted = stop.requested(recipe.dist)  # once per step: every process agrees on it
            if cfg.save_every and step % cfg.save_every == 0 or interrupted:
                recipe.driver.check_weights(f"the checkpoint of step {step}")
                path = recipe.save_checkpoint(step)
                wants_stop |= any(bool(c.on_checkpoint(step, path)) for c in callbacks)
            if interrupted:
                raise Interrupted(f"interrupted at step {step}/{total_steps}; checkpoint saved in "
                                  f"{run.path / 'checkpoints'}: resume with --resume")
            if callbacks and _agreed(wants_stop, recipe.dist) and step < total_steps:  # (no collective without them)
                log(f"stopped by a callback at step {step}/{total_steps}")
                out["stopped_at"] = step
                break
    return out


def _agreed(flag: bool, dist) -> bool:
    """A stop asked for on any process, seen by all (they must leave the loop at the same step)."""
    if dist is not None and dist.enabled:
        return dist.sum_stats({"stop": float(flag)})["stop"] > 0
    return flag
