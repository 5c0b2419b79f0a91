"""`directpo online`: online (iterative) DPO, flags from `OnlineConfig`."""
from __future__ import annotations

import json

from ..config import add_flags, build_config


def register(command: str, parser) -> None:
    from ..rlhf.online import OnlineConfig

    add_flags(parser, OnlineConfig)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..api import online
    from ..rlhf.online import OnlineConfig

    summary = online(build_config(args, OnlineConfig))
    print(json.dumps({k: summary[k] for k in ("output_dir", "final_policy", "plot", "rounds")}))
    return 0
