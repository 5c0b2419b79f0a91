"""`directpo plot RUN_DIR [RUN_DIR ...] --out curves.png`: training curves of one or more runs (flags from
`directpo.eval.config.PlotConfig`)."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import add_flags, build_config
from ..eval.config import PlotConfig
from ..outputs import check_outputs
from .args import HelpFormatter


def run(args) -> int:
    from ..eval.curves import metrics_path, plot_runs

    cfg = build_config(args, PlotConfig).validate()
    inputs = {f"RUN_DIR {r}": str(metrics_path(r)) for r in cfg.run_dirs}
    check_outputs({"--out": cfg.out}, inputs, cfg.overwrite)
    result = plot_runs([Path(r) for r in cfg.run_dirs], cfg.out)
    print(json.dumps(result))
    return 0


def register(command: str, parser) -> None:
    parser.formatter_class = HelpFormatter
    add_flags(parser, PlotConfig, check_ranges_early=True)
    parser.set_defaults(func=run)
