"""TRL parity: TRL 1.16 DPOTrainer's precomputed reference log-probs and `directpo score`'s, on the
same real HH-RLHF pairs, compared per pair (run by tests/bench/test_trl_parity.py and
scripts/trl_parity.py; the shared bench folder, `shared/`, is passed in).

* TRL: `DPOTrainer(precompute_ref_log_probs=True)` fills `ref_chosen_logps` / `ref_rejected_logps`
  into its processed train dataset at construction; we read those columns. TRL gets the explicit
  prompt/chosen/rejected from `shared/bench/hh_pairs.py`.
* directpo: `directpo score` on the *raw* HH rows ({chosen, rejected} transcripts, written to a
  JSONL), so directpo's own HH prompt split is exercised, with `--on-invalid skip`.

Rows are matched by index: TRL's dataset carries an `idx` column, directpo's output a `row`
field (the JSONL line). TRL drops rows whose prompt alone is >= max_length; directpo skips the
same rows as 'prompt_too_long'.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from pathlib import Path

def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def shared_modules(shared: Path):
    """(fixture, hh_pairs) modules of the shared bench, or FileNotFoundError."""
    bench = shared / "bench"
    for f in ("fixture.py", "hh_pairs.py"):
        if not (bench / f).exists():
            raise FileNotFoundError(bench / f)
    fixture = load_module(bench / "fixture.py", "_directpo_shared_fixture")
    hh_pairs = load_module(bench / "hh_pairs.py", "_directpo_shared_hh_pairs")
    if not Path(hh_pairs.HH).exists():
        raise FileNotFoundError(hh_pairs.HH)
    return fixture, hh_pairs


def candidate_rows(hh_pairs, scan: int | None = None):
    """(raw row, explicit pair) for the HH rows hh_pairs.pairs() keeps, in file order."""
    with gzip.open(hh_pairs.HH, "rt") as f:
        for i, line in enumerate(f):
            if scan is not None and i >= scan:
                break
            raw = json.loads(line)
            p = hh_pairs.split(raw["chosen"], raw["rejected"])
            if p and p["chosen"].strip() and p["rejected"].strip() and p["chosen"] != p["rejected"]:
                yield {"chosen": raw["chosen"], "rejected": raw["rejected"]}, p


def lengths(tok, pair) -> tuple[int, int]:
    """(prompt tokens, longest prompt+response tokens incl. EOS), as TRL tokenizes them."""
    n_prompt = len(tok(pair["prompt"])["input_ids"])
    n_full = max(len(tok(pair["prompt"] + pair[k] + tok.eos_token)["input_ids"]) for k in ("chosen", "rejected"))
    return n_prompt, n_full


def select_first(hh_pairs, n: int):
    """The first n usable HH pairs, in file order (what hh_pairs.pairs(limit=n) returns)."""
    out = []
    for raw, p in candidate_rows(hh_pairs):
        out.append((raw, p))
        if len(out) >= n:
            break
    return out


def select_mixed(hh_pairs, tok, max_length: int, n_plain: int, n_truncated: int, n_prompt_too_long: int,
                 scan: int = 400):
    """A small set mixing ordinary pairs, pairs whose response gets truncated at max_length, and
    pairs whose prompt alone is >= max_length (dropped by TRL, skipped by directpo)."""
    plain, trunc, too_long = [], [], []
    for raw, p in candidate_rows(hh_pairs, scan):
        n_prompt, n_full = lengths(tok, p)
        if n_prompt >= max_length:
            bucket, cap = too_long, n_prompt_too_long
        elif n_full > max_length:
            bucket, cap = trunc, n_truncated
        else:
            bucket, cap = plain, n_plain
        if len(bucket) < cap:
            bucket.append((raw, p))
        if len(plain) >= n_plain and len(trunc) >= n_truncated and len(too_long) >= n_prompt_too_long:
            break
    # Interleave so truncated rows do not all land in one length-sorted batch position.
    out, k = [], 0
    extras = trunc + too_long
    for i, item in enumerate(plain):
        out.append(item)
        if i % 3 == 2 and k < len(extras):
            out.append(extras[k])
            k += 1
    out += extras[k:]
    return out


def trl_ref_logps(model_dir, pairs: list[dict], max_length: int, batch_size: int = 8) -> dict[int, dict]:
    """{idx: {chosen, rejected, prompt_ids, chosen_ids, rejected_ids}} from TRL's precompute."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = Dataset.from_list([{"idx": i, **p} for i, p in enumerate(pairs)])
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = DPOConfig(output_dir=out_dir, precompute_ref_log_probs=True, precompute_ref_batch_size=batch_size,
                        per_device_train_batch_size=batch_size, max_length=max_length, use_cpu=True,
                        report_to="none", save_strategy="no", dataloader_num_workers=0, seed=0,
                        bf16=False, fp16=False, disable_tqdm=True)
        # The reference log-probs are computed in __init__ (`_precompute_ref_logps`) and stored as
        # columns of the processed train dataset; no training step is needed.
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
        proc = trainer.train_dataset
        cols = proc.select_columns(["idx", "ref_chosen_logps", "ref_rejected_logps", "prompt_ids", "chosen_ids",
                                    "rejected_ids"]).to_list()
    return {r["idx"]: {"chosen": r["ref_chosen_logps"], "rejected": r["ref_rejected_logps"],
                       "prompt_ids": r["prompt_ids"], "chosen_ids": r["chosen_ids"],
                       "rejected_ids": r["rejected_ids"]} for r in cols}


def directpo_logps(model_dir, raw_rows: list[dict], max_length: int, work: Path) -> dict[int, dict]:
    """{row: score line} from `directpo score` on the raw HH rows. `--max-prompt-length max_length - 1`
    reproduces TRL's truncation (the prompt kept whole, the responses cut to fit) for every pair TRL
    keeps; directpo's default would instead cut the prompt of a pair that does not fit to half of
    max_length. Prompts of max_length tokens or more, which TRL drops, directpo cuts and keeps."""
    from ..eval.score import score

    data = work / "hh_raw.jsonl"
    out = work / "scores.jsonl"
    with open(data, "w") as f:
        for r in raw_rows:
            f.write(json.dumps(r) + "\n")
    score(str(model_dir), str(data), str(out), max_length=max_length, max_prompt_length=max_length - 1,
          on_invalid="skip", device="cpu")  # (what `directpo score` runs)
    with open(out) as f:
        return {d["row"]: d for d in map(json.loads, f)}


def compare(trl: dict[int, dict], dpo: dict[int, dict], max_length: int) -> dict:
    """Per-pair differences over the rows both kept, plus bookkeeping of what differed."""
    both = sorted(set(trl) & set(dpo))
    diffs, per_pair = [], []
    token_mismatch, truncated = [], 0
    for i in both:
        t, d = trl[i], dpo[i]
        room = max_length - len(t["prompt_ids"])
        n_c, n_r = min(len(t["chosen_ids"]), room), min(len(t["rejected_ids"]), room)
        truncated += (len(t["chosen_ids"]) > room) or (len(t["rejected_ids"]) > room)
        if (n_c, n_r) != (d["chosen_tokens"], d["rejected_tokens"]):
            token_mismatch.append({"row": i, "trl": [n_c, n_r], "directpo": [d["chosen_tokens"], d["rejected_tokens"]]})
        dc, dr = abs(d["chosen_logp"] - t["chosen"]), abs(d["rejected_logp"] - t["rejected"])
        diffs += [dc, dr]
        per_pair.append({"row": i, "chosen": dc, "rejected": dr})
    return {
        "compared": len(both), "truncated": int(truncated),
        "trl_only": sorted(set(trl) - set(dpo)), "directpo_only": sorted(set(dpo) - set(trl)),
        "max_abs_diff": max(diffs) if diffs else float("nan"),
        "mean_abs_diff": sum(diffs) / len(diffs) if diffs else float("nan"),
        "token_count_mismatches": token_mismatch, "per_pair": per_pair,
    }
