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


# The C heap of a CPU run (glibc). Freed temporaries of a forward (a token × width block, a
# dequantized 4-bit weight) leave holes between the activations kept for the backward; glibc keeps
# them, and raises its mmap threshold to the largest block freed (up to 32 MiB) so that later
# blocks of that size come from the heap too. At a 0.5B model's bound a LoRA run held 1.35-1.42×
# and a QLoRA run 1.80× of what its tensors need (docs/results/qlora-memory.md). With the threshold
# fixed at 64 KiB every larger block is a mapping of its own, returned when freed: the process then
# holds what its tensors need (full fine-tuning 1.00, LoRA 1.03 of the plan), at the price of
# fresh pages for every such block (a `small` training step 1.75× slower). So only a run that asked
# to fit a memory budget pays it (`bound_heap`).
#
# Every other training run keeps its heap (`keep_heap`): when a step's backward frees its
# activations, glibc gives the free top of the heap back to the system once it is over its trim
# threshold (64 MiB at most), and the next step's forward takes the same memory back as fresh
# pages, each a page fault and a zeroing: 1,000-8,000 faults, 4-26 ms of system time a `small`
# step (HH, batch 8). With a 1 GiB trim threshold they stay: ~200-1,000 faults, 2-3 ms. The peak
# is the same (trimming decides what is returned after it, not where blocks go); after the run
# the kept memory is returned (`release_heap`).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
BUDGET_MMAP_THRESHOLD = 64 * KiB
KEEP_TRIM_THRESHOLD = 1 * GiB
# glibc's ceiling of its dynamic threshold on 64-bit systems: a fixed threshold can't be undone,
# and this is where the default's adjustment ends up once blocks that large were freed (and its
# trim threshold then at twice that)
DYNAMIC_MMAP_THRESHOLD_MAX = 32 * MiB
_heap: str | None = None  # "bound" or "kept" while a run set glibc's thresholds (they are the process's)
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def _glibc():
    """The C library when it is glibc (which has `mallopt` and `malloc_trim`), else None."""
    import ctypes
    import ctypes.util
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's `malloc_trim`; elsewhere nothing)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _user_chose() -> bool:
    """The user set glibc's heap thresholds (environment, tunables): theirs stand."""
    import os

    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(k in os.environ for k in _USER_SETTINGS) or any(
        k in tunables for k in ("mmap_threshold", "trim_threshold", "top_pad"))


def bound_heap(threshold: int = BUDGET_MMAP_THRESHOLD) -> str | None:
    """Fix glibc's mmap threshold at `threshold` bytes for the rest of the process (see above); what
    was done, for the log, or None where nothing was: not glibc, or the user chose the threshold
    (`MALLOC_MMAP_THRESHOLD_`, `GLIBC_TUNABLES`): theirs stands."""
    global _heap
    if _user_chose():
        return None
    libc = _glibc()
    if libc is None or not libc.mallopt(M_MMAP_THRESHOLD, threshold):
        return None
    _heap = "bound"
    return (f"memory budget on the CPU: glibc's mmap threshold fixed at {size_str(threshold)}, so freed "
            "temporaries go back to the system and the process holds what the budget counts (steps may be "
            "slower; MALLOC_MMAP_THRESHOLD_ set by you is kept)")


def keep_heap(device) -> None:
    """For a training run on the CPU without a memory budget: glibc keeps up to 1 GiB of freed heap
    instead of returning it between steps (see above), its mmap threshold fixed where its own
    adjustment ends (setting one threshold ends the adjustment of both). Nothing on another device,
    where the user chose the thresholds, where a run already set them, or off glibc."""
    global _heap
    libc = None if device.type != "cpu" or _heap is not None or _user_chose() else _glibc()
    if libc is not None and libc.mallopt(M_MMAP_THRESHOLD, DYNAMIC_MMAP_THRESHOLD_MAX):
        libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)
        _heap = "kept"


def release_heap() -> None:
    """After a run that `bound_heap` or `keep_heap`: the thresholds back to where glibc's own
    adjustment ends, and kept memory returned, so the rest of the process (a notebook, the next run
    of a study) neither pays for fresh pages nor holds the run's freed memory."""
    global _heap
    libc = _glibc() if _heap is not None else None
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, DYNAMIC_MMAP_THRESHOLD_MAX)
        if _heap == "kept":
            libc.mallopt(M_TRIM_THRESHOLD, 2 * DYNAMIC_MMAP_THRESHOLD_MAX)
            libc.malloc_trim(0)
    _heap = None
