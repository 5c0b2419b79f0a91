"""Parity check: `directpo score` against TRL's DPOTrainer precomputed reference log-probs.

    python scripts/trl_parity.py [--size tiny|small|base] [--pairs 64] [--max-length 512]
                                 [--vocab-size 8192] [--model-dir DIR] [--shared DIR]

Builds the shared fixture model (`shared/bench/fixture.py`, random seeded Llama + BPE tokenizer
trained on HH-RLHF), takes the first N real HH-RLHF pairs, and computes per-pair summed response
log-probs twice, in fp32 on the CPU:

* TRL 1.16: `DPOTrainer(precompute_ref_log_probs=True)` fills `ref_chosen_logps` /
  `ref_rejected_logps` into its processed train dataset at construction; we read those columns.
  TRL gets the explicit prompt/chosen/rejected from `shared/bench/hh_pairs.py`.
* directpo: `directpo score` on the *raw* HH rows ({chosen, rejected} transcripts, written to a
  JSONL), so directpo's own HH prompt split is exercised, with `--on-invalid skip`.

Rows are matched by index: TRL's dataset carries an `idx` column, directpo's output a `row`
field (the JSONL line). TRL drops rows whose prompt alone is >= max_length; directpo skips the
same rows as 'prompt_too_long'. Prints one JSON line: max/mean |Δ| over chosen and rejected, and
how many compared pairs were truncated, dropped, or tokenized differently.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DIRECTPO_SHARED", REPO.parent / "shared"))

from directpo.bench.trl_parity import (compare, directpo_logps, select_first, shared_modules,  # noqa: E402
                                       trl_ref_logps)


def run(size: str = "small", n_pairs: int = 64, max_length: int = 512, vocab_size: int = 8192,
        model_dir: str | None = None, shared: Path = SHARED) -> dict:
    fixture, hh_pairs = shared_modules(shared)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if model_dir is None:
            model_dir = fixture.build(work / "model", size=size, vocab_size=vocab_size)
        t_build = time.perf_counter() - t0
        selected = select_first(hh_pairs, n_pairs)
        raw_rows = [r for r, _ in selected]
        pairs = [p for _, p in selected]
        t1 = time.perf_counter()
        trl = trl_ref_logps(model_dir, pairs, max_length)
        t2 = time.perf_counter()
        dpo = directpo_logps(model_dir, raw_rows, max_length, work)
        t3 = time.perf_counter()
    res = compare(trl, dpo, max_length)
    per_pair = res.pop("per_pair")
    worst = max(per_pair, key=lambda r: max(r["chosen"], r["rejected"])) if per_pair else None
    import trl as trl_mod

    return {"size": size, "vocab_size": vocab_size, "pairs": len(pairs), "max_length": max_length,
            "trl_version": trl_mod.__version__, **res, "worst_row": worst,
            "seconds": {"build": round(t_build, 2), "trl": round(t2 - t1, 2), "directpo": round(t3 - t2, 2)}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small", choices=["tiny", "small", "base"])
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--vocab-size", type=int, default=8192, help="fixture tokenizer vocabulary (fixture default)")
    ap.add_argument("--model-dir", default=None, help="score an existing model dir instead of building the fixture")
    ap.add_argument("--shared", default=str(SHARED), help="the shared dir holding bench/ and data/")
    ap.add_argument("--tol", type=float, default=1e-3, help="exit 1 when max |Δ| exceeds this")
    a = ap.parse_args(argv)
    res = run(a.size, a.pairs, a.max_length, a.vocab_size, a.model_dir, Path(a.shared))
    print(json.dumps(res))
    ok = res["max_abs_diff"] <= a.tol and not res["trl_only"] and not res["directpo_only"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
