"""`directpo bench --vision`: directpo against TRL 1.16's DPOTrainer on image preference pairs (issue #30).

What is compared
    One vision-language model and one set of image pairs for every run. Without --model, a tiny
    Qwen2-VL is built on the spot (`toy.build_tiny_vlm`: 4 language layers of width 256 and a
    4-layer vision tower of width 128 on 14-px patches, so an --image-size 224 picture is 256
    patches through the tower and 64 image tokens in the prompt); without --data, colour pictures
    are made on the spot (`toy.colour_image_task`, --image-size pixels a side). The first
    batch × (steps + 1) pairs are written once, image paths absolute, and every run trains one epoch
    over exactly them: steps + 1 optimizer steps, the first a warm-up.

    The runs (`vision_child.py`): directpo with its defaults (packed layout: the picture encoded once
    per pair; the reference log-probs precomputed before step 1), directpo with --no-precompute-ref
    (the reference model run at every step, like for like with TRL), and TRL's DPOTrainer with the
    model's processor, its reference model live: TRL 1.16 refuses `precompute_ref_log_probs=True`
    for vision datasets. All fp32, the same batch and micro-batch, directpo's RMSprop on both sides,
    the vision tower and projector frozen on both.

How it is measured
    Each run is its own process; its peak RSS (`ru_maxrss`) is also given above its RSS once its
    libraries are imported (`vision_child.vision_import_baseline`). Round r runs every configuration,
    the order reversed every other round, so background load spreads over all of them. pairs/s =
    timed pairs / time from the end of step 1 to the end of the last; figures are medians over rounds.
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
from .runner import _child_env, _machine, _versions, parse_systems, without_missing_trl

# The tiny Qwen2-VL built when no --model is given: big enough that the vision tower matters.
MODEL_SIZES = {"hidden": 256, "layers": 4, "heads": 4, "vision_layers": 4, "vision_hidden": 128, "vision_heads": 4}

# (system, label, directpo's reference precomputed)
CONFIGS = [("directpo", "directpo (packed, precomputed reference)", True),
           ("directpo", "directpo --no-precompute-ref (packed, live reference)", False),
           ("trl", "TRL DPOTrainer (live reference: precompute refused for images)", False)]


def build_model(work: Path, image_size: int) -> Path:
    """The tiny Qwen2-VL of `MODEL_SIZES`, its tokenizer trained on the task's texts."""
    from ..toy import COLOUR_QUESTION, COLOURS, build_tiny_vlm

    texts = [f"{COLOUR_QUESTION} It is {c}." for c in COLOURS] * 8
    return build_tiny_vlm(work / "model", "qwen2_vl", texts, image_size=image_size, seed=0, **MODEL_SIZES)


def prepare_pairs(cfg, work: Path, n: int) -> Path:
    """The first n pairs of --data (or of colour pictures made on the spot) as one JSONL whose image
    paths are absolute, the file every run reads."""
    from .vision_parity import read_pairs

    data = cfg.data
    if data is None:
        from ..toy import colour_image_task

        data, _ = colour_image_task(work / "task", n_train=n, n_eval=0, seed=0, size=cfg.image_size)
    try:
        rows = read_pairs(data, n)
    except ValueError as e:
        raise UserValueError(f"--data: {e} (--batch × (--steps + 1) pairs)") from None
    out = work / "pairs.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


# what `training.vlm.cache_image_features` logs when the features are kept
FEATURES_KEPT = "image features: computed once per image and kept"


def run_one(system: str, precompute: bool, cfg, model: Path, data: Path, work: Path, tag: str) -> dict:
    """One run in its own process: its raw figures, or an error with its log's tail."""
    result, log_path = work / f"{tag}.result.json", work / f"{tag}.log"
    spec = {"system": system, "model": str(model), "data": str(data), "output_dir": str(work / f"{tag}-out"),
            "batch": cfg.batch, "micro_batch": cfg.micro_batch or cfg.batch, "steps": cfg.steps,
            "max_length": cfg.max_length, "threads": cfg.threads, "device": "cpu", "precompute_ref": precompute,
            "result": str(result)}
    spec_path = work / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**_child_env(), "HF_DATASETS_CACHE": str(work / f"{tag}-datasets")}
    with open(log_path, "w") as logf:
        rc = subprocess.run([sys.executable, "-m", "directpo.bench.vision_child", str(spec_path)], stdout=logf,
                            stderr=subprocess.STDOUT, env=env).returncode
    shutil.rmtree(work / f"{tag}-out", ignore_errors=True)
    if rc != 0 or not result.exists():
        return {"error": f"exit status {rc}", "log_tail": log_path.read_text(errors="replace").strip().splitlines()[-15:]}
    raw = json.loads(result.read_text())
    t = raw.pop("step_end_s")
    if len(t) != cfg.steps + 1:
        return {"error": f"{len(t)} steps run, not {cfg.steps + 1}"}
    n = cfg.batch * (cfg.steps + 1)
    if raw.get("train_pairs") not in (None, n):  # directpo skips a pair whose prompt leaves no room
        return {"error": f"{raw['train_pairs']} of the {n} pairs trained (raise --max-length)"}
    run = {**raw, "pairs_per_s": cfg.batch * cfg.steps / (t[-1] - t[0])}
    if system == "directpo":  # whether its frozen tower's image features were kept (--image-feature-cache)
        run["image_feature_cache"] = FEATURES_KEPT in log_path.read_text(errors="replace")
    if raw.get("import_rss_mib") is not None:
        run["above_import_mib"] = raw["peak_rss_mib"] - raw["import_rss_mib"]
    return run


def _summary(label: str, system: str, precompute: bool, runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    res = {"label": label, "system": system, "precompute_ref": precompute, "rounds_ok": len(ok),
           "rounds_failed": len(runs) - len(ok)}
    for key in ("pairs_per_s", "peak_rss_mib", "above_import_mib"):
        values = [r[key] for r in ok if r.get(key) is not None]
        res[key] = statistics.median(values) if values else None
    if ok:
        res["trainable_params"] = ok[0].get("trainable_params")
        res["image_feature_cache"] = ok[0].get("image_feature_cache")
    return res


def format_table(result: dict) -> str:
    s = result["settings"]
    lines = [f"directpo bench --vision: {s['model_desc']}, {s['pairs']} image pairs ({s['image_size']} px), batch "
             f"{s['batch']} (micro-batch {s['micro_batch']}), {s['steps']} timed steps after 1 warm-up, RMSprop "
             f"both, fp32, vision tower frozen both, {s['rounds']} round(s), medians", "",
             "| run | pairs/s | peak RSS MiB | above import MiB | trainable params | rounds ok |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in result["results"]:
        def fmt(v, spec):
            return "—" if v is None else format(v, spec)
        cache = {True: ", image features cached", False: ", image features at every step"}.get(
            r.get("image_feature_cache"), "")
        lines.append(f"| {r['label']}{cache} | {fmt(r['pairs_per_s'], '.2f')} | {fmt(r['peak_rss_mib'], '.0f')} | "
                     f"{fmt(r['above_import_mib'], '.0f')} | {fmt(r.get('trainable_params'), ',')} | "
                     f"{r['rounds_ok']}/{r['rounds_ok'] + r['rounds_failed']} |")
    if result["ratios"]:
        lines += ["", *result["ratios"]]
    return "\n".join(lines)


def ratios(results: list[dict]) -> list[str]:
    """Each directpo run against TRL's: speed and memory above the import baseline."""
    trl = next((r for r in results if r["system"] == "trl" and r["pairs_per_s"]), None)
    out = []
    for r in results:
        if trl is None or r["system"] != "directpo" or not r["pairs_per_s"]:
            continue
        mem = (f", {r['above_import_mib'] / trl['above_import_mib']:.2f}× TRL's memory above the import baseline"
               if r["above_import_mib"] and trl["above_import_mib"] else "")
        out.append(f"{r['label']}: {r['pairs_per_s'] / trl['pairs_per_s']:.2f}× TRL's pairs/s{mem} "
                   f"({r['peak_rss_mib'] / trl['peak_rss_mib']:.2f}× its peak RSS).")
    return out


def _check(cfg) -> list[tuple[str, str, bool]]:
    systems = parse_systems(cfg.systems)
    if cfg.device not in (None, "cpu"):  # both children are set up for the CPU (TRL's use_cpu)
        raise UserValueError(f"--vision runs on the CPU only, not --device {cfg.device}: leave out --device")
    if cfg.batch < 1 or cfg.rounds < 1 or cfg.steps < 1:
        raise UserValueError("--vision: --batch, --rounds and --steps must be ≥ 1")
    micro = cfg.micro_batch or cfg.batch
    if cfg.batch % micro:
        raise UserValueError(f"--vision: --batch {cfg.batch} is not a multiple of --micro-batch {micro} "
                             "(TRL accumulates whole micro-batches)")
    systems = without_missing_trl(systems)
    configs = [c for c in CONFIGS if c[0] in systems]
    if not configs:
        raise UserValueError("--vision: nothing to run (--systems)")
    return configs


def vision_bench(cfg) -> dict:
    """Every round's runs, the medians per configuration, the ratios and the table, as one JSON-able dict."""
    import torch

    from .. import __version__

    configs = _check(cfg)
    work = Path(tempfile.mkdtemp(prefix="directpo-bench-vision-"))
    n = cfg.batch * (cfg.steps + 1)
    try:
        model = Path(cfg.model) if cfg.model else build_model(work, cfg.image_size)
        data = prepare_pairs(cfg, work, n)
        log(f"{n} image pairs, {len(configs)} run(s) × {cfg.rounds} round(s)", prefix="bench")
        runs: dict[str, list[dict]] = {label: [] for _, label, _ in configs}
        for r in range(cfg.rounds):
            for i, (system, label, precompute) in enumerate(configs if r % 2 == 0 else configs[::-1]):
                log(f"round {r + 1}/{cfg.rounds}: {label} ...", prefix="bench")
                t0 = time.perf_counter()
                run = {**run_one(system, precompute, cfg, model, data, work, f"r{r}-{system}-{int(precompute)}"),
                       "round": r + 1, "wall_s": time.perf_counter() - t0}
                runs[label].append(run)
                log(f"round {r + 1}: " + (f"FAILED ({run['error']}):\n  " + "\n  ".join(run.get("log_tail", []))
                                          if "error" in run else f"{run['pairs_per_s']:.2f} pairs/s, peak RSS "
                                          f"{run['peak_rss_mib']:.0f} MiB"), prefix="bench")
    finally:
        if not cfg.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    results = [_summary(label, system, pre, runs[label]) for system, label, pre in configs]
    desc = cfg.model or ("tiny Qwen2-VL built on the spot (" + ", ".join(f"{k} {v}" for k, v in MODEL_SIZES.items())
                         + ")")
    out = {"directpo_version": __version__, "versions": _versions(), "machine": _machine(torch.device("cpu")),
           "settings": {"model": cfg.model, "model_desc": desc, "data": cfg.data, "pairs": n,
                        "image_size": cfg.image_size, "batch": cfg.batch, "micro_batch": cfg.micro_batch or cfg.batch,
                        "max_length": cfg.max_length, "steps": cfg.steps, "rounds": cfg.rounds,
                        "threads": cfg.threads, "optimizer": "rmsprop", "precision": "fp32", "freeze_vision": True},
           "results": results, "runs": runs, "ratios": ratios(results)}
    out["table"] = format_table(out)
    return out
