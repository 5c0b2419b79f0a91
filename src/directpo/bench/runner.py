"""`directpo bench`: directpo against TRL's DPOTrainer on the same model, pairs and hardware.

    directpo bench --model M --data D [--batch 8] [--max-length 512] [--steps 10] [--rounds 2]
                   [--systems directpo,trl] [--out results.json] [--threads N] [--device cpu|cuda]
                   [--vocab-sweep 8192,32768]

What is compared
    Both systems get the same local model, the same preference pairs and the same batch size and
    max_length. D is parsed once with directpo's `load_examples` (HH-RLHF transcripts are split
    here, once), and the first batch × (steps + 1) pairs that tokenize within max_length are
    written as explicit {"prompt", "chosen", "rejected"} rows that both systems read, so both get
    identical strings. Each run is one epoch over exactly these pairs. Both run directpo's RMSprop
    (TRL: optim="rmsprop", the same hyper-parameters, `trl.same_optimizer`) with the same
    micro-batch and accumulation (`--micro-batch`; `--trl-micro-batch` for TRL's own); TRL also
    with gradient checkpointing, as a separate configuration.

How it is measured
    Every run is its own subprocess (`python -m directpo.bench --child SPEC`, see `child.py`), so
    its peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`) is its own, also given above the process's
    RSS once its libraries are imported (`fairness.import_baseline`). Runs alternate: round r runs each
    directpo configuration, then each TRL configuration, so background load spreads over all of
    them. The first optimizer step is a warm-up and is not timed; pairs/s = timed pairs / time from
    the end of step 1 to the end of the last step (not a mean of per-step rates). The table shows
    the median over rounds of each figure.

    tokens/s counts real (non-padding) tokens of the padded-equivalent layout: prompt + response
    for each response, so a pair counts its prompt twice, for both systems alike (directpo computes
    each prompt once; that saving shows as pairs/s, not as tokens).

    Model FLOPs and "% of peak": see `flops.py`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..console import log
from ..diskio import default_mode
from ..errors import UserValueError
from .flops import ModelDims, bf16_decision, model_dims, probe_peaks
from .report import DEFINITIONS, compare_systems, format_report, summarize_config, summarize_directpo, summarize_trl


# ------------------------------------------------------------------------------------------------
# What to run


@dataclass
class RunConfig:
    system: str  # directpo | trl
    name: str  # shown in the table
    precision: str = "fp32"
    precompute_ref: bool = True
    grad_ckpt: bool = False  # TRL's gradient checkpointing (DPOConfig's default: on); directpo's runs: off


    @property
    def label(self) -> str:
        return f"{self.system} {self.name}"


def parse_systems(s: str) -> list[str]:
    names = [x.strip().lower() for x in s.split(",") if x.strip()]
    if names in ([], ["none"]):
        return []
    bad = [x for x in names if x not in ("directpo", "trl")]
    if bad:
        raise UserValueError(f"--systems: unknown system(s) {', '.join(bad)} (choose from directpo, trl, or none)")
    return list(dict.fromkeys(names))


def parse_vocab_sweep(s: str | None) -> list[int]:
    if not s:
        return []
    try:
        sizes = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise UserValueError(f"--vocab-sweep: expected comma-separated integers, got {s!r}") from None
    if any(v < 1 for v in sizes):
        raise UserValueError("--vocab-sweep: vocabulary sizes must be ≥ 1")
    return sizes


def trl_available() -> tuple[bool, str]:
    if importlib.util.find_spec("trl") is None:
        return False, "TRL is not installed (pip install 'directpo[bench]')"
    return True, ""


def without_missing_trl(systems: list[str]) -> list[str]:
    """`systems` less "trl" when TRL is not installed (said in the log): the bench runs directpo alone."""
    if "trl" in systems:
        have, why = trl_available()
        if not have:
            from ..console import log

            log(f"TRL skipped: {why}", prefix="bench")
            return [s for s in systems if s != "trl"]
    return systems


def plan_configs(systems: list[str], use_bf16: bool, have_trl: bool) -> list[RunConfig]:
    configs = []
    if "directpo" in systems:
        configs.append(RunConfig("directpo", "fp32", "fp32", True))
        if use_bf16:
            configs.append(RunConfig("directpo", "bf16", "bf16", True))
    if "trl" in systems and have_trl:
        # Gradient checkpointing off and on: DPOConfig turns it on by default (less memory, a
        # second forward pass), so TRL's best speed and its best memory may be different runs.
        configs.append(RunConfig("trl", "fp32 (live ref)", "fp32", False))
        configs.append(RunConfig("trl", "precompute_ref fp32", "fp32", True))
        configs.append(RunConfig("trl", "precompute_ref fp32 +gc", "fp32", True, grad_ckpt=True))
        if use_bf16:
            configs.append(RunConfig("trl", "precompute_ref bf16", "bf16", True))
    return configs


# ------------------------------------------------------------------------------------------------
# Data: one parse, the same pairs for every system


def prepare_pairs(data: str, model: str, n: int | None, max_length: int | None, out_path: Path,
                  split: str | None = None):
    """The first `n` usable pairs of `data` (None: all of them) -> explicit prompt/chosen/rejected
    JSONL at out_path.

    Usable: parses (`load_examples`, bad rows skipped and counted), has ≥ 2 responses (ranked rows
    give best vs worst), and its prompt leaves room for a response within max_length.
    Returns (tokenized pairs in file order, skip report).
    """
    from ..data import DataError, Example, SkipReport, load_examples, tokenize_example
    from ..models import load_tokenizer
    from .child import keep_prompt

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
            t = tokenize_example(pair, tok, max_length, keep_prompt(max_length))
        except DataError as e:
            report.add(e)
            continue
        rows.append({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected})
        tokenized.append(t)
        if len(rows) == n:
            break
    if n is not None and len(rows) < n:
        raise UserValueError(f"{data}: {len(rows)} usable pairs, the benchmark needs batch × (steps + 1) = {n}; "
                             f"lower --steps or --batch ({report.summary()})")
    with open(out_path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return tokenized, report


# ------------------------------------------------------------------------------------------------
# Runs (each one a subprocess)


def _child_env() -> dict:
    env = os.environ.copy()
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("WANDB_DISABLED", "true")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("TQDM_DISABLE", "1")
    return env


def run_child(spec: dict, work: Path, tag: str, module: str = "directpo.bench", env_extra: dict | None = None) -> dict:
    """Run one measurement in a fresh interpreter (`python -m MODULE --child SPEC`, with `env_extra`
    added to the environment); its result JSON, or {"error": ..., "log_tail": ...}."""
    spec_path, result_path, log_path = work / f"{tag}.spec.json", work / f"{tag}.result.json", work / f"{tag}.log"
    spec = {**spec, "result": str(result_path)}
    spec_path.write_text(json.dumps(spec))
    t = time.perf_counter()
    with open(log_path, "w") as logf:
        rc = subprocess.run([sys.executable, "-m", module, "--child", str(spec_path)], stdout=logf,
                            stderr=subprocess.STDOUT, env={**_child_env(), **(env_extra or {})}).returncode
    wall = time.perf_counter() - t
    if rc != 0 or not result_path.exists():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        return {"error": f"exit status {rc}", "log_tail": tail, "wall_s": wall}
    res = json.loads(result_path.read_text())
    res["wall_s"] = wall
    return res


def trl_micro_batch(args) -> int:
    """TRL's pairs per forward/backward: --trl-micro-batch, else directpo's --micro-batch, else the
    whole --batch (the same micro-batch and accumulation on both sides unless asked otherwise)."""
    return getattr(args, "trl_micro_batch", 0) or args.micro_batch or args.batch


def _base_spec(args, data_path: Path) -> dict:
    # RMSprop on both sides, directpo's default (the paper's): TRL gets optim="rmsprop" with the
    # same hyper-parameters (`trl.run_trl`).
    return {"model": args.model, "data": str(data_path), "batch": args.batch, "micro_batch": args.micro_batch,
            "trl_micro_batch": trl_micro_batch(args), "optimizer": "rmsprop", "steps": args.steps,
            "max_length": args.max_length, "threads": args.threads, "device": args.device,
            "memory_budget": getattr(args, "memory_budget", None), "lora_r": getattr(args, "lora_r", 0) or 0}


def _figures(cfg: RunConfig, raw: dict, args, tokenized, dims: ModelDims) -> dict:
    """The run's figures from its raw result (raises ValueError/KeyError/ZeroDivisionError if unreadable)."""
    if cfg.system == "directpo":
        figs = summarize_directpo(raw, tokenized, dims, args.batch)
    else:
        figs = summarize_trl(raw, dims, live_ref=not cfg.precompute_ref)
    figs["peak_rss_mib"] = raw["peak_rss_mib"]
    if raw.get("import_rss_mib") is not None:  # RSS once imported, before the model: what imports alone cost
        figs["import_rss_mib"] = raw["import_rss_mib"]
        figs["peak_above_import_mib"] = raw["peak_rss_mib"] - raw["import_rss_mib"]
    figs.update({k: raw[k] for k in ("optimizer", "micro_batch", "grad_accum") if raw.get(k) is not None})
    if "cuda_peak_mib" in raw:
        figs["cuda_peak_mib"] = raw["cuda_peak_mib"]
    figs["train_pairs"] = raw.get("train_pairs")
    figs["trainable_params"] = raw.get("trainable_params")
    if raw.get("memory_plan"):  # --memory-budget: the micro-batch directpo's planner chose
        figs["memory_plan"] = raw["memory_plan"]
    return figs


def _measure(cfg: RunConfig, args, data_path: Path, work: Path, tag: str, tokenized, dims: ModelDims,
             model: str | None = None) -> dict:
    spec = {**_base_spec(args, data_path), "system": cfg.system, "precision": cfg.precision,
            "precompute_ref": cfg.precompute_ref, "gradient_checkpointing": cfg.grad_ckpt,
            "output_dir": str(work / f"{tag}-out")}
    if model:
        spec["model"] = model
    raw = run_child(spec, work, tag)
    shutil.rmtree(work / f"{tag}-out", ignore_errors=True)
    run = {"system": cfg.system, "config": cfg.name, "precision": cfg.precision, "grad_ckpt": cfg.grad_ckpt,
           "wall_s": raw.get("wall_s")}
    if "error" in raw:
        run.update(error=raw["error"], log_tail=raw.get("log_tail"))
        return run
    try:
        run.update(_figures(cfg, raw, args, tokenized, dims))
    except (ValueError, KeyError, ZeroDivisionError) as e:
        run.update(error=f"could not read the run's timings: {e}")
        return run
    n = args.batch * (args.steps + 1)
    if run["train_pairs"] not in (None, n):
        run["warning"] = f"{cfg.system} kept {run['train_pairs']} of the {n} pairs"
        log(f"warning: {cfg.label}: {run['warning']}", prefix="bench")
    if cfg.system == "trl":
        run["trl_version"] = raw.get("trl_version")
    return run


def run_rounds(configs: list[RunConfig], args, data_path: Path, work: Path, tokenized, dims: ModelDims) -> list[dict]:
    """Every configuration once per round, directpo's first, then TRL's: alternating by round."""
    runs: list[dict] = []
    for r in range(args.rounds):
        for i, cfg in enumerate(configs):
            log(f"round {r + 1}/{args.rounds}: {cfg.label} ...", prefix="bench")
            run = _measure(cfg, args, data_path, work, f"r{r}-c{i}", tokenized, dims)
            run["round"] = r + 1
            runs.append(run)
            if "error" in run:
                log(f"round {r + 1}: {cfg.label} FAILED ({run['error']}):\n  " +
                    "\n  ".join(run.get("log_tail") or []), prefix="bench")
            else:
                log(f"round {r + 1}: {cfg.label}: {run['pairs_per_s']:.3f} pairs/s, "
                    f"{run['tokens_per_s']:.0f} tokens/s, peak RSS {run['peak_rss_mib']:.0f} MiB", prefix="bench")
    return runs


# ------------------------------------------------------------------------------------------------
# Vocabulary sweep: directpo's peak RSS as the vocabulary grows


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
    for f in Path(out).glob("*.safetensors"):  # safetensors writes 0600
        default_mode(f)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    del m
    return params, None


def _sweep_one(args, v: int, data_path: Path, work: Path, tokenized, tok) -> dict:
    mdir = work / f"vocab-{v}"
    params, reason = _save_vocab_variant(args.model, v, mdir, tok)
    if reason:
        log(f"vocab {v}: skipped, {reason}", prefix="bench")
        return {"vocab": v, "error": reason}
    dims = model_dims(str(mdir))
    log(f"vocab sweep: vocab {v} ({params / 1e6:.2f}M params), directpo fp32 ...", prefix="bench")
    run = _measure(RunConfig("directpo", "fp32"), args, data_path, work, f"vocab-{v}", tokenized, dims,
                   model=str(mdir))
    shutil.rmtree(mdir, ignore_errors=True)
    row = {"vocab": v, "params": params, "weights_mib": params * 4 / (1 << 20)}
    if "error" in run:
        row.update(error=run["error"], log_tail=run.get("log_tail"))
        log(f"vocab {v}: FAILED ({run['error']})", prefix="bench")
    else:
        row.update({k: run.get(k) for k in ("peak_rss_mib", "pairs_per_s", "tokens_per_s", "gflops",
                                            "cuda_peak_mib") if run.get(k) is not None})
        log(f"vocab {v}: peak RSS {row['peak_rss_mib']:.0f} MiB, {row['pairs_per_s']:.3f} pairs/s", prefix="bench")
    return row


def _sweep_growth(rows: list[dict]) -> None:
    """Each measured size against the first: RSS and vocabulary ratios, and whether RSS grew sub-linearly."""
    ok = [r for r in rows if "peak_rss_mib" in r]
    if len(ok) < 2:
        return
    a, b = ok[0], ok[-1]
    for r in ok:
        r["rss_ratio_vs_first"] = r["peak_rss_mib"] / a["peak_rss_mib"]
        r["vocab_ratio_vs_first"] = r["vocab"] / a["vocab"]
        # fp32 weights + gradients + RMSprop state of the extra parameters (embedding and head)
        r["param_state_growth_mib"] = (r["params"] - a["params"]) * 12 / (1 << 20)
        r["rss_growth_mib"] = r["peak_rss_mib"] - a["peak_rss_mib"]
    b["sublinear"] = b["rss_ratio_vs_first"] < b["vocab_ratio_vs_first"]


def vocab_sweep(args, sizes: list[int], data_path: Path, work: Path, tokenized) -> list[dict]:
    from ..models import load_tokenizer, quiet_transformers

    quiet_transformers()
    tok = load_tokenizer(args.model)
    rows = [_sweep_one(args, v, data_path, work, tokenized, tok) for v in sizes]
    _sweep_growth(rows)
    return rows


# ------------------------------------------------------------------------------------------------
# The whole benchmark


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


def _machine(device) -> dict:
    """The device, its name and torch's threads; on a CPU also what decides its bf16 speed: its
    bf16-relevant flags and torch's vector ISA (`precision.cpu_identity`)."""
    import torch

    from ..precision import cpu_identity

    cpu = None if device.type == "cuda" else cpu_identity()
    machine = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if cpu is None else cpu["cpu"],
               "threads": torch.get_num_threads(), "platform": platform.platform()}
    if cpu is not None:
        machine.update(cpu_flags=cpu["flags"], cpu_isa=cpu["isa"])
    return machine


def _check_args(args) -> tuple[list[str], list[int]]:
    """(systems, vocabulary sizes) of the flags, or a ValueError."""
    if args.batch < 1 or args.steps < 1 or args.rounds < 1:
        raise UserValueError("--batch, --steps and --rounds must be ≥ 1 (the first of steps + 1 steps is a warm-up)")
    if getattr(args, "lora_r", 0) < 0:
        raise UserValueError(f"--lora-r {args.lora_r}: the LoRA rank must be ≥ 0 (0: full fine-tuning)")
    systems = parse_systems(args.systems)
    if "trl" in systems and args.batch % trl_micro_batch(args):
        raise UserValueError(f"--batch {args.batch} is not a multiple of TRL's micro-batch {trl_micro_batch(args)} "
                             "(--trl-micro-batch, else --micro-batch): TRL accumulates whole micro-batches")
    sweep = parse_vocab_sweep(args.vocab_sweep)
    if not systems and not sweep:
        raise UserValueError("nothing to run: --systems none and no --vocab-sweep")
    return systems, sweep


def _probe_bf16(device) -> tuple[dict, bool, str]:
    import torch

    log(f"matmul peak on {device} ({torch.get_num_threads()} threads)...", prefix="bench")
    peaks = probe_peaks(device)
    use_bf16, reason = bf16_decision(peaks)
    log(f"matmul peak: fp32 {peaks['fp32']:.3g} GFLOP/s, bf16 {peaks['bf16']:.3g} GFLOP/s; {reason}", prefix="bench")
    return peaks, use_bf16, reason


def _measure_all(args, systems: list[str], sweep: list[int], have_trl: bool, device, dims: ModelDims,
                 work: Path, skipped: list[dict]) -> dict:
    """Prepare the pairs, probe the peak, run every configuration and the sweep (in `work`)."""
    n = args.batch * (args.steps + 1)
    data_path = work / "pairs.jsonl"
    tokenized, report = prepare_pairs(args.data, args.model, n, args.max_length, data_path, args.data_split)
    peaks, use_bf16, bf16_reason = _probe_bf16(device)
    if not use_bf16 and systems:
        skipped.append({"system": ",".join(systems), "config": "bf16", "reason": bf16_reason})
    configs = plan_configs(systems, use_bf16, have_trl)
    log(f"{n} pairs from {args.data} ({report.summary().splitlines()[0]}); " +
        (f"{len(configs)} configuration(s) × {args.rounds} round(s), " if configs else "") +
        f"{args.steps} timed steps + 1 warm-up each", prefix="bench")
    runs = run_rounds(configs, args, data_path, work, tokenized, dims)
    # The peak is a maximum: probe again after the runs and keep the better figure, so a burst of
    # background load during the first probe does not inflate "% of peak".
    again = probe_peaks(device)
    peaks = {k: max(v, again.get(k, 0.0)) for k, v in peaks.items()}
    results = [summarize_config(cfg, runs, peaks) for cfg in configs]
    return {"matmul_peak_gflops": peaks, "bf16": {"used": use_bf16, "reason": bf16_reason}, "results": results,
            "comparison": compare_systems(results, runs), "runs": runs,
            "vocab_sweep": vocab_sweep(args, sweep, data_path, work, tokenized) if sweep else []}


def _settings(args, systems: list[str], sweep: list[int]) -> dict:
    return {"model": args.model, "data": args.data, "batch": args.batch, "micro_batch": args.micro_batch,
            "trl_micro_batch": trl_micro_batch(args), "optimizer": "rmsprop",
            "memory_budget": getattr(args, "memory_budget", None), "max_length": args.max_length,
            "steps_timed": args.steps, "warmup_steps": 1, "rounds": args.rounds,
            "pairs": args.batch * (args.steps + 1), "systems": systems, "vocab_sweep": sweep,
            "lora_r": getattr(args, "lora_r", 0) or 0}


def run_bench(args) -> dict:
    """Everything `directpo bench` measures, as one JSON-able dict; the printed report is its "table"."""
    import torch

    from .. import __version__
    from ..models import pick_device

    systems, sweep = _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    skipped: list[dict] = []
    have_trl, why_not = trl_available()
    if "trl" in systems and not have_trl:
        log(f"TRL configurations skipped: {why_not}", prefix="bench")
        skipped.append({"system": "trl", "reason": why_not})
    dims = model_dims(args.model)
    dims.frozen = bool(getattr(args, "lora_r", 0))  # LoRA: no weight gradients, in both systems
    work = Path(tempfile.mkdtemp(prefix="directpo-bench-"))
    if args.keep_work:
        log(f"work dir (kept): {work}", prefix="bench")
    try:
        measured = _measure_all(args, systems, sweep, have_trl, device, dims, work, skipped)
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    out = {"directpo_version": __version__, "versions": _versions(), "machine": _machine(device),
           "settings": _settings(args, systems, sweep), "model": asdict(dims),
           "matmul_peak_gflops": measured["matmul_peak_gflops"], "bf16": measured["bf16"],
           "definitions": dict(DEFINITIONS), "results": measured["results"], "comparison": measured["comparison"],
           "runs": measured["runs"], "skipped": skipped, "vocab_sweep": measured["vocab_sweep"]}
    out["table"] = format_report(out)
    return out
