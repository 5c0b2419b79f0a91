"""Console output: one `log` for every command (stderr, one voice in multi-process runs)."""
from __future__ import annotations

import os
import sys


def log(msg: str, prefix: str = "directpo") -> None:
    """`[directpo] msg` on stderr, from rank 0 only under torchrun."""
    if os.environ.get("RANK", "0") == "0":
        print(f"[{prefix}] {msg}", file=sys.stderr, flush=True)
