"""How much memory oneDNN's two primitive caches keep when matmul shapes keep changing.

Each run is a fresh interpreter that calls one projection (hidden 256 -> 688, the `small` fixture's
MLP) on N row counts, each new, through ideep (torch's C++ layer over oneDNN) and prints its RSS
growth. Settings: the libraries' defaults (1024 primitives in each cache), oneDNN's cache alone
bounded, and directpo's bounds (`directpo.precision.limit_onednn_cache`: both caches 128).
fp32 through ideep's inner product runs on any x86 CPU; a bf16 matmul on a CPU with native bf16
goes through ideep's matmul operator, which keeps its primitives in the same kind of cache.

    python scripts/onednn_cache_memory.py [--shapes 800]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = """
import sys, torch
from directpo.precision import limit_onednn_cache
if sys.argv[2] == "directpo":
    limit_onednn_cache()
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
w = torch.randn(688, 256).to_mkldnn()
torch._C._nn.mkldnn_linear(torch.randn(999, 256).to_mkldnn(), w, None)
r0 = rss()
for m in range(1000, 1000 + int(sys.argv[1])):
    torch._C._nn.mkldnn_linear(torch.randn(m, 256).to_mkldnn(), w, None)
print(rss() - r0)
"""

SETTINGS = {"library defaults": {}, "oneDNN's cache bounded (128)": {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128"},
            "directpo (both caches 128)": "directpo"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", type=int, default=800, help="distinct row counts to run (default 800)")
    args = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    print(f"RSS growth over {args.shapes} new matmul shapes (rows x 256 -> 688, fp32, ideep inner product)")
    for name, setting in SETTINGS.items():
        env = base if setting == "directpo" else {**base, **setting}
        mode = "directpo" if setting == "directpo" else "plain"
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.shapes), mode], env=env, capture_output=True,
                             text=True, check=True)
        print(f"  {name:32s} {int(out.stdout.split()[-1]):6d} MiB")


if __name__ == "__main__":
    main()
