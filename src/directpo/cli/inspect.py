"""`directpo inspect`: a report on preference data, read exactly as `train` reads it."""
from __future__ import annotations

import json
import os

from .args import HelpFormatter, max_length, non_negative, optional_int, positive


def register(command: str, parser) -> None:
    p = parser
    p.formatter_class = HelpFormatter
    p.add_argument("--data", required=True, help="preference data: .jsonl/.json/.parquet file, or a `datasets` "
                                                 "name/dir (the formats train reads)")
    p.add_argument("--model", help="the reference model: its tokenizer, and its log-probs of every pair (how often "
                                   "it already prefers the chosen response)")
    p.add_argument("--tokenizer", help="tokenize with this model's tokenizer instead (default: --model's); with it "
                                       "and no --model, no log-probs are computed")
    p.add_argument("--max-length", type=max_length, default=512,
                   help="max tokens of prompt + response, as train's (none: no limit)")
    p.add_argument("--max-prompt-length", type=optional_int, default=None,
                   help="max prompt tokens, as train's (default: none; prompts of pairs that do not fit are cut)")
    p.add_argument("--on-invalid", choices=["error", "skip"], default="error",
                   help="bad rows, as train's: 'error' reports where train would stop, 'skip' what it would leave "
                        "out; invalid rows are counted by kind either way")
    p.add_argument("--data-split", default=None, help="split name for `datasets` sources (default: train)")
    p.add_argument("--out", help="write report.md, report.json, pairs.jsonl and PNG figures in this directory")
    p.add_argument("--overwrite", action="store_true", help="replace a report that exists in --out")
    p.add_argument("--batch-size", type=positive, default=8, help="pairs scored at once with --model")
    p.add_argument("--device", default=None, help="cpu or cuda for --model (default: cuda when available)")
    p.add_argument("--threads", type=non_negative, default=0,
                   help="CPU threads for the reference's log-probs (default 0: one for a tiny model, hidden size "
                        "≤ 256, else torch's default)")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                   help="reference log-prob precision (auto: bf16 where this machine runs it faster)")
    p.add_argument("--json", action="store_true", help="print report.json's content instead of the summary")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.set_defaults(func=run)


def check_out(out: str | None, inputs: dict[str, str | None], overwrite: bool) -> None:
    """--out is a folder that may be written into (`outputs.check_output_dir`: not a file, not an
    input's folder, not someone else's files without --overwrite) holding no report unless
    --overwrite."""
    if not out:
        return
    from ..inspect.report import REPORT_FILES
    from ..outputs import check_output_dir

    check_output_dir(out, inputs, overwrite, flag="--out", markers=REPORT_FILES, what="directpo report")
    for name in REPORT_FILES:
        path = os.path.join(out, name)
        if os.path.lexists(path) and not overwrite:
            raise FileExistsError(f"--out {out} holds a report ({name}): pass --overwrite to replace it")


def run(args) -> int:
    if not args.model and not args.tokenizer:
        raise ValueError("give --model (the reference: its tokenizer and log-probs) or --tokenizer (tokens only)")
    if args.max_length is not None and args.max_prompt_length is not None and args.max_prompt_length >= args.max_length:
        raise ValueError("--max-prompt-length must be smaller than --max-length")
    check_out(args.out, {"--data": args.data, "--model": args.model, "--tokenizer": args.tokenizer}, args.overwrite)
    from ..inspect import console_summary, inspect_data, write_report
    from ..models import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or args.model)
    ins = inspect_data(args.data, tokenizer, model=args.model, max_length=args.max_length,
                       max_prompt_length=args.max_prompt_length, on_invalid=args.on_invalid, split=args.data_split,
                       batch_size=args.batch_size, device=args.device, precision=args.precision,
                       progress=args.progress, threads=args.threads)
    paths = write_report(ins, args.out) if args.out else []
    if args.json:
        print(json.dumps({k: v for k, v in ins.items() if k != "per_pair"}, ensure_ascii=False))
    else:
        print(console_summary(ins))
        if paths:
            print(f"report: {paths[0]} (and {', '.join(os.path.basename(p) for p in paths[1:])})")
    return 0
