"""`directpo bench --sample`: directpo's sampler against transformers' `generate`.

    directpo bench --sample --model M --data PROMPTS [--sample-k 1,16] [--sample-rows 64]
                   [--sample-batch 16] [--max-new-tokens 64] [--max-length 512] [--rounds 3]
                   [--threads N] [--device D] [--out results.json]

What is compared
    For each K of --sample-k: the first rows/K prompts of --data (any file `directpo sample`
    reads), tokenized once here (cut to max_length - max_new_tokens tokens), each repeated K times
    in a row: the same token rows for both systems, in batches of --sample-batch rows. Both sample
    from π itself (temperature 1, top-p 1, no top-k) with a KV cache, up to max_new_tokens new tokens
    a row, stopping a row at EOS. transformers gets the batches in input order, left-padded (a
    prompt's K rows are K rows to it, as with `num_return_sequences`); directpo's sampler does what
    it does with them (one prefill per distinct prompt, rows leaving at EOS, prompts ordered by
    length: `directpo.eval.sampling`).

How it is measured
    Every run is its own interpreter (`bench/sample_child.py`): one untimed warm-up batch, then
    all rows, timed as one span. tokens/s = generated tokens (EOS included, nothing after it) / that
    span; samples/s = rows / span; tokens/CPU-s the same over the process's CPU time in that span
    (less distorted by other work on a busy machine). Peak RSS is the process's ru_maxrss; "above import" subtracts its
    RSS once torch, transformers and directpo are imported, before the model is loaded. Runs alternate
    (round r: for each K, both systems, the first of them swapping each round); figures are medians
    over rounds, the ratio is directpo / transformers of the medians.
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

from ..console import log
from ..errors import UserValueError
from .report import DASH, fmt
from .runner import _machine, _versions, run_child

SYSTEMS = ("directpo", "generate")
LABELS = {"directpo": "directpo", "generate": "transformers generate"}
FIGURES = ("tokens_per_s", "samples_per_s", "peak_rss_mib", "rss_above_import_mib", "seconds", "tokens",
           "tokens_per_cpu_s")


def parse_ks(s: str) -> list[int]:
    try:
        ks = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise UserValueError(f"--sample-k: expected comma-separated integers, got {s!r}") from None
    if not ks or any(k < 1 for k in ks):
        raise UserValueError(f"--sample-k {s}: samples per prompt must be ≥ 1")
    return list(dict.fromkeys(ks))


def prompt_rows(cfg, n: int) -> list[list[int]]:
    """The first `n` prompts of --data as token ids (as `directpo sample` encodes them)."""
    from ..data.prompts import encode_prompt, load_prompts
    from ..models import load_tokenizer

    items = load_prompts(cfg.data, on_invalid="skip", split=cfg.data_split)
    if len(items) < n:
        raise UserValueError(f"{cfg.data}: {len(items)} usable prompts, --sample needs --sample-rows / K = {n}; "
                             "lower --sample-rows")
    tok = load_tokenizer(cfg.model)
    limit = cfg.max_length - cfg.max_new_tokens
    if limit < 1:
        raise UserValueError(f"--max-length {cfg.max_length} leaves no room for a prompt before "
                             f"--max-new-tokens {cfg.max_new_tokens}")
    return [encode_prompt(it.prompt, tok, limit) for it in items[:n]]


def _spec(cfg, system: str, k: int, prompts: list[list[int]]) -> dict:
    return {"system": system, "model": cfg.model, "prompts": prompts, "k": k, "batch": cfg.sample_batch,
            "max_new_tokens": cfg.max_new_tokens, "seed": 0, "threads": cfg.threads, "device": cfg.device}


def run_rounds(cfg, ks: list[int], prompts: dict[int, list[list[int]]], work: Path) -> list[dict]:
    runs = []
    for r in range(cfg.rounds):
        for k in ks:
            order = SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]  # who goes first swaps each round
            for system in order:
                log(f"round {r + 1}/{cfg.rounds}: K={k}: {LABELS[system]} ...", prefix="bench")
                raw = run_child(_spec(cfg, system, k, prompts[k]), work, f"r{r}-k{k}-{system}",
                                module="directpo.bench.sample_child")
                run = {"round": r + 1, "k": k, "system": system, **raw}
                runs.append(run)
                if "error" in raw:
                    log(f"round {r + 1}: K={k}: {LABELS[system]} FAILED ({raw['error']}):\n  " +
                        "\n  ".join(raw.get("log_tail") or []), prefix="bench")
                else:
                    log(f"round {r + 1}: K={k}: {LABELS[system]}: {raw['tokens_per_s']:.0f} tokens/s, "
                        f"peak RSS {raw['peak_rss_mib']:.0f} MiB", prefix="bench")
    return runs


def summarize(runs: list[dict], ks: list[int]) -> list[dict]:
    """Per K: each system's medians over its rounds that ran, and directpo / generate."""
    out = []
    for k in ks:
        row: dict = {"k": k}
        for system in SYSTEMS:
            ok = [x for x in runs if x["k"] == k and x["system"] == system and "error" not in x]
            row[system] = {f: statistics.median(x[f] for x in ok) if ok else None for f in FIGURES}
            row[system]["rounds_ok"] = len(ok)
        a, b = row["directpo"], row["generate"]
        row["ratio"] = {f: a[f] / b[f] if a[f] and b[f] else None
                        for f in ("tokens_per_s", "samples_per_s", "peak_rss_mib", "rss_above_import_mib",
                                  "tokens_per_cpu_s")}
        out.append(row)
    return out


def format_table(r: dict) -> str:
    """A markdown table: one row per K and system, the ratios on directpo's row."""
    s, m = r["settings"], r["machine"]
    lines = [f"Sampling: {s['model']}, {s['rows']} rows per run in batches of {s['batch']}, "
             f"≤ {s['max_new_tokens']} new tokens, temperature 1, top-p 1, {s['rounds']} round(s), medians; "
             f"{m['device_name']}, {m['threads']} threads", "",
             "| K | system | tokens/s | samples/s | peak RSS MiB | above import MiB | tokens/s ratio | "
             "peak RSS ratio | tokens/CPU-s ratio |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["results"]:
        for system in SYSTEMS:
            x, q = row[system], row["ratio"] if system == "directpo" else {}
            lines.append(f"| {row['k']} | {LABELS[system]} | {fmt(x['tokens_per_s'], '.0f', DASH)} | "
                         f"{fmt(x['samples_per_s'], '.2f', DASH)} | {fmt(x['peak_rss_mib'], '.0f', DASH)} | "
                         f"{fmt(x['rss_above_import_mib'], '.0f', DASH)} | {fmt(q.get('tokens_per_s'), '.2f', DASH)} | "
                         f"{fmt(q.get('peak_rss_mib'), '.2f', DASH)} | {fmt(q.get('tokens_per_cpu_s'), '.2f', DASH)} |")
    return "\n".join(lines)


def sample_bench(cfg) -> dict:
    """Everything `directpo bench --sample` measures, as one JSON-able dict (its "table": markdown)."""
    import torch

    from .. import __version__
    from ..models import pick_device

    ks = parse_ks(cfg.sample_k)
    if cfg.rounds < 1:
        raise UserValueError("--rounds must be ≥ 1")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    prompts = {k: prompt_rows(cfg, max(1, cfg.sample_rows // k)) for k in ks}
    work = Path(tempfile.mkdtemp(prefix="directpo-bench-sample-"))
    try:
        runs = run_rounds(cfg, ks, prompts, work)
    finally:
        if cfg.keep_work:
            log(f"work dir (kept): {work}", prefix="bench")
        else:
            shutil.rmtree(work, ignore_errors=True)
    settings = {"model": cfg.model, "data": cfg.data, "rows": cfg.sample_rows, "k": ks, "batch": cfg.sample_batch,
                "max_new_tokens": cfg.max_new_tokens, "max_prompt_length": cfg.max_length - cfg.max_new_tokens,
                "rounds": cfg.rounds, "temperature": 1.0, "top_p": 1.0, "top_k": None,
                "prompt_tokens": {k: [len(p) for p in prompts[k]] for k in ks}}
    out = {"directpo_version": __version__, "versions": _versions(), "machine": _machine(pick_device(cfg.device)),
           "settings": settings, "definitions": {"tokens_per_s": "generated tokens (EOS included) / wall time of "
                                                 "sampling all rows", "rss_above_import_mib": "peak RSS - RSS after "
                                                 "the imports, before loading the model"},
           "results": summarize(runs, ks), "runs": runs}
    out["table"] = format_table(out)
    return out
