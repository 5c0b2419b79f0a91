"""`directpo score`, `sample`, `bon`, `eval`: scoring pairs, sampling, Best-of-N, evaluation (flags from
the settings of `directpo.eval.config`), each the Python API's job (`directpo.api`)."""
from __future__ import annotations

import json

from ..config import add_flags, build_config
from ..eval.config import BonConfig, EvalConfig, SampleConfig, ScoreConfig
from .args import HelpFormatter


def run_score(args) -> int:
    from ..api import score

    print(json.dumps(score(build_config(args, ScoreConfig))))
    return 0


def run_sample(args) -> int:
    from ..api import sample

    print(json.dumps(sample(build_config(args, SampleConfig))))
    return 0


def run_bon(args) -> int:
    from ..api import best_of_n

    print(json.dumps(best_of_n(build_config(args, BonConfig))))
    return 0


_SUMMARY_KEYS = ("reward_mean", "reward_se", "kl_mean", "kl_se", "length_mean", "win_rate", "win_rate_ci",
                 "win_rate_lc", "win_rate_lc_ci", "judge_kind", "judge_consistency", "judge_failures",
                 "judge_parse_failures")


def run_eval(args) -> int:
    from ..api import evaluate

    cfg = build_config(args, EvalConfig)
    res = evaluate(cfg)
    summary = {k: res.get(k) for k in _SUMMARY_KEYS if k in res}
    summary.update({k: getattr(cfg, k) for k in ("out", "samples_out", "plot") if getattr(cfg, k)})  # final paths
    print(json.dumps(summary))
    return 0


_COMMANDS = {"score": (ScoreConfig, run_score), "sample": (SampleConfig, run_sample), "bon": (BonConfig, run_bon),
             "eval": (EvalConfig, run_eval)}


def register(command: str, parser) -> None:
    cls, run = _COMMANDS[command]
    parser.formatter_class = HelpFormatter
    add_flags(parser, cls, check_ranges_early=True)
    parser.set_defaults(func=run)
