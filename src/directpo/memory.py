"""Sizes and the process's memory: how the settings write a size (`--memory-budget 8GiB`), how a
log line says one, and how much memory the process holds now. One place for the training and the
sampling budgets (`training.budget`, `eval.budget`)."""
from __future__ import annotations

from .config import ConfigError

KiB, MiB, GiB = 1024, 1024 ** 2, 1024 ** 3

_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024 ** 2, "mib": 1024 ** 2, "mb": 1000 ** 2,
               "g": GiB, "gib": GiB, "gb": 1000 ** 3, "t": 1024 ** 4, "tib": 1024 ** 4, "tb": 1000 ** 4}


def parse_size(text: str, what: str = "--memory-budget") -> int:
    """Bytes of '8GiB', '512MiB', '1.5GB', '8g' (K/M/G/T alone: binary, as `free` and Docker read them):
    the one grammar of every memory setting (training's and sampling's `--memory-budget`)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and _SIZE_UNITS.get(m.group(2).lower())
    if not m or unit is None or float(m.group(1)) <= 0:
        raise ConfigError(f"{what} {text!r}: not a size; write it like 8GiB, 512MiB or 2GB")
    return int(float(m.group(1)) * unit)


def size_str(n: float) -> str:
    """A size as a person reads it: GiB, MiB, KiB, or bytes below 1 KiB."""
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n >= MiB:
        return f"{n / MiB:.0f} MiB"
    if n >= KiB:
        return f"{n / KiB:.4g} KiB"
    return f"{int(n)} bytes"


def current_memory(device) -> int:
    """Bytes the process holds now: allocated on a CUDA device, else its resident set."""
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: the peak so far, an upper bound
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
