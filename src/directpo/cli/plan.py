"""`directpo plan --model M ...`: the memory a run needs per device, from the model's config alone."""
from __future__ import annotations

import json

from ..config import add_flags, build_config
from ..training.plan import PlanConfig


def register(command: str, parser) -> None:
    add_flags(parser, PlanConfig)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..api import plan
    from ..training.plan import format_plan

    cfg = build_config(args, PlanConfig)
    result = plan(cfg)
    print(json.dumps(result, indent=1) if cfg.json else format_plan(result))
    return 0
