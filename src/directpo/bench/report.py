"""From raw run results to figures: per-run summaries, medians over rounds, the directpo vs TRL
comparison, and the printed report."""
from __future__ import annotations

import statistics

from .flops import ModelDims, live_reference_factor, prefix_shared_counts, train_flops

TOKENS_DEFINITION = ("tokens = real prompt + response tokens of the padded-equivalent layout (prompt counted once per "
                     "response, no padding), the same for both systems")
FLOPS_DEFINITION = ("model FLOPs = 6·N·T + 6·h·V·Lab + 12·layers·d_attn·A (fwd+bwd); N = non-embedding params, "
                    "T = tokens through the backbone, Lab = label tokens through the LM head, A = attended "
                    "query-key pairs (len²/2 causal). directpo: T = P + ΣL, A = P²/2 + Σ(P·L + L²/2); "
                    "TRL: T = Σ(P + L), A = Σ(P + L)²/2; a live reference adds F/3. With --lora-r (frozen "
                    "weights, no weight gradients): 4·N·T + 4·h·V·Lab + ..., a live reference adds half")
PAIRS_DEFINITION = ("pairs/s = pairs of the timed steps / time from the end of warm-up step 1 to the end of the "
                    "last step")
DEFINITIONS = {"pairs_per_s": PAIRS_DEFINITION, "tokens": TOKENS_DEFINITION, "flops": FLOPS_DEFINITION,
               "pct_of_peak": "GFLOP/s / the measured matmul peak in the run's precision",
               "peak_rss_mib": "ru_maxrss of the run's own process",
               "peak_above_import_mib": "peak RSS minus the process's RSS once its libraries are imported, before "
                                        "the model is loaded (both: torch with torch.distributed and dynamo, "
                                        "transformers' model code, the model's architecture module; TRL's side "
                                        "also datasets and trl)",
               "median": "over rounds, per figure"}
MEDIAN_KEYS = ("pairs_per_s", "tokens_per_s", "tokens_processed_per_s", "peak_rss_mib", "import_rss_mib",
               "peak_above_import_mib", "gflops", "cuda_peak_mib")


# ------------------------------------------------------------------------------------------------
# One run


def step_members(n: int, batch: int, seed: int, steps: int) -> list[list[int]] | None:
    """Which pairs directpo's loop put in each step (its seeded order), or None if unavailable."""
    try:
        from ..training.loop import batch_order
    except ImportError:
        return None
    order = batch_order(n, batch, seed)
    return [next(order)[1] for _ in range(steps)]


def _rates(pairs, seconds, tokens, processed, flops, exact: bool) -> dict:
    return {"pairs": pairs, "seconds": seconds, "pairs_per_s": pairs / seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds, "tokens_processed_per_s": processed / seconds,
            "flops": flops, "gflops": flops / seconds / 1e9, "tokens_exact": exact}


def summarize_directpo(raw: dict, tokenized, dims: ModelDims, batch: int) -> dict:
    steps = sorted(raw["steps"], key=lambda s: s["step"])
    if len(steps) < 2:
        raise ValueError("directpo run logged fewer than 2 steps")
    timed = steps[1:]
    if all(s.get("elapsed_s") is not None for s in steps):
        seconds = steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]
    else:
        seconds = sum(s["dt"] for s in timed)
    pairs = sum(s["pairs"] for s in timed)
    processed = sum(s["tokens_processed"] for s in timed)
    # Padded-equivalent tokens and FLOPs per step need the step's pairs: recompute the loop's
    # seeded order, and trust it only if it reproduces the tokens the loop itself logged.
    members = step_members(len(tokenized), batch, 0, len(steps))
    shared = [prefix_shared_counts(len(t.prompt_ids), [len(r) for r in t.response_ids]) for t in tokenized]
    exact = members is not None and all(
        abs(sum(shared[i][0] for i in mb) - s["tokens_processed"]) < 0.5 for mb, s in zip(members, steps))
    if exact:
        timed_ids = [i for mb in members[1:] for i in mb]
        tokens = sum(tokenized[i].num_tokens for i in timed_ids)
        flops = sum(train_flops(dims, *shared[i]) for i in timed_ids)
    else:  # the per-pair means of this set, scaled to the timed pairs
        n = len(tokenized)
        tokens = pairs * sum(t.num_tokens for t in tokenized) / n
        flops = pairs * sum(train_flops(dims, *c) for c in shared) / n
    return _rates(pairs, seconds, tokens, processed, flops, exact)


def summarize_trl(raw: dict, dims: ModelDims, live_ref: bool) -> dict:
    t = raw["step_end_times"]
    inputs = _optimizer_steps(raw["step_inputs"], raw.get("grad_accum") or 1)
    if len(t) < 2:
        raise ValueError("TRL run recorded fewer than 2 steps")
    seconds = t[-1] - t[0]
    timed = inputs[1:len(t)]
    pairs = sum(s["rows"] // 2 for s in timed)
    tokens = sum(s["tokens"] for s in timed)
    flops = sum(train_flops(dims, s["tokens"], s["labels"], s["sq_len"] / 2) for s in timed)
    if live_ref:
        flops *= live_reference_factor(dims)  # + the reference model's forward pass
    return _rates(pairs, seconds, tokens, tokens, flops, True)


def _optimizer_steps(inputs: list[dict], accum: int) -> list[dict]:
    """TRL's per-micro-batch records (one per `training_step`) summed per optimizer step."""
    keys = ("rows", "tokens", "labels", "sq_len")
    return [{k: sum(x[k] for x in inputs[i:i + accum]) for k in keys} for i in range(0, len(inputs), accum)]


# ------------------------------------------------------------------------------------------------
# Over rounds and systems


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize_config(cfg, runs: list[dict], peaks: dict) -> dict:
    """The medians over rounds of one configuration's runs (`cfg`: a RunConfig)."""
    mine = [x for x in runs if x["system"] == cfg.system and x["config"] == cfg.name]
    ok = [x for x in mine if "error" not in x]
    res = {"system": cfg.system, "config": cfg.name, "precision": cfg.precision, "rounds_ok": len(ok),
           "rounds_failed": len(mine) - len(ok)}
    for key in MEDIAN_KEYS:
        res[key] = _median([x.get(key) for x in ok])
    peak = peaks.get(cfg.precision)
    res["pct_of_peak"] = (100 * res["gflops"] / peak) if res["gflops"] is not None and peak else None
    res["flops_per_pair"] = _median([x["flops"] / x["pairs"] for x in ok])
    first = ok[0] if ok else {}
    res.update(grad_ckpt=cfg.grad_ckpt, optimizer=first.get("optimizer"), micro_batch=first.get("micro_batch"),
               grad_accum=first.get("grad_accum"))
    return res


def compare_systems(results: list[dict], runs: list[dict] = ()) -> dict | None:
    """directpo's best configuration against TRL's (by pairs/s), or None without both. With the
    `runs`, also the ratio round by round: directpo's best configuration in the round against that
    round's fastest TRL configuration (how much of the median's distance is the host's noise)."""
    def best(system):
        ok = [r for r in results if r["system"] == system and r["pairs_per_s"] is not None]
        return max(ok, key=lambda r: r["pairs_per_s"]) if ok else None

    d, t = best("directpo"), best("trl")
    if d is None or t is None:
        return None
    out = {"directpo_best": d["config"], "trl_best": t["config"]}
    for key in ("pairs_per_s", "peak_rss_mib", "peak_above_import_mib"):
        if d.get(key) is not None and t.get(key):
            out[key] = {"directpo": d[key], "trl": t[key], "ratio": d[key] / t[key]}
    per_round = []
    for n in sorted({x["round"] for x in runs if x.get("round") is not None}):
        ours = [x["pairs_per_s"] for x in runs if x.get("round") == n and x["system"] == "directpo"
                and x["config"] == d["config"] and x.get("pairs_per_s")]
        theirs = [x["pairs_per_s"] for x in runs if x.get("round") == n and x["system"] == "trl" and x.get("pairs_per_s")]
        if ours and theirs:
            per_round.append(ours[0] / max(theirs))
    if per_round and "pairs_per_s" in out:
        out["pairs_per_s"]["ratio_per_round"] = per_round
    return out


# ------------------------------------------------------------------------------------------------
# The printed report


DASH = "—"  # a missing value in the sampling and wall-time tables


def fmt(v, spec: str, missing: str = "-") -> str:
    """`v` formatted by `spec`, or `missing` where there is no value: every bench table's cells."""
    return missing if v is None else format(v, spec)


def _cpu_kind(machine: dict) -> str:
    """"; flags avx2, torch ISA AVX2" for a CPU (what decides its bf16 speed); "" elsewhere."""
    if "cpu_flags" not in machine:
        return ""
    return f"; flags {' '.join(machine['cpu_flags']) or 'none of avx2/avx512/amx'}, torch ISA {machine['cpu_isa']}"


def _header_lines(r: dict) -> list[str]:
    s, m, p = r["settings"], r["model"], r["matmul_peak_gflops"]
    lines = [f"directpo bench: {s['model']} ({m['params'] / 1e6:.1f}M params, {m['nonemb_params'] / 1e6:.2f}M "
             f"non-embedding, hidden {m['hidden']}, {m['layers']} layers, vocab {m['vocab']})",
             f"  {s['pairs']} pairs from {s['data']}, batch {s['batch']}, max_length {s['max_length']}, "
             f"{s['steps_timed']} timed steps + 1 warm-up" +
             (f", {s['rounds']} round(s), median over rounds" if r["results"] else "") +
             (f"; LoRA r {s['lora_r']} on every linear layer, both systems" if s.get("lora_r") else ""),
             f"  {r['machine']['device']} ({r['machine']['device_name']}{_cpu_kind(r['machine'])}), "
             f"{r['machine']['threads']} threads; "
             f"matmul peak fp32 {p['fp32']:.3g} GFLOP/s, bf16 {p['bf16']:.3g} GFLOP/s (best of a probe before and "
             "after the runs)",
             f"  {r['bf16']['reason']}"]
    for sk in r["skipped"]:
        if sk.get("config") != "bf16":
            lines.append(f"  {sk['system']} skipped: {sk['reason']}")
    return lines


def _optimizer_text(opt: dict | None) -> str:
    """"rmsprop" (its hyper-parameters are the notes'), or what else a run's optimizer was."""
    return "-" if not opt else str(opt.get("name", "?"))


def _micro_text(x: dict) -> str:
    return "-" if x.get("micro_batch") is None else f"{x['micro_batch']}×{x.get('grad_accum') or 1}"


def _results_table(results: list[dict]) -> list[str]:
    cuda = any(x.get("cuda_peak_mib") is not None for x in results)
    head = f"{'system':<9} {'config':<24} {'optim':<8} {'micro×acc':>9} {'pairs/s':>8} {'tokens/s':>9} " \
           f"{'peak RSS MiB':>12} {'above import':>12} {'GFLOP/s':>8} {'% of peak':>9}" + \
           (f" {'GPU peak MiB':>12}" if cuda else "")
    lines = ["", head, "-" * len(head)]
    for x in results:
        if x["pairs_per_s"] is None:
            lines.append(f"{x['system']:<9} {x['config']:<24} failed in every round (see runs[].log_tail)")
            continue
        row = (f"{x['system']:<9} {x['config']:<24} {_optimizer_text(x.get('optimizer')):<8} {_micro_text(x):>9} "
               f"{x['pairs_per_s']:>8.3f} {x['tokens_per_s']:>9.0f} {x['peak_rss_mib']:>12.0f} "
               f"{fmt(x.get('peak_above_import_mib'), '>12.0f')} {x['gflops']:>8.2f} "
               f"{fmt(x['pct_of_peak'], '>8.1f')}%")
        if cuda:
            row += f" {fmt(x.get('cuda_peak_mib'), '>12.0f')}"
        lines.append(row)
    return lines


def _comparison_lines(c: dict | None) -> list[str]:
    if not c:
        return []
    pr, rr = c["pairs_per_s"], c["peak_rss_mib"]
    lines = ["", f"directpo best ({c['directpo_best']}) vs TRL best ({c['trl_best']}), by pairs/s:",
             f"  pairs/s:  {pr['directpo']:.3f} vs {pr['trl']:.3f} -> {pr['ratio']:.2f}x" + (
                 "; round by round (against that round's fastest TRL): " +
                 ", ".join(f"{x:.2f}x" for x in pr["ratio_per_round"]) if pr.get("ratio_per_round") else ""),
             f"  peak RSS: {rr['directpo']:.0f} vs {rr['trl']:.0f} MiB -> {rr['ratio']:.2f}x "
             f"(TRL uses {1 / rr['ratio']:.2f}x directpo's)"]
    if c.get("peak_above_import_mib"):
        ar = c["peak_above_import_mib"]
        lines.append(f"  peak RSS above import: {ar['directpo']:.0f} vs {ar['trl']:.0f} MiB -> {ar['ratio']:.2f}x")
    return lines


def _notes(runs: list[dict]) -> list[str]:
    lines = ["", "notes:", f"  {PAIRS_DEFINITION}", f"  {TOKENS_DEFINITION}", f"  {FLOPS_DEFINITION}",
             "  % of peak = GFLOP/s / measured matmul peak of the run's precision; peak RSS = ru_maxrss "
             "of the run's own subprocess; above import = peak RSS minus the RSS once the libraries are imported, "
             "before the model is loaded",
             "  optim: both systems RMSprop, lr 1e-6 constant, alpha 0.99, eps 1e-8, momentum 0, weight decay 0, "
             "gradient norm clipped at 10 (TRL: optim='rmsprop' with these optim_args, torch's per-tensor loop; "
             "directpo: the same update in one pass, torch's fused Adam kernel with beta1 0, equal to within an "
             "ulp); micro×acc = pairs per "
             "forward/backward × micro-batches per optimizer step; +gc = TRL's gradient checkpointing"]
    if any(x.get("tokens_exact") is False for x in runs):
        lines.append("  (directpo tokens/FLOPs of some runs estimated from per-pair means: the step order could "
                     "not be reproduced)")
    return lines


def _sweep_lines(sweep: list[dict]) -> list[str]:
    lines = ["", "vocabulary sweep (directpo fp32, random init, same tokenizer, 1 round):",
             f"{'vocab':>8} {'params M':>9} {'peak RSS MiB':>12} {'ΔRSS MiB':>9} "
             f"{'Δ(params+grads+state) MiB':>26} {'pairs/s':>8}"]
    for x in sweep:
        if "error" in x:
            lines.append(f"{x['vocab']:>8} {x['error']}")
            continue
        lines.append(f"{x['vocab']:>8} {x['params'] / 1e6:>9.2f} {x['peak_rss_mib']:>12.0f} "
                     f"{fmt(x.get('rss_growth_mib'), '>9.0f')} {fmt(x.get('param_state_growth_mib'), '>26.0f')} "
                     f"{x['pairs_per_s']:>8.3f}")
    last = next((x for x in reversed(sweep) if "sublinear" in x), None)
    if last is not None:
        lines.append(f"  vocab x{last['vocab_ratio_vs_first']:.2f} -> peak RSS x{last['rss_ratio_vs_first']:.2f} "
                     f"({'sub-linear' if last['sublinear'] else 'NOT sub-linear'}); the growth is the larger "
                     "embedding/LM head (weights, grads, optimizer state), the LM head's activations are chunked "
                     "and over label tokens only")
    return lines


def _plan_lines(runs: list[dict]) -> list[str]:
    """--memory-budget: the plan each directpo configuration ran with (its first round's)."""
    from ..training.budget import format_memory_plan

    lines, seen = [], set()
    for x in runs:
        if x.get("memory_plan") and x["config"] not in seen:
            seen.add(x["config"])
            lines.append(f"  directpo {x['config']}: {format_memory_plan(x['memory_plan'])}")
    return ["", "memory plan:"] + lines if lines else []


def format_report(r: dict) -> str:
    """The table `directpo bench` prints, from its result dict."""
    lines = _header_lines(r)
    if r["results"]:
        lines += _results_table(r["results"]) + _plan_lines(r["runs"]) + _comparison_lines(r["comparison"]) + \
            _notes(r["runs"])
    if r["vocab_sweep"]:
        lines += _sweep_lines(r["vocab_sweep"])
    return "\n".join(lines)
