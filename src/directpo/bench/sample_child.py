"""One sampling measurement in its own interpreter (`python -m directpo.bench.sample_child --child SPEC`):
directpo's sampler or transformers' `generate` on the spec's token rows; see `bench/sampling.py`.

Both systems get the same model, the same rows (prompt ids, each prompt K times in a row, cut into
batches of `batch` rows in that order), max_new_tokens, temperature 1, top-p 1 and no top-k, a KV
cache, and one untimed warm-up batch of two new tokens. The timed span is the whole sampling of all
rows (batching, prefill, decode, unpadding), not a per-step mean.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

MiB = 1 << 20


def _peak_rss() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / MiB if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def _directpo(model, tok, rows: list[list[int]], spec: dict, max_new_tokens: int) -> list[list[int]]:
    from ..eval.sampling import generate_completions

    return generate_completions(model, tok, rows, max_new_tokens, 1.0, 1.0, spec["seed"], spec["batch"])


def _generate(model, tok, rows: list[list[int]], spec: dict, max_new_tokens: int) -> list[list[int]]:
    """transformers' `generate`, batch by batch in input order (left-padded), cut after EOS."""
    import torch
    from transformers import GenerationConfig

    from ..eval.sampling import cut_at_eos

    eos, pad = tok.eos_token_id, tok.pad_token_id
    # top_k=0: no top-k filter (transformers' default is 50), so both sample from π itself
    gc = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                          use_cache=True, pad_token_id=pad, eos_token_id=eos)
    torch.manual_seed(spec["seed"])
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(rows), spec["batch"]):
        chunk = rows[s:s + spec["batch"]]
        P = max(map(len, chunk))
        ids = torch.tensor([[pad] * (P - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.no_grad():
            g = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
        out += [cut_at_eos(r, eos) for r in g[:, P:].tolist()]
    return out


def measure(spec: dict) -> dict:
    """Load, warm up, sample every row once (timed); figures and the RSS after the imports."""
    import torch
    import transformers  # noqa: F401  (both systems' imports before the baseline)

    from ..eval import sampling  # noqa: F401
    from ..models import load_model, load_tokenizer, pick_device, quiet_transformers
    from .procfs import read_status

    quiet_transformers()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    baseline = read_status().get("VmRSS", 0) / MiB
    tok = load_tokenizer(spec["model"])
    model = load_model(spec["model"], pick_device(spec.get("device"))).eval()
    rows = [p for p in spec["prompts"] for _ in range(spec["k"])]
    run = _directpo if spec["system"] == "directpo" else _generate
    run(model, tok, rows[:spec["batch"]], spec, 2)  # warm-up: first-call costs out of the timing
    t, cpu = time.perf_counter(), time.process_time()
    comps = run(model, tok, rows, spec, spec["max_new_tokens"])
    seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - cpu
    tokens = sum(len(c) for c in comps)
    # CPU time besides wall time: on a machine busy with other work, wall time measures the load too
    return {"seconds": seconds, "samples": len(comps), "tokens": tokens, "tokens_per_s": tokens / seconds,
            "cpu_seconds": cpu_seconds, "tokens_per_cpu_s": tokens / cpu_seconds,
            "samples_per_s": len(comps) / seconds, "ended_with_eos": sum(bool(c) and c[-1] == tok.eos_token_id
                                                                       for c in comps),
            "import_rss_mib": baseline, "threads": torch.get_num_threads()}


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    res = measure(spec)
    res["peak_rss_mib"] = _peak_rss()
    res["rss_above_import_mib"] = res["peak_rss_mib"] - res["import_rss_mib"]
    Path(spec["result"]).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(main(sys.argv[2]))
    sys.exit("usage: python -m directpo.bench.sample_child --child SPEC.json (internal; use `directpo bench --sample`)")
