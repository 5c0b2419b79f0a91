"""One optimizer step, the same for every trainer (`StepDriver`), and what stops one: a non-finite
loss or gradient, a diverging run, weights that broke before a save.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..console import log
from ..errors import UserError

class NonFiniteError(UserError, RuntimeError):
    """A NaN/inf loss or gradient: the step was not applied (the CLI prints the message, no traceback)."""


class DivergenceError(UserError, RuntimeError):
    """The loss or gradient norm exploded: the step was not applied."""


class BrokenWeightsError(UserError, RuntimeError):
    """NaN/inf or exploded weights found before a save: nothing was written."""


def _local(p: torch.Tensor) -> torch.Tensor:
    """A parameter's tensor on this process (the local shard of an FSDP DTensor)."""
    return p.to_local() if hasattr(p, "to_local") else p


def clip_grad_norm(params: list, max_norm: float) -> torch.Tensor:
    """torch's `clip_grad_norm_` (the same norm, the same scaling; `max_norm` ≤ 0: no clipping), without
    its pass over every gradient when nothing is clipped: it multiplies by clamp(max / (norm + 1e-6),
    max=1) unconditionally (its note: to avoid a device sync, which the step makes anyway to test the
    norm), and ×1.0 changes no value. A `small` step's 7.4 M gradients: one 30 MB pass fewer."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if max_norm > 0 and bool(max_norm / (norm + 1e-6) < 1):  # the coefficient as torch computes it
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


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
            grad_norm = clip_grad_norm(self.params, self.max_grad_norm)
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
