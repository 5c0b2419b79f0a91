"""`directpo train`, `sft`, `pipeline`: flags from `TrainConfig` (`PipelineConfig`: plus the SFT stage's own),
then the Python API's job (`directpo.api`).

`train` and `sft` with several processes (--nproc K > 1) or nodes (--nnodes N > 1) re-run themselves
under torchrun (`directpo.training.launch`); `pipeline` runs in one process.
"""
from __future__ import annotations

import json

from ..config import ConfigError, add_flags, build_config
from ..training.config import PipelineConfig, TrainConfig
from ..training.launch import needs_launch


def register(command: str, parser) -> None:
    add_flags(parser, PipelineConfig if command == "pipeline" else TrainConfig)
    if command == "sft":  # TrainConfig's field defaults to dpo; sft trains sft and refuses any other loss
        loss = next(a for a in parser._actions if a.dest == "loss")
        loss.help = "sft (the only loss this command trains; `directpo train --loss L` for the others)"
    parser.set_defaults(func={"train": run_train, "sft": run_sft, "pipeline": run_pipeline}[command])


def _print_summary(summary: dict) -> None:
    print(json.dumps({k: summary[k] for k in ("output_dir", "train", "eval")}, indent=None))


def run_train(args) -> int:
    return _train_or_launch(args, build_config(args, TrainConfig))


def run_sft(args) -> int:
    cfg = build_config(args, TrainConfig, loss="sft")
    if cfg.loss != "sft":  # (--loss, or a --config shared with `train`): the run would be no SFT, named sft
        raise ConfigError(f"directpo sft trains the sft loss, but --loss is {cfg.loss!r} (from the command line or "
                          f"--config): run `directpo train --loss {cfg.loss}` for it, or drop the setting")
    return _train_or_launch(args, cfg)


def _train_or_launch(args, cfg: TrainConfig) -> int:
    """Train in this process, or (several processes or nodes asked for) become their launcher."""
    if needs_launch(cfg):
        return _launch(cfg, args.argv)
    # Imported here, not above: a launcher that loaded the model code (transformers) would only
    # delay its workers.
    from ..api import train

    _print_summary(train(cfg).summary)
    return 0


def run_pipeline(args) -> int:
    from ..api import pipeline

    cfg = build_config(args, PipelineConfig)
    if cfg.nnodes > 1:  # each node would run the whole pipeline on its own, into the same directory
        raise ConfigError("directpo pipeline runs in one process, on one node: for several nodes run its stages "
                          "as `directpo sft --output-dir OUT/sft ...`, then `directpo train --model OUT/sft --ref "
                          "OUT/sft ...`, each with --nnodes")
    print(json.dumps(pipeline(cfg)))
    return 0


def _launch(cfg: TrainConfig, argv: list[str]) -> int:
    from ..training.launch import launch

    # Checked here, once, before any worker starts: a bad setting would otherwise be reported by
    # every worker, and on one node of several only after the others waited for it at the rendezvous.
    cfg.validate()
    from ..config import input_paths
    from ..outputs import check_output_dir

    check_output_dir(cfg.output_dir, input_paths(cfg), cfg.overwrite)  # (rank 0 checks again, under its lock)
    return launch(cfg, argv)
