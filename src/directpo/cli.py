"""`directpo <command>`: train, score, demo.

Flags of `train` come from `TrainConfig` (one flag per field, same name with dashes); a YAML
`--config FILE` sets the same keys, and flags given on the command line override it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields

from .train.config import TrainConfig, config_fields


def _flag_type(type_name: str):
    t = str(type_name)
    if "bool" in t:
        return bool
    if "int" in t:
        return int
    if "float" in t:
        return float
    return str


def _optional(conv):
    def parse(s: str):
        return None if s.lower() in ("none", "null") else conv(s)
    parse.__name__ = conv.__name__
    return parse


def add_config_flags(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """One flag per config field. Defaults are SUPPRESSed so we can tell what the user typed."""
    for name, type_name, default, meta in config_fields(cls):
        flag = "--" + name.replace("_", "-")
        help_ = meta.get("help", "") + ("" if meta.get("required") else f" (default: {default})")
        kind = _flag_type(type_name)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_, default=argparse.SUPPRESS)
        else:
            conv = _optional(kind) if "None" in str(type_name) else kind
            extra = {"nargs": meta["nargs"], "const": meta.get("const")} if "nargs" in meta else {}
            parser.add_argument(flag, type=conv, help=help_, choices=meta.get("choices"), default=argparse.SUPPRESS,
                                metavar=name.upper() if not meta.get("choices") else None, **extra)


def build_config(args: argparse.Namespace, cls=TrainConfig, **defaults):
    """Config = dataclass defaults < command defaults < YAML file < command-line flags."""
    values: dict = dict(defaults)
    names = {f.name for f in fields(cls)}
    if getattr(args, "config", None):
        import yaml

        with open(args.config) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"{args.config}: expected a mapping of setting: value")
        for key, value in loaded.items():
            name = str(key).replace("-", "_")
            if name not in names:
                raise SystemExit(f"{args.config}: unknown setting '{key}' (known: {', '.join(sorted(names))})")
            values[name] = value
    values.update({k: v for k, v in vars(args).items() if k in names})
    return cls(**values)


def cmd_train(args) -> int:
    from .train.loop import train

    cfg = build_config(args)
    if cfg.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from .train.distributed import launch

        return launch(cfg.nproc, _without_flag(args.argv, "--nproc"))
    summary = train(cfg)
    print(json.dumps({k: summary[k] for k in ("output_dir", "train", "eval")}, indent=None))
    return 0


def cmd_sft(args) -> int:
    from .train.loop import train

    summary = train(build_config(args, loss="sft"))
    print(json.dumps({k: summary[k] for k in ("output_dir", "train", "eval")}, indent=None))
    return 0


def cmd_pipeline(args) -> int:
    from .pipeline import run_pipeline

    overrides = {k: getattr(args, k) for k in ("sft_lr", "sft_max_steps", "sft_epochs", "sft_optimizer")
                 if getattr(args, k, None) is not None}
    print(json.dumps(run_pipeline(build_config(args), **overrides)))
    return 0


def cmd_score(args) -> int:
    from .score import score

    result = score(args.model, args.data, args.out, ref=args.ref, beta=args.beta, max_length=args.max_length,
                   max_prompt_length=args.max_prompt_length, batch_size=args.batch_size, on_invalid=args.on_invalid,
                   device=args.device, precision=args.precision, split=args.data_split,
                   layout=args.layout)
    print(json.dumps(result))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    result = run_demo(args.output_dir, steps=args.steps, seed=args.seed)
    return 0 if result["passed"] else 1


def cmd_experiment_sentiment(args) -> int:
    from .experiments.sentiment import run_sentiment, sentiment_config

    result = run_sentiment(sentiment_config(args, build_config))
    print(json.dumps({k: result[k] for k in ("output_dir", "points", "comparisons", "seconds")}))
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="directpo", description="Direct Preference Optimization for Hugging Face "
                                                               "causal LMs (Rafailov et al., 2023).")
    sub = p.add_subparsers(dest="command", required=True)

    def config_command(name: str, help_: str, func):
        """A command whose flags are TrainConfig's, with a YAML --config."""
        c = sub.add_parser(name, help=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        c.add_argument("--config", help="YAML file of settings (keys as the flags, dashes or underscores)")
        add_config_flags(c)
        c.set_defaults(func=func)
        return c

    config_command("train", "train a policy with DPO (or another --loss) on preference data", cmd_train)
    config_command("sft", "supervised fine-tuning (Preferred-FT on the chosen responses of a preference set, or on "
                          "prompt/completion rows)", cmd_sft)
    pl = config_command("pipeline", "the paper's recipe: Preferred-FT on the chosen responses, then DPO from (and "
                                    "against) that SFT model; resumable per stage", cmd_pipeline)
    pl.add_argument("--sft-lr", type=float, help="SFT stage learning rate (default: --lr)")
    pl.add_argument("--sft-max-steps", type=int, help="SFT stage steps (default: --max-steps / --epochs)")
    pl.add_argument("--sft-epochs", type=float, help="SFT stage epochs (default: --epochs)")
    pl.add_argument("--sft-optimizer", choices=["rmsprop", "adamw"], help="SFT stage optimizer (default: --optimizer)")
    pl.set_defaults(func=cmd_pipeline)

    s = sub.add_parser("score", help="log-probs (and implicit rewards, with --ref) of every pair in a file")
    s.add_argument("--model", required=True, help="model to score with (hub id or local dir)")
    s.add_argument("--data", required=True, help="preference data (same formats as train)")
    s.add_argument("--out", required=True, help="output JSONL: one line per pair, in input order")
    s.add_argument("--ref", help="reference model: adds implicit rewards β·(log π − log πref)")
    s.add_argument("--beta", type=float, default=0.1, help="β of the implicit reward")
    s.add_argument("--max-length", type=_optional(int), default=512)
    s.add_argument("--max-prompt-length", type=_optional(int), default=None)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--on-invalid", choices=["error", "skip"], default="error")
    s.add_argument("--data-split", default=None)
    s.add_argument("--device", default=None)
    s.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    s.add_argument("--layout", choices=["packed", "padded"], default="packed",
                   help="packed: each prompt computed once (exact); padded: one row per prompt+response")
    s.set_defaults(func=cmd_score)

    d = sub.add_parser("demo", help="no-network demo: tiny model, built-in task, DPO, held-out reward accuracy")
    d.add_argument("--output-dir", default=os.path.join("runs", "demo"))
    d.add_argument("--steps", type=int, default=60)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    ex = sub.add_parser("experiment", help="the paper's experiments, end to end, with a report")
    exs = ex.add_subparsers(dest="experiment", required=True)
    from .experiments.sentiment import SentimentConfig
    es = exs.add_parser("sentiment", help="controlled sentiment (Fig. 2 left): DPO vs PPO, PPO-GT, Unlikelihood, "
                                          "Preferred-FT, Best-of-N on reward vs KL; resumable; writes points.json, "
                                          "frontier.png, summary.md", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    es.add_argument("--config", help="YAML file of settings (keys as the flags)")
    add_config_flags(es, SentimentConfig)
    es.set_defaults(func=cmd_experiment_sentiment)

    from .bench import add_bench_parser
    add_bench_parser(sub)
    from .rlhf.commands import add_rlhf_parsers  # rm, ppo, sample, bon, eval
    add_rlhf_parsers(sub, add_config_flags)
    return p


def _without_flag(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    args.argv = argv
    from .data.formats import DataError

    try:
        return args.func(args)
    except (DataError, FileExistsError, PermissionError, ValueError, OSError) as e:
        print(f"directpo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
