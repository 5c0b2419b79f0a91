"""`directpo demo`: DPO on the built-in review task, offline, with a tiny model built on the spot."""
from __future__ import annotations

import os


def register(command: str, parser) -> None:
    parser.add_argument("--output-dir", default=os.path.join("runs", "demo"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..experiments.demo import run_demo

    result = run_demo(args.output_dir, steps=args.steps, seed=args.seed)
    return 0 if result["passed"] else 1
