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
    parser.set_defaults(func=run)


def run(args) -> int:
    """Print the table, write --out, exit 0 if anything was measured."""
    from ..bench import run_bench

    result = run_bench(args)
    print(result["table"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.out}")
    ok = any(x["pairs_per_s"] is not None for x in result["results"]) or \
        any("peak_rss_mib" in x for x in result["vocab_sweep"])
    return 0 if ok else 1
