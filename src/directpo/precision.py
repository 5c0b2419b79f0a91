"""`--precision auto`: bf16 where this device computes it fast, fp32 elsewhere.

    CUDA   bf16 when the GPU runs bf16 natively (`torch.cuda.is_bf16_supported`, emulation not
           counted), else fp32.
    CPU    a short probe (`PROBE_SHAPE` matmuls in fp32 and in bf16, a fraction of a second): bf16
           when its matmul throughput beats fp32's by `SPEEDUP` or more. CPUs with AVX-512 BF16 or
           AMX run bf16 matmuls ~2.5× faster than fp32; AVX2-only CPUs emulate them ~50-100× slower,
           so the probe's answer is rarely close. It is cached per machine (CPU model, its bf16
           flags, torch version) in `precision.json` under the user cache directory
           ($DIRECTPO_CACHE, else $XDG_CACHE_HOME/directpo, else ~/.cache/directpo).
    other  fp32 (MPS and the rest: bf16 autocast is not assumed to pay there).

`DIRECTPO_AUTO_PRECISION=fp32|bf16` pins what `auto` resolves to, everywhere (the test suite pins
fp32, so its exactness tests hold on every kind of CPU). An explicit fp32 or bf16 is never changed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import hashlib
import json
import os
import platform
import time
from pathlib import Path

from .console import log
from .errors import UserError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "bf16")
ENV_PIN = "DIRECTPO_AUTO_PRECISION"
SPEEDUP = 1.3  # bf16 must beat fp32's matmul throughput by this factor to be chosen
PROBE_SHAPE = (512, 512, 512)  # (tokens, in, out) of one probe matmul: a small model's projection
CACHE_FILE = "precision.json"
# CPU flags that decide how fast a bf16 matmul can be (/proc/cpuinfo names)
BF16_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "avx_vnni")
# oneDNN (the library behind torch's bf16 matmuls on CPU) compiles one primitive per matmul shape
# and two caches keep them, 1024 each by default: oneDNN's own and that of ideep, the C++ layer
# torch calls oneDNN through (its matmul and inner-product operators). Micro-batches of varying
# length give nearly every step new shapes, so both fill with primitives used once, about half a
# MiB each: 800 new shapes of one projection grew a process by 860-1064 MiB with the defaults,
# 320-329 with oneDNN's cache alone bounded, 86-131 with both (`python -m directpo.bench.onednn`,
# docs/results/bench/onednn-caches.md). These bound both (LRU caches: the shapes that recur, such
# as the LM head's chunks, stay cached). Set only when the user has not.
ONEDNN_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128", "LRU_CACHE_CAPACITY": "128"}

_decided: dict[str, tuple[str, str]] = {}  # per device kind: the decision of this process, logged once


class PrecisionError(UserError, ValueError):
    """A precision setting that cannot be used."""


def check_precision(value: str, what: str = "--precision") -> str:
    if value not in PRECISIONS:
        raise PrecisionError(f"{what} {value!r}: choose one of {', '.join(PRECISIONS)}")
    return value


def pinned() -> str | None:
    """The outcome `DIRECTPO_AUTO_PRECISION` imposes on `auto` (None: not set)."""
    value = os.environ.get(ENV_PIN, "").strip().lower()
    if not value:
        return None
    if value not in ("fp32", "bf16"):
        raise PrecisionError(f"{ENV_PIN}={os.environ[ENV_PIN]!r}: set it to fp32 or bf16 (or unset it)")
    return value


def resolve_precision(requested: str, device: torch.device | str) -> tuple[str, str]:
    """(fp32 or bf16, why): `requested` itself unless it is 'auto'."""
    import torch  # (here: reading PRECISIONS, e.g. for --help, loads no torch)

    check_precision(requested)
    dev = torch.device(device)
    if dev.type == "cpu" and requested != "fp32":  # before any bf16 matmul of this process (the probe's too)
        limit_onednn_cache()
    if requested != "auto":
        return requested, "requested"
    pin = pinned()
    if pin is not None:
        if f"pin:{pin}" not in _decided:
            _decided[f"pin:{pin}"] = pin, f"{ENV_PIN}={pin}"
            log(f"--precision auto: {pin} ({ENV_PIN}={pin})")
        return pin, f"{ENV_PIN}={pin}"
    key = str(dev) if dev.type == "cuda" else dev.type
    if key not in _decided:
        _decided[key] = _cuda_decision(dev) if dev.type == "cuda" else \
            cpu_decision() if dev.type == "cpu" else ("fp32", f"bf16 autocast is not assumed fast on {dev.type}")
        log(f"--precision auto: {_decided[key][0]} ({_decided[key][1]})")
    return _decided[key]


def _cuda_decision(dev: torch.device) -> tuple[str, str]:
    import torch  # (here: reading PRECISIONS, e.g. for --help, loads no torch)

    name = torch.cuda.get_device_name(dev)
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # an older torch without the argument
        native = torch.cuda.is_bf16_supported()
    if native:
        return "bf16", f"{name} computes bf16 natively"
    return "fp32", f"{name} has no native bf16"


# ----------------------------------------------------------------------------------------------
# CPU: the probe and its cache


def cpu_identity() -> dict:
    """What decides bf16 speed on this machine: the CPU model, its bf16-relevant flags, torch."""
    import torch  # (here: reading PRECISIONS, e.g. for --help, loads no torch)

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                model = value.strip()
            elif name.strip() in ("flags", "Features"):
                flags = set(value.split())
    except OSError:  # not Linux: the model name and torch's own view of the vector ISA
        pass
    return {"cpu": model, "flags": sorted(flags.intersection(BF16_FLAGS)),
            "isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def cache_root() -> tuple[Path, str]:
    """(directpo's user cache folder, how to name it to the user): $DIRECTPO_CACHE, else
    $XDG_CACHE_HOME/directpo, else ~/.cache/directpo; the name says which variable set it."""
    if os.environ.get("DIRECTPO_CACHE"):
        return Path(os.environ["DIRECTPO_CACHE"]), f"DIRECTPO_CACHE={os.environ['DIRECTPO_CACHE']}"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "directpo", f"XDG_CACHE_HOME={os.environ['XDG_CACHE_HOME']}"
    path = Path(os.path.expanduser("~")) / ".cache" / "directpo"
    return path, str(path)


def cache_folder_problem(folder: Path, named: str | None = None) -> str | None:
    """Why files cannot be cached in `folder` (made when missing), in one line naming what set it,
    or None when they can. `named`: how the user gave the folder (e.g. '--ref-cache /x'); by default
    the variable that set the cache root when `folder` lies in it ('DIRECTPO_CACHE=/x is a file, not
    a folder'), else the folder itself. Callers warn and go on without the cache: it is optional."""
    root, root_named = cache_root()
    if named is None and (folder == root or root in folder.parents):
        named = root_named
    named = named or str(folder)
    where = next((p for p in (folder, *folder.parents) if os.path.lexists(p)), None)
    if where is None:
        return None
    said = named == str(where) or named.endswith((f"={where}", f" {where}"))  # `named` is the culprit itself
    whose = "" if said else f": {where}"
    if not where.is_dir():
        return f"{named}{whose} is a file, not a folder"
    if not os.access(where, os.W_OK | os.X_OK):
        return f"{named}{whose} is not writable"
    return None


def cache_path() -> Path:
    return cache_root()[0] / CACHE_FILE


def _key(identity: dict) -> str:
    return hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=12).hexdigest()


def _read_cache(path: Path) -> dict:
    """The cached decisions, or {} when the file is missing or unreadable (then it is probed again)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, entries: dict) -> None:
    problem = cache_folder_problem(path.parent)
    if problem is not None:  # decide again next time, no harm done
        log(f"warning: --precision auto: decision not cached: {problem}")
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: decide again next time, no harm done
        log(f"--precision auto: could not cache the decision in {path} ({e.strerror or e})")


def cpu_decision() -> tuple[str, str]:
    """(precision, why) for this CPU: the cached answer, else the probe's (then cached)."""
    identity = cpu_identity()
    path, key = cache_path(), _key(identity)
    entries = _read_cache(path)
    hit = entries.get(key)
    if isinstance(hit, dict) and hit.get("precision") in ("fp32", "bf16") and isinstance(hit.get("reason"), str):
        return hit["precision"], hit["reason"] + " (cached)"
    fp32, bf16 = probe_matmul_gflops()
    precision, reason = decide(fp32, bf16, identity)
    entries[key] = {"precision": precision, "reason": reason, "fp32_gflops": fp32, "bf16_gflops": bf16,
                    **identity}
    _write_cache(path, entries)
    return precision, reason


def decide(fp32_gflops: float, bf16_gflops: float, identity: dict) -> tuple[str, str]:
    """The rule: bf16 when its measured matmul throughput is ≥ SPEEDUP × fp32's."""
    flags = ", ".join(f for f in identity.get("flags", []) if "bf16" in f or "amx" in f) or "no bf16 flags"
    what = f"{identity.get('cpu', 'this CPU')} ({flags}): bf16 matmul {bf16_gflops:.3g} GFLOP/s, fp32 " \
           f"{fp32_gflops:.3g} GFLOP/s"
    if bf16_gflops >= SPEEDUP * fp32_gflops:
        return "bf16", f"{what}, {bf16_gflops / fp32_gflops:.1f}× faster"
    return "fp32", f"{what}; bf16 is not ≥ {SPEEDUP}× faster here"


def probe_matmul_gflops(shape: tuple[int, int, int] = PROBE_SHAPE, reps: int = 3) -> tuple[float, float]:
    """(fp32, bf16) GFLOP/s of (tokens × in) @ (in × out) matmuls on the CPU: the best of `reps`
    after a warm-up. Where one bf16 matmul already takes 20× an fp32 one (emulated bf16), that
    one is the answer: repeating it would only cost time."""
    import torch  # (here: reading PRECISIONS, e.g. for --help, loads no torch)

    limit_onednn_cache()
    m, k, n = shape
    flop = 2.0 * m * k * n
    gen = torch.Generator().manual_seed(0)  # the global RNG stays untouched: a run's trajectory must not depend
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)

    def best(x, y, times: int) -> float:
        out = float("inf")
        for _ in range(times):
            t = time.perf_counter()
            torch.mm(x, y)
            out = min(out, time.perf_counter() - t)
        return out

    best(a, b, 1)
    t32 = best(a, b, reps)
    a16, b16 = a.bfloat16(), b.bfloat16()
    first = best(a16, b16, 1)  # warm-up: oneDNN compiles its kernel on first use
    t16 = first if first > 20 * t32 else min(first, best(a16, b16, reps))
    return flop / t32 / 1e9, flop / t16 / 1e9


def limit_onednn_cache() -> None:
    """Bound oneDNN's and ideep's primitive caches before the first bf16 matmul on the CPU (see
    ONEDNN_CACHES); each library reads its variable once, when it creates its cache."""
    for name, capacity in ONEDNN_CACHES.items():
        os.environ.setdefault(name, capacity)
