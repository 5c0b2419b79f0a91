"""`--optimizer-offload`: one process's optimizer stepped in host memory (ZeRO-Offload, Ren et al.
2021, without its partitioning): the optimizer's state and an fp32 master copy of the trainable
weights live on the host; each step copies the gradients there, steps the ordinary optimizer
(`optim.build_optimizer`) on the host copies, and copies the updated weights back. Nothing is
approximated: with fp32 weights it is the same arithmetic as stepping on the device, run by the
CPU's kernels. On the CPU device the state is in host memory already: the flag changes nothing
(`make_optimizer` says so). FSDP has its own (--fsdp-cpu-offload).

The wrapper's state_dict is the inner optimizer's, so a checkpoint made with offload resumes
without it and the other way round; only when the weights are not fp32 (the master copy then
carries bits the device's weights lack) is the master copy saved with it."""
from __future__ import annotations

import torch

from ..console import log
from .optim import build_optimizer

MASTER_KEY = "offload_master"


class OffloadedOptimizer(torch.optim.Optimizer):
    """`build(host_params)` stepped on fp32 host copies of `params` (see the module docstring).
    It is an `Optimizer` to the learning-rate scheduler and the checkpoints: `param_groups` and
    `state` are the inner optimizer's (its groups hold the host copies)."""

    # (no super().__init__: it would group and check the device parameters, which this never steps)
    def __init__(self, params, build, host: str = "cpu"):
        self.params = [p for p in params if p.requires_grad]
        with torch.no_grad():
            self.host = [p.detach().to(host, torch.float32, copy=True).requires_grad_(True) for p in self.params]
        self.inner = build(self.host)
        self.defaults = self.inner.defaults
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = {}, {}
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}

    # properties, not copies: the inner optimizer's load_state_dict replaces its lists, and the
    # scheduler must set the learning rate on the groups that step
    param_groups = property(lambda self: self.inner.param_groups,
                            lambda self, groups: setattr(self.inner, "param_groups", groups))
    state = property(lambda self: self.inner.state, lambda self, state: setattr(self.inner, "state", state))

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:  # a closure would recompute the loss on the device: not what offload steps
            raise NotImplementedError("OffloadedOptimizer.step takes no closure")
        for p, h in zip(self.params, self.host):
            h.grad = None if p.grad is None else p.grad.detach().to(h.device, torch.float32)
        self.inner.step()
        for p, h in zip(self.params, self.host):
            if p.grad is not None:
                p.copy_(h.to(p.device, non_blocking=True))
            h.grad = None  # the host gradient is this step's copy, not an accumulator

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def state_dict(self) -> dict:
        sd = self.inner.state_dict()
        if any(p.dtype != torch.float32 for p in self.params):
            sd[MASTER_KEY] = [h.detach().clone() for h in self.host]
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """The inner optimizer's state, and the host copies: the saved master copy, else the
        device's weights (a checkpoint restores those first: `checkpoint._load_whole`)."""
        state_dict = dict(state_dict)
        master = state_dict.pop(MASTER_KEY, None)
        self.inner.load_state_dict(state_dict)
        sources = master if master is not None else self.params
        for h, s in zip(self.host, sources):
            h.copy_(s.detach().to(h.device, torch.float32))

    def __repr__(self) -> str:
        return f"OffloadedOptimizer({self.inner!r})"


def offload_applies(device) -> bool:
    """Whether host memory is other memory than the device's (not on the CPU)."""
    return device.type != "cpu"


def make_optimizer(params, cfg, device) -> torch.optim.Optimizer:
    """The run's optimizer (`build_optimizer`), offloaded to host memory with --optimizer-offload
    where that moves anything."""
    build = lambda ps: build_optimizer(ps, cfg.optimizer, cfg.lr, cfg.weight_decay)  # noqa: E731
    if not getattr(cfg, "optimizer_offload", False):
        return build(params)
    if not offload_applies(device):
        log(f"--optimizer-offload: nothing to move on {device}: the optimizer state is in host memory already")
        return build(params)
    log("--optimizer-offload: the optimizer state and an fp32 copy of the trainable weights in host memory; "
        "each step copies the gradients there and the weights back")
    return OffloadedOptimizer(params, build)
