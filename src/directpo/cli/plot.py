"""`directpo plot RUN_DIR [RUN_DIR ...] --out curves.png`: training curves of one or more runs."""
from __future__ import annotations

import json
from pathlib import Path

from .args import HelpFormatter, check_outputs


def _flags(p) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories (each with its metrics.jsonl; a metrics.jsonl file works too); several "
                        "are overlaid, named by their directories")
    p.add_argument("--out", required=True,
                   help="image to write: .png (or .pdf, .svg): loss, reward accuracy, margin, chosen/rejected "
                        "rewards, PPO reward and KL, learning rate, gradient norm, as the runs have them; train as "
                        "lines, eval as markers")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it exists (never a run's metrics file); without it, it is refused")


def run(args) -> int:
    from ..eval.curves import metrics_path, plot_runs

    inputs = {f"RUN_DIR {r}": str(metrics_path(r)) for r in args.run_dirs}
    check_outputs({"--out": args.out}, inputs, args.overwrite)
    result = plot_runs([Path(r) for r in args.run_dirs], args.out)
    print(json.dumps(result))
    return 0


def register(command: str, parser) -> None:
    parser.formatter_class = HelpFormatter
    _flags(parser)
    parser.set_defaults(func=run)
