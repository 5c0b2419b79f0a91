"""`directpo bench`: directpo against TRL's DPOTrainer on the same model, pairs and hardware.

    directpo bench --model M --data D [--batch 8] [--max-length 512] [--steps 10] [--rounds 2]
                   [--systems directpo,trl] [--out results.json] [--threads N] [--device cpu|cuda]
                   [--vocab-sweep 8192,32768]

What is compared
    Both systems get the same local model, the same preference pairs and the same batch size and
    max_length. D is parsed once with directpo's `load_examples` (HH-RLHF transcripts are split
    here, once), and the first batch × (steps + 1) pairs that tokenize within max_length are
    written as explicit {"prompt", "chosen", "rejected"} rows that both systems read, so both get
    identical strings. Each run is one epoch over exactly these pairs.

How it is measured
    Every run is its own subprocess (`python -m directpo.bench --child SPEC`), so its peak RSS
    (`getrusage(RUSAGE_SELF).ru_maxrss`) is its own. Runs alternate: round r runs each directpo
    configuration, then each TRL configuration, so background load spreads over all of them.
    The first optimizer step is a warm-up and is not timed; pairs/s = timed pairs / time from the
    end of step 1 to the end of the last step (not a mean of per-step rates). The table shows the
    median over rounds of each figure.

    tokens/s counts real (non-padding) tokens of the padded-equivalent layout: prompt + response
    for each response, so a pair counts its prompt twice, for both systems alike (directpo computes
    each prompt once; that saving shows as pairs/s, not as tokens).

Model FLOPs (forward + backward, useful work only: no padding, no recomputation)
    F = 6·N·T + 6·h·V·Lab + 12·layers·d_attn·A
    N: parameters outside the input embedding and the LM head; h: hidden size; V: vocabulary;
    d_attn = heads × head_dim; T: tokens run through the backbone; Lab: label (response) tokens that
    reach the LM head; A: query–key pairs attended (causal: len²/2 for a sequence of len tokens).
    directpo (prefix-shared): T = P + ΣL_k, A = P²/2 + Σ_k (P·L_k + L_k²/2).
    TRL (one row per prompt + response; its fused LM head also scores label tokens only):
    T = Σ_k (P + L_k), A = Σ_k (P + L_k)²/2, counted from the tensors TRL actually received.
    A live reference model adds its forward pass, F/3. Precomputed reference log-probs are computed
    before the timed steps and not counted.
    GFLOP/s is F over the timed steps / their time; "% of peak" divides by the matmul peak
    measured here (large square matmuls, same thread count) in the run's precision.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

TOKENS_DEFINITION = ("tokens = real prompt + response tokens of the padded-equivalent layout (prompt counted once per "
                     "response, no padding), the same for both systems")
FLOPS_DEFINITION = ("model FLOPs = 6·N·T + 6·h·V·Lab + 12·layers·d_attn·A (fwd+bwd); N = non-embedding params, "
                    "T = tokens through the backbone, Lab = label tokens through the LM head, A = attended "
                    "query-key pairs (len²/2 causal). directpo: T = P + ΣL, A = P²/2 + Σ(P·L + L²/2); "
                    "TRL: T = Σ(P + L), A = Σ(P + L)²/2; a live reference adds F/3")
PAIRS_DEFINITION = ("pairs/s = pairs of the timed steps / time from the end of warm-up step 1 to the end of the "
                    "last step")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Model FLOPs


@dataclass
class ModelDims:
    params: int  # all parameters
    nonemb_params: int  # N: without the input embedding and the LM head
    hidden: int
    vocab: int
    layers: int
    attn_dim: int  # heads × head_dim


def model_dims(model_name: str) -> ModelDims:
    """Shapes of a model from its config alone (built on the meta device: no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return dims_of(model)


def dims_of(model) -> ModelDims:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    excluded = emb.numel()
    if head is not None and head.weight is not emb:
        excluded += head.weight.numel()
    hidden = int(cfg.hidden_size)
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if heads else hidden)
    return ModelDims(params=total, nonemb_params=total - excluded, hidden=hidden, vocab=int(emb.shape[0]),
                     layers=int(cfg.num_hidden_layers), attn_dim=int(heads * head_dim) if heads else hidden)


def train_flops(d: ModelDims, tokens: float, labels: float, attn_pairs: float) -> float:
    """Forward + backward FLOPs: 6·N·T + 6·h·V·Lab + 12·layers·d_attn·A."""
    return (6.0 * d.nonemb_params * tokens + 6.0 * d.hidden * d.vocab * labels
            + 12.0 * d.layers * d.attn_dim * attn_pairs)


def prefix_shared_counts(prompt_len: int, response_lens: list[int]) -> tuple[int, int, float]:
    """(tokens, labels, attended pairs) when the prompt is computed once for all its responses."""
    P = prompt_len
    return P + sum(response_lens), sum(response_lens), P * P / 2 + sum(P * L + L * L / 2 for L in response_lens)


def padded_counts(prompt_len: int, response_lens: list[int]) -> tuple[int, int, float]:
    """(tokens, labels, attended pairs) with one sequence per prompt + response (TRL)."""
    P = prompt_len
    return sum(P + L for L in response_lens), sum(response_lens), sum((P + L) ** 2 / 2 for L in response_lens)


def directpo_example_flops(d: ModelDims, prompt_len: int, response_lens: list[int]) -> float:
    return train_flops(d, *prefix_shared_counts(prompt_len, response_lens))


def padded_example_flops(d: ModelDims, prompt_len: int, response_lens: list[int]) -> float:
    return train_flops(d, *padded_counts(prompt_len, response_lens))


# ------------------------------------------------------------------------------------------------
# Matmul peak


def matmul_gflops(dtype, device, budget_s: float = 0.5, max_n: int | None = None) -> float:
    """Best GFLOP/s of square matmuls of `dtype` on `device`, grown until one takes ~budget/10."""
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    max_n = max_n or (8192 if cuda else 4096)

    def timed(n: int, reps: int = 1) -> float:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        torch.matmul(a, b, out=c)  # warm-up
        sync()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            torch.matmul(a, b, out=c)
            sync()
            best = min(best, time.perf_counter() - t)
        return best

    timed(64)
    n = 128
    while n < max_n and timed(n) < budget_s / 10:
        n *= 2
    deadline = time.perf_counter() + budget_s
    best = 0.0
    reps = 0
    while reps < 2 or time.perf_counter() < deadline:
        best = max(best, 2.0 * n ** 3 / timed(n) / 1e9)
        reps += 1
        if reps >= 50:
            break
    return best


def probe_peaks(device, budget_s: float = 0.5) -> dict:
    import torch

    out = {"fp32": matmul_gflops(torch.float32, device, budget_s)}
    if torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
        out["bf16"] = 0.0
    else:
        try:
            out["bf16"] = matmul_gflops(torch.bfloat16, device, budget_s)
        except RuntimeError:  # no bf16 matmul on this device
            out["bf16"] = 0.0
    return out


def bf16_decision(peaks: dict) -> tuple[bool, str]:
    """Run bf16 configurations only where a bf16 matmul is at least as fast as an fp32 one."""
    f, b = peaks.get("fp32", 0.0), peaks.get("bf16", 0.0)
    if b <= 0:
        return False, "bf16 skipped: no bf16 matmul on this device"
    if b >= f:
        return True, f"bf16 included: bf16 matmul {b:.1f} GFLOP/s ≥ fp32 {f:.1f} GFLOP/s"
    return False, (f"bf16 skipped: bf16 matmul {b:.3g} GFLOP/s is {f / b:.0f}× slower than fp32 {f:.3g} GFLOP/s "
                   "on this machine (no native bf16 matmul)")


# ------------------------------------------------------------------------------------------------
# Data: one parse, the same pairs for every system


def prepare_pairs(data: str, model: str, n: int, max_length: int | None, out_path: Path,
                  split: str | None = None):
    """The first `n` usable pairs of `data` -> explicit prompt/chosen/rejected JSONL at out_path.

    Usable: parses (`load_examples`, bad rows skipped and counted), has ≥ 2 responses (ranked rows
    give best vs worst), and its prompt leaves room for a response within max_length.
    Returns (tokenized pairs in file order, skip report).
    """
    from .data import DataError, Example, SkipReport, load_examples, tokenize_example
    from .models import load_tokenizer

    tok = load_tokenizer(model)
    report = SkipReport()
    examples = load_examples(data, on_invalid="skip", split=split, report=report)
    rows, tokenized = [], []
    for ex in examples:
        if len(ex.responses) < 2:
            report.add(DataError(ex.source, ex.row, "responses", "a single response is not a pair", kind="not_a_pair"))
            continue
        pair = Example(ex.prompt, [ex.chosen, ex.rejected], ex.source, ex.row)
        try:
            t = tokenize_example(pair, tok, max_length)
        except DataError as e:
            report.add(e)
            continue
        rows.append({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected})
        tokenized.append(t)
        if len(rows) == n:
            break
    if len(rows) < n:
        raise ValueError(f"{data}: {len(rows)} usable pairs, the benchmark needs batch × (steps + 1) = {n}; "
                         f"lower --steps or --batch ({report.summary()})")
    with open(out_path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return tokenized, report


# ------------------------------------------------------------------------------------------------
# Runs (each one a subprocess)


@dataclass
class RunConfig:
    system: str  # directpo | trl
    name: str  # shown in the table
    precision: str = "fp32"
    precompute_ref: bool = True

    @property
    def label(self) -> str:
        return f"{self.system} {self.name}"


def run_child(spec: dict, work: Path, tag: str) -> dict:
    """Run one measurement in a fresh interpreter; its result JSON, or {"error": ...}."""
    spec_path, result_path, log_path = work / f"{tag}.spec.json", work / f"{tag}.result.json", work / f"{tag}.log"
    spec = {**spec, "result": str(result_path)}
    spec_path.write_text(json.dumps(spec))
    env = os.environ.copy()
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("WANDB_DISABLED", "true")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("TQDM_DISABLE", "1")
    t = time.perf_counter()
    with open(log_path, "w") as logf:
        rc = subprocess.run([sys.executable, "-m", "directpo.bench", "--child", str(spec_path)], stdout=logf,
                            stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t
    if rc != 0 or not result_path.exists():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        return {"error": f"exit status {rc}", "log_tail": tail, "wall_s": wall}
    res = json.loads(result_path.read_text())
    res["wall_s"] = wall
    return res


def directpo_train_argv(spec: dict) -> list[str]:
    argv = ["train", "--model", spec["model"], "--data", spec["data"], "--output-dir", spec["output_dir"],
            "--batch-size", str(spec["batch"]), "--micro-batch-size", str(spec.get("micro_batch") or spec["batch"]),
            "--max-steps", str(spec["steps"] + 1), "--warmup-steps", "0", "--lr", "1e-6", "--precompute-ref",
            "--no-progress", "--max-length", str(spec["max_length"]), "--on-invalid", "skip",
            "--precision", spec["precision"], "--seed", "0", "--ref-cache", "off", "--overwrite"]
    if spec.get("threads"):
        argv += ["--threads", str(spec["threads"])]
    if spec.get("device"):
        argv += ["--device", spec["device"]]
    return argv


def _child_directpo(spec: dict) -> dict:
    from .cli import main as directpo_main

    argv = directpo_train_argv(spec)
    rc = directpo_main(argv)
    if rc != 0:
        raise SystemExit(f"directpo train exited with {rc}")
    out = Path(spec["output_dir"])
    steps = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if m.get("split") != "train":
            continue
        dt = spec["batch"] / m["pairs_per_s"]
        steps.append({"step": m["step"], "pairs": spec["batch"], "dt": dt,
                      "tokens_processed": m["tokens_per_s"] * dt, "elapsed_s": m.get("elapsed_s")})
    cfg = json.loads((out / "directpo_config.json").read_text())
    return {"steps": steps, "train_pairs": cfg.get("train_pairs", cfg.get("train_examples")), "argv": argv}


def child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    if spec["system"] == "directpo":
        res = _child_directpo(spec)
    elif spec["system"] == "trl":
        from .bench_trl import run_trl

        res = run_trl(spec)
    else:
        raise SystemExit(f"unknown system {spec['system']!r}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res["peak_rss_mib"] = rss / (1 << 20) if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        res["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / (1 << 20)
    Path(spec["result"]).write_text(json.dumps(res))
    return 0


# ------------------------------------------------------------------------------------------------
# From raw run results to figures


def step_members(n: int, batch: int, seed: int, steps: int) -> list[list[int]] | None:
    """Which pairs directpo's loop put in each step (its seeded order), or None if unavailable."""
    try:
        from .train.loop import batch_order
    except ImportError:
        return None
    order = batch_order(n, batch, seed)
    return [next(order)[1] for _ in range(steps)]


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
    return {"pairs": pairs, "seconds": seconds, "pairs_per_s": pairs / seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds, "tokens_processed_per_s": processed / seconds,
            "flops": flops, "gflops": flops / seconds / 1e9, "tokens_exact": exact}


def summarize_trl(raw: dict, dims: ModelDims, live_ref: bool) -> dict:
    t = raw["step_end_times"]
    inputs = raw["step_inputs"]
    if len(t) < 2:
        raise ValueError("TRL run recorded fewer than 2 steps")
    seconds = t[-1] - t[0]
    timed = inputs[1:len(t)]
    pairs = sum(s["rows"] // 2 for s in timed)
    tokens = sum(s["tokens"] for s in timed)
    flops = sum(train_flops(dims, s["tokens"], s["labels"], s["sq_len"] / 2) for s in timed)
    if live_ref:
        flops *= 4 / 3  # + the reference model's forward pass
    return {"pairs": pairs, "seconds": seconds, "pairs_per_s": pairs / seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds, "tokens_processed_per_s": tokens / seconds, "flops": flops,
            "gflops": flops / seconds / 1e9, "tokens_exact": True}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ------------------------------------------------------------------------------------------------
# The command


def parse_systems(s: str) -> list[str]:
    names = [x.strip().lower() for x in s.split(",") if x.strip()]
    if names in ([], ["none"]):
        return []
    bad = [x for x in names if x not in ("directpo", "trl")]
    if bad:
        raise ValueError(f"--systems: unknown system(s) {', '.join(bad)} (choose from directpo, trl, or none)")
    return list(dict.fromkeys(names))


def parse_vocab_sweep(s: str | None) -> list[int]:
    if not s:
        return []
    try:
        sizes = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--vocab-sweep: expected comma-separated integers, got {s!r}") from None
    if any(v < 1 for v in sizes):
        raise ValueError("--vocab-sweep: vocabulary sizes must be ≥ 1")
    return sizes


def trl_available() -> tuple[bool, str]:
    if importlib.util.find_spec("trl") is None:
        return False, "TRL is not installed (pip install 'directpo[bench]')"
    return True, ""


def plan_configs(systems: list[str], use_bf16: bool, have_trl: bool) -> list[RunConfig]:
    configs = []
    if "directpo" in systems:
        configs.append(RunConfig("directpo", "fp32", "fp32", True))
        if use_bf16:
            configs.append(RunConfig("directpo", "bf16", "bf16", True))
    if "trl" in systems and have_trl:
        configs.append(RunConfig("trl", "fp32 (live ref)", "fp32", False))
        configs.append(RunConfig("trl", "precompute_ref fp32", "fp32", True))
        if use_bf16:
            configs.append(RunConfig("trl", "precompute_ref bf16", "bf16", True))
    return configs


def _base_spec(args, data_path: Path) -> dict:
    return {"model": args.model, "data": str(data_path), "batch": args.batch, "micro_batch": args.micro_batch,
            "steps": args.steps,
            "max_length": args.max_length, "threads": args.threads, "device": args.device}


def _measure(cfg: RunConfig, args, data_path: Path, work: Path, tag: str, tokenized, dims: ModelDims,
             model: str | None = None) -> dict:
    spec = {**_base_spec(args, data_path), "system": cfg.system, "precision": cfg.precision,
            "precompute_ref": cfg.precompute_ref, "output_dir": str(work / f"{tag}-out")}
    if model:
        spec["model"] = model
    raw = run_child(spec, work, tag)
    shutil.rmtree(work / f"{tag}-out", ignore_errors=True)
    run = {"system": cfg.system, "config": cfg.name, "precision": cfg.precision, "wall_s": raw.get("wall_s")}
    if "error" in raw:
        run.update(error=raw["error"], log_tail=raw.get("log_tail"))
        return run
    try:
        if cfg.system == "directpo":
            figs = summarize_directpo(raw, tokenized, dims, args.batch)
        else:
            figs = summarize_trl(raw, dims, live_ref=not cfg.precompute_ref)
    except (ValueError, KeyError, ZeroDivisionError) as e:
        run.update(error=f"could not read the run's timings: {e}")
        return run
    run.update(figs)
    run["peak_rss_mib"] = raw["peak_rss_mib"]
    if "cuda_peak_mib" in raw:
        run["cuda_peak_mib"] = raw["cuda_peak_mib"]
    run["train_pairs"] = raw.get("train_pairs")
    n = args.batch * (args.steps + 1)
    if run["train_pairs"] not in (None, n):
        run["warning"] = f"{cfg.system} kept {run['train_pairs']} of the {n} pairs"
        log(f"warning: {cfg.label}: {run['warning']}")
    if cfg.system == "trl":
        run["trl_version"] = raw.get("trl_version")
    return run


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _save_vocab_variant(model: str, vocab: int, out: Path, tokenizer) -> tuple[int, str | None]:
    """A random-init copy of `model`'s architecture with `vocab` entries; (params, reason if not usable)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if len(tokenizer) > vocab:
        return 0, f"the tokenizer has {len(tokenizer)} ids, more than vocab {vocab}"
    config = AutoConfig.from_pretrained(model)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    text_config.vocab_size = vocab
    config.vocab_size = vocab
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(config)
    m.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    del m
    return params, None


def run_bench(args) -> dict:
    import torch

    from . import __version__
    from .models import pick_device

    if args.batch < 1 or args.steps < 1 or args.rounds < 1:
        raise ValueError("--batch, --steps and --rounds must be ≥ 1 (the first of steps + 1 steps is a warm-up)")
    systems = parse_systems(args.systems)
    sweep = parse_vocab_sweep(args.vocab_sweep)
    if not systems and not sweep:
        raise ValueError("nothing to run: --systems none and no --vocab-sweep")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)

    skipped: list[dict] = []
    have_trl, why_not = trl_available()
    if "trl" in systems and not have_trl:
        log(f"TRL configurations skipped: {why_not}")
        skipped.append({"system": "trl", "reason": why_not})

    dims = model_dims(args.model)
    n = args.batch * (args.steps + 1)
    work = Path(tempfile.mkdtemp(prefix="directpo-bench-"))
    if args.keep_work:
        log(f"work dir (kept): {work}")
    try:
        data_path = work / "pairs.jsonl"
        tokenized, report = prepare_pairs(args.data, args.model, n, args.max_length, data_path, args.data_split)

        log(f"matmul peak on {device} ({torch.get_num_threads()} threads)...")
        peaks = probe_peaks(device)
        use_bf16, bf16_reason = bf16_decision(peaks)
        log(f"matmul peak: fp32 {peaks['fp32']:.3g} GFLOP/s, bf16 {peaks['bf16']:.3g} GFLOP/s; {bf16_reason}")
        if not use_bf16 and systems:
            skipped.append({"system": ",".join(systems), "config": "bf16", "reason": bf16_reason})
        configs = plan_configs(systems, use_bf16, have_trl)

        log(f"{n} pairs from {args.data} ({report.summary().splitlines()[0]}); " +
            (f"{len(configs)} configuration(s) × {args.rounds} round(s), " if configs else "") +
            f"{args.steps} timed steps + 1 warm-up each")

        runs: list[dict] = []
        for r in range(args.rounds):
            for i, cfg in enumerate(configs):  # directpo configs first, then TRL's: alternating by round
                tag = f"r{r}-c{i}"
                log(f"round {r + 1}/{args.rounds}: {cfg.label} ...")
                run = _measure(cfg, args, data_path, work, tag, tokenized, dims)
                run["round"] = r + 1
                runs.append(run)
                if "error" in run:
                    log(f"round {r + 1}: {cfg.label} FAILED ({run['error']}):\n  " +
                        "\n  ".join(run.get("log_tail") or []))
                else:
                    log(f"round {r + 1}: {cfg.label}: {run['pairs_per_s']:.3f} pairs/s, "
                        f"{run['tokens_per_s']:.0f} tokens/s, peak RSS {run['peak_rss_mib']:.0f} MiB")

        # The peak is a maximum: probe again after the runs and keep the better figure, so a burst of
        # background load during the first probe does not inflate "% of peak".
        again = probe_peaks(device)
        peaks = {k: max(v, again.get(k, 0.0)) for k, v in peaks.items()}

        results = []
        for cfg in configs:
            ok = [x for x in runs if x["system"] == cfg.system and x["config"] == cfg.name and "error" not in x]
            res = {"system": cfg.system, "config": cfg.name, "precision": cfg.precision, "rounds_ok": len(ok),
                   "rounds_failed": sum(1 for x in runs if x["system"] == cfg.system and x["config"] == cfg.name
                                        and "error" in x)}
            for key in ("pairs_per_s", "tokens_per_s", "tokens_processed_per_s", "peak_rss_mib", "gflops",
                        "cuda_peak_mib"):
                res[key] = _median([x.get(key) for x in ok])
            peak = peaks.get(cfg.precision)
            res["pct_of_peak"] = (100 * res["gflops"] / peak) if res["gflops"] is not None and peak else None
            res["flops_per_pair"] = _median([x["flops"] / x["pairs"] for x in ok])
            results.append(res)

        comparison = compare(results)

        sweep_rows = []
        if sweep:
            sweep_rows = vocab_sweep(args, sweep, data_path, work, tokenized)
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)

    out = {
        "directpo_version": __version__,
        "versions": _versions(),
        "machine": {"device": str(device), "device_name": _device_name(device), "threads": torch.get_num_threads(),
                    "platform": platform.platform()},
        "settings": {"model": args.model, "data": args.data, "batch": args.batch, "micro_batch": args.micro_batch,
                     "max_length": args.max_length,
                     "steps_timed": args.steps, "warmup_steps": 1, "rounds": args.rounds, "pairs": n,
                     "systems": systems, "vocab_sweep": sweep},
        "model": asdict(dims),
        "matmul_peak_gflops": peaks,
        "bf16": {"used": use_bf16, "reason": bf16_reason},
        "definitions": {"pairs_per_s": PAIRS_DEFINITION, "tokens": TOKENS_DEFINITION, "flops": FLOPS_DEFINITION,
                        "pct_of_peak": "GFLOP/s / the measured matmul peak in the run's precision",
                        "peak_rss_mib": "ru_maxrss of the run's own process", "median": "over rounds, per figure"},
        "results": results,
        "comparison": comparison,
        "runs": runs,
        "skipped": skipped,
        "vocab_sweep": sweep_rows,
    }
    out["table"] = format_report(out)
    return out


def compare(results: list[dict]) -> dict | None:
    def best(system):
        ok = [r for r in results if r["system"] == system and r["pairs_per_s"] is not None]
        return max(ok, key=lambda r: r["pairs_per_s"]) if ok else None

    d, t = best("directpo"), best("trl")
    if d is None or t is None:
        return None
    return {"directpo_best": d["config"], "trl_best": t["config"],
            "pairs_per_s": {"directpo": d["pairs_per_s"], "trl": t["pairs_per_s"],
                            "ratio": d["pairs_per_s"] / t["pairs_per_s"]},
            "peak_rss_mib": {"directpo": d["peak_rss_mib"], "trl": t["peak_rss_mib"],
                             "ratio": d["peak_rss_mib"] / t["peak_rss_mib"]}}


def vocab_sweep(args, sizes: list[int], data_path: Path, work: Path, tokenized) -> list[dict]:
    from .models import load_tokenizer, quiet_transformers

    quiet_transformers()
    tok = load_tokenizer(args.model)
    rows = []
    for v in sizes:
        mdir = work / f"vocab-{v}"
        params, reason = _save_vocab_variant(args.model, v, mdir, tok)
        if reason:
            log(f"vocab {v}: skipped, {reason}")
            rows.append({"vocab": v, "error": reason})
            continue
        dims = model_dims(str(mdir))
        log(f"vocab sweep: vocab {v} ({params / 1e6:.2f}M params), directpo fp32 ...")
        run = _measure(RunConfig("directpo", "fp32"), args, data_path, work, f"vocab-{v}", tokenized, dims,
                       model=str(mdir))
        shutil.rmtree(mdir, ignore_errors=True)
        row = {"vocab": v, "params": params, "weights_mib": params * 4 / (1 << 20)}
        if "error" in run:
            row.update(error=run["error"], log_tail=run.get("log_tail"))
            log(f"vocab {v}: FAILED ({run['error']})")
        else:
            row.update({k: run.get(k) for k in ("peak_rss_mib", "pairs_per_s", "tokens_per_s", "gflops",
                                                "cuda_peak_mib") if run.get(k) is not None})
            log(f"vocab {v}: peak RSS {row['peak_rss_mib']:.0f} MiB, {row['pairs_per_s']:.3f} pairs/s")
        rows.append(row)
    ok = [r for r in rows if "peak_rss_mib" in r]
    if len(ok) >= 2:
        a, b = ok[0], ok[-1]
        for r in ok:
            r["rss_ratio_vs_first"] = r["peak_rss_mib"] / a["peak_rss_mib"]
            r["vocab_ratio_vs_first"] = r["vocab"] / a["vocab"]
            # fp32 weights + gradients + RMSprop state of the extra parameters (embedding and head)
            r["param_state_growth_mib"] = (r["params"] - a["params"]) * 12 / (1 << 20)
            r["rss_growth_mib"] = r["peak_rss_mib"] - a["peak_rss_mib"]
        b["sublinear"] = b["rss_ratio_vs_first"] < b["vocab_ratio_vs_first"]
    return rows


def _versions() -> dict:
    import torch
    import transformers

    v = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    if importlib.util.find_spec("trl") is not None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v["trl"] = version("trl")
        except PackageNotFoundError:
            pass
    return v


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_report(r: dict) -> str:
    s, m, p = r["settings"], r["model"], r["matmul_peak_gflops"]
    lines = [f"directpo bench: {s['model']} ({m['params'] / 1e6:.1f}M params, {m['nonemb_params'] / 1e6:.2f}M "
             f"non-embedding, hidden {m['hidden']}, {m['layers']} layers, vocab {m['vocab']})",
             f"  {s['pairs']} pairs from {s['data']}, batch {s['batch']}, max_length {s['max_length']}, "
             f"{s['steps_timed']} timed steps + 1 warm-up" +
             (f", {s['rounds']} round(s), median over rounds" if r["results"] else ""),
             f"  {r['machine']['device']} ({r['machine']['device_name']}), {r['machine']['threads']} threads; "
             f"matmul peak fp32 {p['fp32']:.3g} GFLOP/s, bf16 {p['bf16']:.3g} GFLOP/s (best of a probe before and "
             "after the runs)",
             f"  {r['bf16']['reason']}"]
    for sk in r["skipped"]:
        if sk.get("config") != "bf16":
            lines.append(f"  {sk['system']} skipped: {sk['reason']}")
    if r["results"]:
        cuda = any(x.get("cuda_peak_mib") is not None for x in r["results"])
        head = f"{'system':<9} {'config':<20} {'pairs/s':>8} {'tokens/s':>9} {'peak RSS MiB':>12} " \
               f"{'GFLOP/s':>8} {'% of peak':>9}" + (f" {'GPU peak MiB':>12}" if cuda else "")
        lines += ["", head, "-" * len(head)]
        for x in r["results"]:
            if x["pairs_per_s"] is None:
                lines.append(f"{x['system']:<9} {x['config']:<20} failed in every round (see runs[].log_tail)")
                continue
            row = (f"{x['system']:<9} {x['config']:<20} {x['pairs_per_s']:>8.3f} {x['tokens_per_s']:>9.0f} "
                   f"{x['peak_rss_mib']:>12.0f} {x['gflops']:>8.2f} {_fmt(x['pct_of_peak'], '>8.1f')}%")
            if cuda:
                row += f" {_fmt(x.get('cuda_peak_mib'), '>12.0f')}"
            lines.append(row)
        c = r["comparison"]
        if c:
            pr, rr = c["pairs_per_s"], c["peak_rss_mib"]
            lines += ["", f"directpo best ({c['directpo_best']}) vs TRL best ({c['trl_best']}):",
                      f"  pairs/s:  {pr['directpo']:.3f} vs {pr['trl']:.3f} -> {pr['ratio']:.2f}x",
                      f"  peak RSS: {rr['directpo']:.0f} vs {rr['trl']:.0f} MiB -> {rr['ratio']:.2f}x "
                      f"(TRL uses {1 / rr['ratio']:.2f}x directpo's)"]
        lines += ["", "notes:", f"  {PAIRS_DEFINITION}", f"  {TOKENS_DEFINITION}", f"  {FLOPS_DEFINITION}",
                  "  % of peak = GFLOP/s / measured matmul peak of the run's precision; peak RSS = ru_maxrss "
                  "of the run's own subprocess"]
        if any(x.get("tokens_exact") is False for x in r["runs"]):
            lines.append("  (directpo tokens/FLOPs of some runs estimated from per-pair means: the step order could "
                         "not be reproduced)")
    if r["vocab_sweep"]:
        lines += ["", "vocabulary sweep (directpo fp32, random init, same tokenizer, 1 round):",
                  f"{'vocab':>8} {'params M':>9} {'peak RSS MiB':>12} {'ΔRSS MiB':>9} "
                  f"{'Δ(params+grads+state) MiB':>26} {'pairs/s':>8}"]
        for x in r["vocab_sweep"]:
            if "error" in x:
                lines.append(f"{x['vocab']:>8} {x['error']}")
                continue
            lines.append(f"{x['vocab']:>8} {x['params'] / 1e6:>9.2f} {x['peak_rss_mib']:>12.0f} "
                         f"{_fmt(x.get('rss_growth_mib'), '>9.0f')} {_fmt(x.get('param_state_growth_mib'), '>26.0f')} "
                         f"{x['pairs_per_s']:>8.3f}")
        last = next((x for x in reversed(r["vocab_sweep"]) if "sublinear" in x), None)
        if last is not None:
            lines.append(f"  vocab x{last['vocab_ratio_vs_first']:.2f} -> peak RSS x{last['rss_ratio_vs_first']:.2f} "
                         f"({'sub-linear' if last['sublinear'] else 'NOT sub-linear'}); the growth is the larger "
                         "embedding/LM head (weights, grads, optimizer state), the LM head's activations are chunked "
                         "and over label tokens only")
    return "\n".join(lines)


def cmd_bench(args) -> int:
    result = run_bench(args)
    print(result["table"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.out}")
    ok = any(x["pairs_per_s"] is not None for x in result["results"]) or \
        any("peak_rss_mib" in x for x in result["vocab_sweep"])
    return 0 if ok else 1


def add_bench_parser(sub) -> argparse.ArgumentParser:
    b = sub.add_parser("bench", help="throughput and peak memory of directpo vs TRL's DPOTrainer, same model and pairs",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    b.add_argument("--data-split", default=None, help="split name for `datasets` sources")
    b.add_argument("--keep-work", action="store_true", help="keep the temporary work dir (specs, logs)")
    b.set_defaults(func=cmd_bench)
    return b


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2]))
    sys.exit("usage: python -m directpo.bench --child SPEC.json (internal; use `directpo bench`)")
