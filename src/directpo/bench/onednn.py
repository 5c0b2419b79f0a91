"""How much memory oneDNN's two primitive caches keep when matmul shapes keep changing (#15).

Each measurement is a fresh interpreter that runs one projection (hidden 256 -> 688, the `small`
fixture's MLP) on a range of row counts, each new, through ideep (torch's C++ layer over oneDNN),
and reports its RSS growth. Settings: the libraries' defaults (1024 primitives in each cache),
oneDNN's cache alone bounded, and directpo's bounds (`directpo.precision.limit_onednn_cache`).
fp32 through ideep's inner product runs on any x86 CPU; a bf16 matmul on a CPU with native bf16
goes through ideep's matmul operator, which keeps its primitives in the same kind of cache.
Results: docs/results/bench/onednn-caches.md.

    python -m directpo.bench.onednn [--shapes 800]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from .procfs import read_status

CACHE_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
# setting name -> environment it adds ("directpo": limit_onednn_cache() inside the child instead)
SETTINGS = {"library defaults": {}, "oneDNN's cache bounded (128)": {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128"},
            "directpo (both caches 128)": "directpo"}


def _child(warm: range, measured: range, bound: bool) -> None:
    import torch

    if bound:
        from ..precision import limit_onednn_cache

        limit_onednn_cache()
    w = torch.randn(688, 256).to_mkldnn()

    def run(rows: range) -> None:
        for m in rows:
            torch._C._nn.mkldnn_linear(torch.randn(m, 256).to_mkldnn(), w, None)

    run(warm)
    r0 = _rss_mib()
    run(measured)
    print(_rss_mib() - r0)


def _rss_mib() -> int:
    return read_status()["VmRSS"] // (1 << 20)


def growth_mib(measured: range, warm: range = range(999, 1000), setting: str = "library defaults") -> int:
    """RSS growth (MiB) of a fresh process over the `measured` row counts, after the `warm` ones."""
    extra = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARS}
    if extra != "directpo":
        env.update(extra)
    args = [str(x) for x in (warm.start, warm.stop, measured.start, measured.stop, int(extra == "directpo"))]
    out = subprocess.run([sys.executable, "-m", "directpo.bench.onednn", "--child", *args], env=env,
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"oneDNN cache probe failed:\n{out.stderr}")
    return int(out.stdout.split()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        a = [int(x) for x in argv[1:]]
        _child(range(a[0], a[1]), range(a[2], a[3]), bool(a[4]))
        return 0
    ap = argparse.ArgumentParser(prog="python -m directpo.bench.onednn", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", type=int, default=800, help="distinct row counts to run (default 800)")
    args = ap.parse_args(argv)
    print(f"RSS growth over {args.shapes} new matmul shapes (rows x 256 -> 688, fp32, ideep inner product)")
    for name in SETTINGS:
        print(f"  {name:32s} {growth_mib(range(1000, 1000 + args.shapes), setting=name):6d} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
