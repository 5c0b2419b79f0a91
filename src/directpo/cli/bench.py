"""`directpo bench`: directpo vs TRL's DPOTrainer on the same model and data (see `directpo.bench`; flags
from `directpo.bench.config.BenchConfig`)."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import add_flags, build_config


def register(command: str, parser) -> None:
    from ..bench.config import BenchConfig

    add_flags(parser, BenchConfig)
    parser.set_defaults(func=run)


def run(args) -> int:
    """Print the table, write --out, exit 0 if anything was measured."""
    from ..bench.config import BenchConfig

    cfg = build_config(args, BenchConfig).validate()
    if cfg.plan_check or cfg.fsdp_memory:
        if cfg.plan_check:
            from ..bench.plan_check import plan_check as measure
        else:
            from ..bench.fsdp_memory import fsdp_memory as measure
        result = measure(cfg)
    else:
        from ..bench import run_bench

        result = run_bench(cfg)
    print(result["table"])
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {cfg.out}")
    if cfg.plan_check or cfg.fsdp_memory:
        return 0
    ok = any(x["pairs_per_s"] is not None for x in result["results"]) or \
        any("peak_rss_mib" in x for x in result["vocab_sweep"])
    return 0 if ok else 1
