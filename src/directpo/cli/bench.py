"""`directpo bench`: directpo vs TRL's DPOTrainer on the same model and data (see `directpo.bench`)."""
from __future__ import annotations

import json
from pathlib import Path


def register(command: str, parser) -> None:
    b = parser
    b.add_argument("--model", required=True, help="model (hub id or local dir) both systems train")
    b.add_argument("--data", required=True, help="preference data (any format `train` reads)")
    b.add_argument("--batch", type=int, default=8, help="pairs per optimizer step (one micro-batch)")
    b.add_argument("--micro-batch", type=int, default=0,
                   help="directpo: pairs per forward/backward, accumulated to --batch (0: one micro-batch); "
                        "smaller lowers peak memory, the optimizer step is the same")
    b.add_argument("--max-length", type=int, default=512, help="max prompt + response tokens")
    b.add_argument("--steps", type=int, default=10, help="timed optimizer steps (after one warm-up step)")
    b.add_argument("--rounds", type=int, default=2, help="rounds of alternating runs; figures are medians")
    b.add_argument("--systems", default="directpo,trl", help="comma-separated: directpo, trl (or none)")
    b.add_argument("--out", default=None, help="write everything as JSON here")
    b.add_argument("--threads", type=int, default=0, help="torch CPU threads in every run (0: torch's default)")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    b.add_argument("--vocab-sweep", default=None,
                   help="comma-separated vocabulary sizes: directpo fp32 peak RSS of a random-init copy at each")
    b.add_argument("--memory-budget", default=None,
                   help="directpo runs pick their micro-batch for this memory, e.g. 8GiB; the plan is printed")
    b.add_argument("--data-split", default=None, help="split name for `datasets` sources")
    b.add_argument("--keep-work", action="store_true", help="keep the temporary work dir (specs, logs)")
    m = parser.add_argument_group("memory checks (instead of the speed comparison)")
    m.add_argument("--plan-check", action="store_true",
                   help="`directpo plan`'s memory per component against the measured peak RSS of one CPU training run "
                        "of --steps + 1 steps (fp32, one process), and the ratio measured/plan")
    m.add_argument("--optimizer", default="rmsprop", choices=["rmsprop", "adamw", "sgd"],
                   help="--plan-check: the run's optimizer")
    m.add_argument("--lora-r", type=int, default=0,
                   help="LoRA rank of every run, both systems (adapters on every linear layer of the blocks, "
                        "directpo's α and dropout; 0: full fine-tuning); with --plan-check, of that run")
    m.add_argument("--allocator", default="both", choices=["both", "mmap", "glibc"],
                   help="--plan-check: measure with glibc's defaults (freed memory stays in its heap), with "
                        "MALLOC_MMAP_THRESHOLD_=65536 (RSS follows the live tensors), or both (two runs)")
    m.add_argument("--fsdp-memory", action="store_true",
                   help="peak host memory (VmHWM) of each rank of `directpo train --nproc N --fsdp --max-steps 2 "
                        "--save-every 1`, and of the same run in one process, polled from outside")
    m.add_argument("--nproc", type=int, default=2, help="--fsdp-memory: processes of the sharded run")
    m.add_argument("--checkpoint-format", default="sharded", choices=["full", "sharded"],
                   help="--fsdp-memory: the sharded run's checkpoints (code without the flag: full only)")
    m.add_argument("--pythonpath", default=None,
                   help="--fsdp-memory: put this directory first on the measured commands' PYTHONPATH (e.g. an old "
                        "commit's src/, to measure that code); the harness itself runs this code")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Print the table, write --out, exit 0 if anything was measured."""
    if args.plan_check and args.fsdp_memory:
        raise ValueError("--plan-check and --fsdp-memory are two separate measurements: give one")
    if args.plan_check or args.fsdp_memory:
        if args.plan_check:
            from ..bench.plan_check import plan_check as measure
        else:
            from ..bench.fsdp_memory import fsdp_memory as measure
        result = measure(args)
    else:
        from ..bench import run_bench

        result = run_bench(args)
    print(result["table"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.out}")
    if args.plan_check or args.fsdp_memory:
        return 0
    ok = any(x["pairs_per_s"] is not None for x in result["results"]) or \
        any("peak_rss_mib" in x for x in result["vocab_sweep"])
    return 0 if ok else 1
