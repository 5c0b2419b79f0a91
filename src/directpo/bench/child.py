"""One measurement, inside its own subprocess (`python -m directpo.bench --child SPEC`).

The runner writes a spec (system, model, pairs file, batch, steps, precision, ...) and starts a
fresh interpreter on it; this module runs that one training and writes the raw figures (per-step
timings, peak RSS of this process) where the spec's `result` says.
"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path


def directpo_train_config(spec: dict):
    """The `TrainConfig` of a directpo run: the same as `directpo train` with these flags:
    --batch-size B --micro-batch-size MB --max-steps steps+1 --warmup-steps 0 --lr 1e-6 --precompute-ref
    --no-progress --max-length L --on-invalid skip --precision P --seed 0 --ref-cache off --overwrite
    [--threads N] [--device D] [--memory-budget SIZE: then the micro-batch is the planner's]
    [--lora-r R: adapters on every linear layer, α and dropout directpo's defaults]."""
    from ..training.config import TrainConfig

    return TrainConfig(model=spec["model"], data=spec["data"], output_dir=spec["output_dir"],
                       batch_size=spec["batch"], micro_batch_size=spec.get("micro_batch") or spec["batch"],
                       max_steps=spec["steps"] + 1, warmup_steps=0, lr=1e-6, precompute_ref=True, progress=False,
                       max_length=spec["max_length"], max_prompt_length=keep_prompt(spec["max_length"]),
                       on_invalid="skip", precision=spec["precision"], seed=0,
                       ref_cache="off", overwrite=True, threads=spec.get("threads") or 0, device=spec.get("device"),
                       memory_budget=spec.get("memory_budget"), lora_r=spec.get("lora_r") or 0,
                       optimizer=spec.get("optimizer") or "rmsprop")


def keep_prompt(max_length: int | None) -> int | None:
    """The prompt limit that truncates as TRL does (the prompt kept whole, the responses cut to
    fit), so both systems compute the same tokens; directpo's own default would cut the prompt of
    a pair that does not fit to half of max_length."""
    return max_length - 1 if max_length else None


def _child_directpo(spec: dict) -> dict:
    """Train with directpo's own loop in this process; per-step figures from its metrics.jsonl."""
    from ..runfiles import read_metrics
    from ..training.loop import train
    from .fairness import import_baseline, rmsprop_settings

    import_rss = import_baseline(spec["model"])  # before the model is loaded
    tc = directpo_train_config(spec)
    train(tc)
    out = Path(spec["output_dir"])
    steps = []
    for m in read_metrics(out, split="train"):
        dt = spec["batch"] / m["pairs_per_s"]
        steps.append({"step": m["step"], "pairs": spec["batch"], "dt": dt,
                      "tokens_processed": m["tokens_per_s"] * dt, "elapsed_s": m.get("elapsed_s")})
    cfg = json.loads((out / "directpo_config.json").read_text())
    plan = cfg.get("memory_plan")
    micro = (plan or {}).get("micro_batch_size") or tc.micro_batch_size
    return {"steps": steps, "train_pairs": cfg.get("train_pairs", cfg.get("train_examples")),
            "memory_plan": plan, "trainable_params": cfg.get("trainable_params"), "import_rss_mib": import_rss,
            "micro_batch": micro, "grad_accum": -(-spec["batch"] // micro),
            "optimizer": rmsprop_settings(tc.lr, tc.weight_decay) if tc.optimizer == "rmsprop"
            else {"name": tc.optimizer, "lr": tc.lr, "weight_decay": tc.weight_decay}}


def child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    if spec["system"] == "directpo":
        res = _child_directpo(spec)
    elif spec["system"] == "trl":
        from .trl import run_trl

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
