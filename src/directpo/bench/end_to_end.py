"""`directpo bench --end-to-end`: the user's whole command, directpo's against TRL's.

What a user waits for is the command, not the timed steps: interpreter start and imports, loading
the model, tokenizing the data, the reference pass, N steps, saving. Both systems get the same pairs
(`runner.prepare_pairs`: the first --end-to-end-pairs usable pairs of --data, as explicit
prompt/chosen/rejected rows), the same batch, micro-batch and accumulation, max_length, steps (or one
epoch with --steps 0), fp32, β 0.1, seed 0 and the same optimizer (directpo's RMSprop, lr 1e-6
constant, clipping at 10: `trl.same_optimizer`); both precompute the reference log-probs (directpo's
default; its on-disk cache off, so every round computes them), TRL without gradient checkpointing.

Each run is its own process, started by file (`python -P e2e_directpo.py SPEC`, `e2e_trl.py`):
directpo's runs `python -m directpo train ...`, TRL's is a plain TRL script importing nothing of
directpo's. A round runs both, the first swapping each round. Wall time is from just before the
process starts to its exit, measured here; the phases are timed inside (the import phase from the
launch time this process hands over); "other" is the rest (interpreter exit, what no phase covers).
Figures are medians over rounds.
"""
from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..console import log
from ..errors import UserValueError
from .child import keep_prompt
from .runner import _child_env, _machine, _versions, parse_systems, prepare_pairs, trl_micro_batch, without_missing_trl

PHASES = ("import", "load", "tokenize", "reference", "steps", "save", "other")
HERE = Path(__file__).resolve().parent


def directpo_argv(cfg, data: Path, out: Path) -> list[str]:
    """The `directpo train` command of the comparison (its arguments after `directpo`)."""
    argv = ["train", "--model", cfg.model, "--data", str(data), "--output-dir", str(out),
            "--batch-size", str(cfg.batch), "--micro-batch-size", str(cfg.micro_batch or cfg.batch),
            "--max-length", str(cfg.max_length), "--max-prompt-length", str(keep_prompt(cfg.max_length)),
            "--lr", "1e-6", "--warmup-steps", "0", "--optimizer", "rmsprop", "--precision", "fp32",
            "--seed", "0", "--ref-cache", "off", "--no-progress"]
    argv += ["--max-steps", str(cfg.steps)] if cfg.steps else ["--epochs", "1"]
    if cfg.threads:
        argv += ["--threads", str(cfg.threads)]
    if cfg.device:
        argv += ["--device", cfg.device]
    return argv


def trl_dpo_config(cfg) -> dict:
    """DPOConfig's keyword arguments for the same run (without output_dir)."""
    from .trl import same_optimizer

    micro = trl_micro_batch(cfg)
    use_cpu = not str(cfg.device or "").startswith("cuda") and not _cuda()
    return {"per_device_train_batch_size": micro, "gradient_accumulation_steps": cfg.batch // micro,
            "max_steps": cfg.steps or -1, "num_train_epochs": 1, "max_length": cfg.max_length, "beta": 0.1,
            "logging_steps": 1, "report_to": "none", "save_strategy": "no", "use_cpu": use_cpu,
            "precompute_ref_log_probs": True, "gradient_checkpointing": False, "dataloader_num_workers": 0,
            "seed": 0, "bf16": False, "fp16": False, "disable_tqdm": True, **same_optimizer({"optimizer": "rmsprop"})}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_one(system: str, cfg, data: Path, work: Path, tag: str) -> dict:
    """One whole command in its own process: wall time, phases (with "other"), peak RSS; or an error."""
    out, result, log_path = work / f"{tag}-out", work / f"{tag}.result.json", work / f"{tag}.log"
    spec = {"result": str(result), "output_dir": str(out)}
    if system == "directpo":
        spec["argv"], script = directpo_argv(cfg, data, out), "e2e_directpo.py"
    else:
        spec.update(model=cfg.model, data=str(data), threads=cfg.threads, dpo_config=trl_dpo_config(cfg))
        script = "e2e_trl.py"
    spec_path = work / f"{tag}.spec.json"
    env = {**_child_env(), "HF_DATASETS_CACHE": str(work / f"{tag}-datasets")}  # (TRL's map caches: per run)
    spec["t_launch"] = time.time()
    spec_path.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        rc = subprocess.run([sys.executable, "-P", str(HERE / script), str(spec_path)], stdout=logf,
                            stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t0
    run = {"system": system, "wall_s": wall}
    if rc != 0 or not result.exists():
        run.update(error=f"exit status {rc}", log_tail=log_path.read_text(errors="replace").strip().splitlines()[-15:])
        return run
    raw = json.loads(result.read_text())
    phases = {k: raw["phases"].get(k, 0.0) for k in PHASES[:-1]}
    phases["other"] = max(0.0, wall - sum(phases.values()))
    run.update(phases=phases, peak_rss_mib=raw["peak_rss_mib"], saved=_saved(out),
               steps=raw.get("steps_done") if system == "trl" else _directpo_steps(out))
    if raw.get("missing_stages"):
        run["missing_stages"] = raw["missing_stages"]
    shutil.rmtree(out, ignore_errors=True)
    return run


def _saved(out: Path) -> bool:
    """A model was written (safetensors weights in the output directory)."""
    return any(out.glob("*.safetensors"))


def _directpo_steps(out: Path) -> int:
    from ..runfiles import read_metrics

    return len(read_metrics(out, split="train"))


def _summary(runs: list[dict], system: str) -> dict:
    ok = [r for r in runs if r["system"] == system and "error" not in r]
    res = {"system": system, "rounds_ok": len(ok), "rounds_failed": sum(r["system"] == system for r in runs) - len(ok)}
    if ok:
        res["wall_s"] = statistics.median(r["wall_s"] for r in ok)
        res["phases"] = {p: statistics.median(r["phases"][p] for r in ok) for p in PHASES}
        res["peak_rss_mib"] = statistics.median(r["peak_rss_mib"] for r in ok)
        res["steps"] = ok[0]["steps"]
    return res


def format_table(result: dict) -> str:
    """The markdown table: each system's wall time and where its seconds went."""
    s = result["settings"]
    lines = [f"directpo bench --end-to-end: {s['model']}, {s['pairs']} pairs, batch {s['batch']} "
             f"(micro-batch × accumulation: directpo {s['micro_batch']}×{-(-s['batch'] // s['micro_batch'])}, "
             f"TRL {s['trl_micro_batch']}×{s['batch'] // s['trl_micro_batch']}), max_length {s['max_length']}, "
             f"{s['steps'] or 'one epoch of'} steps, RMSprop both, fp32, {s['rounds']} round(s), medians", "",
             "| system | whole command s | " + " | ".join(PHASES) + " | peak RSS MiB | steps run |",
             "| --- | --- | " + " | ".join("---" for _ in PHASES) + " | --- | --- |"]
    for r in result["results"]:
        if not r["rounds_ok"]:
            lines.append(f"| {r['system']} | failed in every round (see runs[].log_tail) |")
            continue
        lines.append(f"| {r['system']} | {r['wall_s']:.2f} | " + " | ".join(f"{r['phases'][p]:.2f}" for p in PHASES)
                     + f" | {r['peak_rss_mib']:.0f} | {r['steps']} |")
    if result.get("ratio"):
        lines += ["", f"TRL's whole command takes {result['ratio']:.2f}× directpo's wall time."]
    return "\n".join(lines)


def _check(cfg) -> list[str]:
    systems = parse_systems(cfg.systems)
    if not systems:
        raise UserValueError("--end-to-end: nothing to run (--systems none)")
    if cfg.batch < 1 or cfg.rounds < 1 or cfg.steps < 0:
        raise UserValueError("--end-to-end: --batch and --rounds must be ≥ 1, --steps ≥ 0 (0: one epoch)")
    if "trl" in systems and cfg.batch % trl_micro_batch(cfg):
        raise UserValueError(f"--batch {cfg.batch} is not a multiple of TRL's micro-batch {trl_micro_batch(cfg)} "
                             "(--trl-micro-batch, else --micro-batch): TRL accumulates whole micro-batches")
    return without_missing_trl(systems)


def end_to_end(cfg) -> dict:
    """Every round's runs, the medians per system, the ratio and the table, as one JSON-able dict."""
    from .. import __version__
    from ..models import pick_device

    systems = _check(cfg)
    work = Path(tempfile.mkdtemp(prefix="directpo-bench-e2e-"))
    try:
        data = work / "pairs.jsonl"
        tokenized, report = prepare_pairs(cfg.data, cfg.model, cfg.end_to_end_pairs or None, cfg.max_length, data,
                                          cfg.data_split)
        pairs = len(tokenized)
        if pairs < cfg.batch:
            raise UserValueError(f"{cfg.data}: {pairs} usable pairs, fewer than --batch {cfg.batch}")
        log(f"{pairs} pairs from {cfg.data} ({report.summary().splitlines()[0]}); {len(systems)} system(s) × "
            f"{cfg.rounds} round(s)", prefix="bench")
        runs = []
        for r in range(cfg.rounds):
            for system in (systems if r % 2 == 0 else systems[::-1]):
                log(f"round {r + 1}/{cfg.rounds}: {system}, the whole command ...", prefix="bench")
                run = {**run_one(system, cfg, data, work, f"r{r}-{system}"), "round": r + 1}
                runs.append(run)
                log(f"round {r + 1}: {system}: " + (f"FAILED ({run['error']}):\n  " + "\n  ".join(run["log_tail"])
                                                    if "error" in run else f"{run['wall_s']:.2f} s"), prefix="bench")
    finally:
        if not cfg.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    results = [_summary(runs, s) for s in systems]
    by = {r["system"]: r for r in results if r["rounds_ok"]}
    out = {"directpo_version": __version__, "versions": _versions(), "machine": _machine(pick_device(cfg.device)),
           "settings": {"model": cfg.model, "data": cfg.data, "pairs": pairs, "batch": cfg.batch,
                        "micro_batch": cfg.micro_batch or cfg.batch, "trl_micro_batch": trl_micro_batch(cfg),
                        "max_length": cfg.max_length, "steps": cfg.steps, "rounds": cfg.rounds, "systems": systems,
                        "optimizer": "rmsprop", "precision": "fp32"},
           "phases": list(PHASES), "results": results, "runs": runs,
           "ratio": by["trl"]["wall_s"] / by["directpo"]["wall_s"] if {"trl", "directpo"} <= set(by) else None}
    out["table"] = format_table(out)
    return out
