"""Optimizer and learning-rate schedule. (torch is imported where used: the settings read
`OPTIMIZERS` to build `--help`, which loads no torch.)"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

from ..errors import UserValueError

if TYPE_CHECKING:
    import torch

OPTIMIZERS = ("rmsprop", "adamw", "sgd", "adamw8bit", "paged_adamw8bit")
# bitsandbytes' block-wise 8-bit AdamW (Dettmers et al. 2022): both moments as 8-bit codes with one
# fp32 absmax per block of 256 values; tensors under 4096 values keep fp32 moments (bitsandbytes'
# `min_8bit_size`: their state is too small to be worth quantizing). `paged_`: on CUDA the state lives
# in unified memory that the driver pages out to host memory under pressure.
BNB_OPTIMIZERS = {"adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit"}


def build_optimizer(params, name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    import torch

    params = [p for p in params if p.requires_grad]
    if name == "rmsprop":  # the paper's choice (appendix B)
        return _rmsprop_class()(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        # The fused kernel does AdamW's whole update in one pass over each tensor: 3-4× faster than
        # the per-tensor loop on a CPU (7.4 M parameters: ~9 vs ~30 ms a step). Sharded (DTensor)
        # parameters keep torch's default, which FSDP is tested with.
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=_fusable(params) or None)
    if name == "sgd":  # plain SGD: the update is lr × the gradient, nothing rescaled
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name in BNB_OPTIMIZERS:
        return _bnb_optimizer(params, name, lr, weight_decay)
    raise UserValueError(f"unknown optimizer {name!r}; choose {', '.join(OPTIMIZERS)}")


def _bnb_optimizer(params: list, name: str, lr: float, weight_decay: float):
    """bitsandbytes' 8-bit AdamW (`BNB_OPTIMIZERS`), betas and eps as torch's AdamW. Its state
    (8-bit codes, absmaxes, quantization maps) is a plain tensor state_dict: checkpointed and
    restored like any other optimizer's."""
    import warnings

    from ..console import log
    from ..quantized import require_bitsandbytes

    require_bitsandbytes(f"--optimizer {name}")
    import bitsandbytes as bnb

    if name.startswith("paged_") and not any(p.is_cuda for p in params):
        log(f"--optimizer {name}: paging works on CUDA only; on the CPU its state stays in ordinary memory")
        # bitsandbytes warns of it again at the first step (when it allocates the state): said above
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    return getattr(bnb.optim, BNB_OPTIMIZERS[name])(params, lr=lr, weight_decay=weight_decay)


def check_optimizer(cfg) -> None:
    """An 8-bit optimizer needs bitsandbytes (the extra to install, said before anything loads) and
    plain tensors (not FSDP's sharded DTensor parameters)."""
    if cfg.optimizer not in BNB_OPTIMIZERS:
        return
    if getattr(cfg, "fsdp", False):
        from ..config import ConfigError

        raise ConfigError(f"--optimizer {cfg.optimizer}: bitsandbytes steps plain tensors, not FSDP's sharded "
                          "parameters; use adamw with --fsdp")
    from ..quantized import require_bitsandbytes

    require_bitsandbytes(f"--optimizer {cfg.optimizer}")


def _fusable(params: list) -> bool:
    """Plain floating-point tensors on a CPU or CUDA device: what torch's fused AdamW takes."""
    import torch

    return bool(params) and all(type(p) in (torch.nn.Parameter, torch.Tensor) and p.is_floating_point()
                                and p.device.type in ("cpu", "cuda") for p in params)


@functools.cache
def _rmsprop_class():
    """`RMSprop`, defined at first use (torch is imported where used: see the module's doc)."""
    import torch

    class RMSprop(torch.optim.RMSprop):
        """torch's RMSprop: its state, its update, one pass over each tensor on the CPU.

        torch's CPU step makes six passes over every parameter (decay, accumulate, root, add eps,
        divide, update), and its square root is slow on zeros and subnormals (this machine, 2M fp32
        values: 0.8 ms normal, 7 ms zeros, 21 ms subnormals), which an embedding's square_avg mostly
        holds: the rows of tokens no batch had stay 0, those of rare ones decay toward subnormals.

        For fp32/fp64 CPU tensors with the default plain update (no momentum, not centered, no weight
        decay, not maximizing) the whole update runs in torch's fused Adam kernel, which is RMSprop
        when β1 = 0 and the bias corrections are 1 (`_fused_rmsprop`): one pass, 7.4 M parameters in
        ~4.5 instead of ~12 ms. The numbers are torch's RMSprop's but for rounding in the last bit:
        that kernel's square root is the correctly rounded one (torch's CPU `sqrt` is an ulp off in
        ~20 % of fp32 values), and the few elements past each thread's last full vector are computed
        with double-precision constants (which elements those are depends on the thread count).
        Where weight decay or maximize is set (or torch lacks the kernel), torch's own operations
        run, in its order, with the root taken of max(square_avg, tiny), tiny the dtype's smallest
        normal: below it sqrt(x) ≤ sqrt(tiny) (1.1e-19 in fp32) is under half the spacing of floats
        at eps, so sqrt(x) + eps rounds to eps either way (checked for the group's eps, else torch's
        own step runs): bit for bit torch's. The state is torch's in both cases, so checkpoints move
        between them, and to torch's RMSprop, freely."""

        @torch.no_grad()
        def step(self, closure=None):
            if not all(_plain_rmsprop(group) for group in self.param_groups):
                return super().step(closure)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                params, grads, square_avgs, grad_avgs, momenta, steps = [], [], [], [], [], []
                self._init_group(group, params, grads, square_avgs, momenta, grad_avgs, steps)
                lr, alpha, eps, decay = group["lr"], group["alpha"], group["eps"], group["weight_decay"]
                lr = lr.item() if torch.is_tensor(lr) else lr
                if _fused_rmsprop(group, params, grads, square_avgs, steps, lr):
                    continue
                for param, grad, square_avg, step in zip(params, grads, square_avgs, steps):
                    # torch's `_single_tensor_rmsprop`, its operations in its order, but for the root
                    grad = -grad if group["maximize"] else grad
                    step += 1
                    if decay != 0:
                        grad = grad.add(param, alpha=decay)
                    square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
                    avg = square_avg.clamp_min(torch.finfo(param.dtype).tiny).sqrt_().add_(eps)
                    param.addcdiv_(grad, avg, value=-lr)
            return loss

    RMSprop.__qualname__ = "RMSprop"
    return RMSprop


def _plain_rmsprop(group: dict) -> bool:
    """A group `RMSprop` steps itself: CPU fp32/fp64 plain tensors, torch's per-tensor loop (not its
    foreach, capturable or differentiable variants), no momentum, not centered, and an eps beside which
    the root of any value under the dtype's smallest normal vanishes in sqrt(·) + eps."""
    import torch

    if group["momentum"] or group["centered"] or group["foreach"] or group["capturable"] or group["differentiable"]:
        return False
    params, dtypes = group["params"], {p.dtype for p in group["params"]}
    return _fusable(params) and all(p.device.type == "cpu" and not p.is_sparse for p in params) and \
        dtypes <= {torch.float32, torch.float64} and all(_root_vanishes(group["eps"], dtype) for dtype in dtypes)


# The step count handed to the fused Adam kernel: β^step is 0 in double for every β < 1 (at most
# exp(−2^62 · 2^-53) = e^-512), so both bias corrections are exactly 1. (The kernel reads it as an int64.)
_FUSED_STEP = 2 ** 62


def _fused_rmsprop(group: dict, params: list, grads: list, square_avgs: list, steps: list, lr: float) -> bool:
    """One RMSprop step of `group` through torch's fused CPU Adam kernel when it applies (else False,
    nothing done). With β1 = 0 Adam's first moment is the gradient itself (a lerp with weight 1: the
    gradient tensors stand in for it and are written with their own values), β2 = α, and both bias
    corrections are 1 (`_FUSED_STEP`): square_avg ← α·square_avg + (1 − α)·g², param ← param −
    lr·g / (√square_avg + eps), RMSprop's update. The step counts advance as torch's do."""
    import torch

    fused = getattr(torch, "_fused_adam_", None)
    if fused is None or group["weight_decay"] or group["maximize"] or not 0 <= group["alpha"] < 1 or \
            not all(t.is_contiguous() for t in (*params, *grads)):  # (the kernel writes the gradients' memory)
        return False
    if not params:  # (no gradients this step)
        return True
    torch._foreach_add_(steps, 1)
    count = torch.tensor(float(_FUSED_STEP))
    fused(params, grads, grads, square_avgs, [], [count] * len(params), lr=lr, beta1=0.0, beta2=group["alpha"],
          weight_decay=0.0, eps=group["eps"], amsgrad=False, maximize=False)
    return True


@functools.cache  # (asked at every step)
def _root_vanishes(eps: float, dtype) -> bool:
    """sqrt(x) + eps == eps in `dtype` for every 0 ≤ x < the smallest normal: sqrt of that smallest
    normal is under half the gap from eps (as `dtype`, which the addition uses) to the next float up."""
    import torch

    e = torch.tensor(eps, dtype=dtype)
    if not 0 < e.item() < math.inf:
        return False
    gap = torch.nextafter(e, torch.tensor(math.inf, dtype=dtype)) - e
    return math.sqrt(torch.finfo(dtype).tiny) < gap.item() / 2


def __getattr__(name: str):
    if name == "RMSprop":  # (made on first use: torch loads with it)
        return _rmsprop_class()
    raise AttributeError(name)


SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_min_lr")


def lr_factor(step: int, warmup_steps: int, total_steps: int, kind: str = "constant",
              min_lr_ratio: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (0-based) as a fraction of the peak, in closed form.

    Warm-up: (step + 1) / warmup_steps while step < warmup_steps, so the first step already moves the
    weights (the paper's linear warm-up, then constant). After it, with p = (step − warmup_steps) /
    (total_steps − warmup_steps), the fraction of the decay done before this step (0 at its first
    step, 1 − 1/(T − W) at the last: the last step still trains): `linear` 1 − p; `cosine`
    ½·(1 + cos πp); `cosine_with_min_lr` m + (1 − m)·½·(1 + cos πp), m = min_lr_ratio."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return 1.0 - p
    cosine = 0.5 * (1.0 + math.cos(math.pi * p))
    if kind == "cosine":
        return cosine
    if kind == "cosine_with_min_lr":
        return min_lr_ratio + (1.0 - min_lr_ratio) * cosine
    raise UserValueError(f"unknown learning-rate schedule {kind!r}; choose {', '.join(SCHEDULERS)}")


def lr_schedule(optimizer, cfg, total_steps: int):
    """The run's schedule (`lr_factor`) from its settings: --warmup-steps (or --warmup-ratio of
    `total_steps` optimizer steps), --lr-scheduler, --min-lr-ratio. A `LambdaLR`: its position is
    in every checkpoint, so a resumed run continues the same curve."""
    import torch

    warmup = warmup_steps_of(cfg, total_steps)
    kind, floor = getattr(cfg, "lr_scheduler", "constant"), getattr(cfg, "min_lr_ratio", 0.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total_steps, kind, floor))


def warmup_steps_of(cfg, total_steps: int) -> int:
    """--warmup-ratio × the run's optimizer steps (rounded up) when given, else --warmup-steps."""
    ratio = getattr(cfg, "warmup_ratio", 0.0)
    return math.ceil(ratio * total_steps) if ratio else max(int(cfg.warmup_steps), 0)


def warmup_schedule(optimizer, warmup_steps: int):
    """The paper's schedule alone: linear warm-up from 0 to the peak lr over `warmup_steps`, then
    constant (`lr_factor` with the constant schedule)."""
    import torch

    w = max(int(warmup_steps), 0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, w, 0))
