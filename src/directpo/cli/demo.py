"""`directpo demo`: DPO on the built-in review task, offline, with a tiny model built on the spot
(flags from `DemoConfig`)."""
from __future__ import annotations

from ..config import add_flags, build_config


def register(command: str, parser) -> None:
    from ..experiments.demo import DemoConfig

    add_flags(parser, DemoConfig)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..experiments.demo import DemoConfig, run_demo

    cfg = build_config(args, DemoConfig)
    result = run_demo(cfg.output_dir, steps=cfg.steps, seed=cfg.seed, task=cfg.task,
                      threshold=0.9 if cfg.task == "colours" else 0.8)
    return 0 if result["passed"] else 1
