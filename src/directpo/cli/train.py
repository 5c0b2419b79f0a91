"""`directpo train`, `sft`, `pipeline`: flags from `TrainConfig` (plus the pipeline's SFT-stage flags)."""
from __future__ import annotations

import json
import os

from ..config import add_flags, build_config
from ..train.config import TrainConfig


def register(command: str, parser) -> None:
    add_flags(parser, TrainConfig)
    if command == "pipeline":
        parser.add_argument("--sft-lr", type=float, help="SFT stage learning rate (default: --lr)")
        parser.add_argument("--sft-max-steps", type=int, help="SFT stage steps (default: --max-steps / --epochs)")
        parser.add_argument("--sft-epochs", type=float, help="SFT stage epochs (default: --epochs)")
        parser.add_argument("--sft-optimizer", choices=["rmsprop", "adamw", "sgd"],
                            help="SFT stage optimizer (default: --optimizer)")
    parser.set_defaults(func={"train": run_train, "sft": run_sft, "pipeline": run_pipeline}[command])


def _print_summary(summary: dict) -> None:
    print(json.dumps({k: summary[k] for k in ("output_dir", "train", "eval")}, indent=None))


def run_train(args) -> int:
    from ..train.loop import train

    cfg = build_config(args, TrainConfig)
    if cfg.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from ..train.distributed import launch

        return launch(cfg.nproc, without_flag(args.argv, "--nproc"))
    _print_summary(train(cfg))
    return 0


def run_sft(args) -> int:
    from ..train.loop import train

    _print_summary(train(build_config(args, TrainConfig, loss="sft")))
    return 0


def run_pipeline(args) -> int:
    from ..train.pipeline import run_pipeline as pipeline

    overrides = {k: getattr(args, k) for k in ("sft_lr", "sft_max_steps", "sft_epochs", "sft_optimizer")
                 if getattr(args, k, None) is not None}
    print(json.dumps(pipeline(build_config(args, TrainConfig), **overrides)))
    return 0


def without_flag(argv: list[str], flag: str) -> list[str]:
    """`argv` less `flag` and its value (`--flag V` or `--flag=V`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out
