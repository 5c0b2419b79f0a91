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
    if cfg.vision:
        return _vision(cfg)
    if cfg.wall_time:
        return _wall_time(cfg)
    if cfg.sample:
        return _sample(cfg)
    if cfg.end_to_end:
        return _end_to_end(cfg)
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


def _write_result(result: dict, out: str | None) -> None:
    """The table printed; with --out, the JSON there and the table beside it (.md)."""
    print(result["table"])
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        out.with_suffix(".md").write_text(result["table"] + "\n")
        print(f"\nwrote {out} and {out.with_suffix('.md')}")


def _sample(cfg) -> int:
    """`--sample`: the markdown table printed, JSON at --out and the table beside it (.md); exit 0
    if every K was measured on both systems."""
    from ..bench.sampling import sample_bench

    result = sample_bench(cfg)
    _write_result(result, cfg.out)
    ok = all(r["directpo"]["rounds_ok"] and r["generate"]["rounds_ok"] for r in result["results"])
    return 0 if ok else 1


def _end_to_end(cfg) -> int:
    """`--end-to-end`: the markdown table printed, JSON at --out and the table beside it (.md); exit
    0 if every system asked for was measured in every round."""
    from ..bench.end_to_end import end_to_end

    result = end_to_end(cfg)
    _write_result(result, cfg.out)
    ok = bool(result["results"]) and all(r["rounds_failed"] == 0 for r in result["results"])
    return 0 if ok else 1


def _vision(cfg) -> int:
    """`--vision`: the markdown table printed, JSON at --out and the table beside it (.md); exit 0
    if every run was measured in every round."""
    from ..bench.vision import vision_bench

    result = vision_bench(cfg)
    _write_result(result, cfg.out)
    return 0 if all(r["rounds_failed"] == 0 for r in result["results"]) else 1


def _wall_time(cfg) -> int:
    """`--wall-time`: the markdown table printed, JSON at --out and the table beside it (.md); exit 0
    if every command ran on both trees in every round."""
    from ..bench.wall_time import TREES, wall_time

    result = wall_time(cfg)
    _write_result(result, cfg.out)
    return 0 if all(r[t]["rounds_failed"] == 0 for r in result["results"] for t in TREES) else 1
