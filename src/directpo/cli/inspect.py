"""`directpo inspect`: a report on preference data, read exactly as `train` reads it (flags from
`directpo.inspect.config.InspectConfig`), the Python API's `inspect_data`."""
from __future__ import annotations

import json
import os

from ..config import add_flags, build_config
from ..inspect.config import InspectConfig
from .args import HelpFormatter


def register(command: str, parser) -> None:
    parser.formatter_class = HelpFormatter
    add_flags(parser, InspectConfig, check_ranges_early=True)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..api import inspect_data
    from ..inspect import console_summary

    cfg = build_config(args, InspectConfig)
    ins = inspect_data(cfg)
    paths = ins.pop("report_files")
    if cfg.json:
        print(json.dumps({k: v for k, v in ins.items() if k != "per_pair"}, ensure_ascii=False))
    else:
        print(console_summary(ins))
        if paths:
            print(f"report: {paths[0]} (and {', '.join(os.path.basename(p) for p in paths[1:])})")
    return 0
