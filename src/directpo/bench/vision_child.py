"""One run of `directpo bench --vision`, in its own process (`python -m directpo.bench.vision_child SPEC`).

SPEC (written by `vision.py`) holds the system, the model folder, the pairs file (TRL's vision
format, image paths absolute), batch, micro-batch, max_length, timed steps, threads and, for
directpo, whether its reference is precomputed. The run trains steps + 1 optimizer steps (the first
is the warm-up) and writes to SPEC's `result`: the end times of the steps (seconds from one clock),
the RSS once its libraries are imported (the baseline), its peak RSS and what it trained.

Both sides: fp32, seed 0, directpo's RMSprop (lr 1e-6 constant, clipping at 10: `trl.same_optimizer`),
the vision tower and projector frozen (directpo's `--freeze-vision` default; on TRL's side the same
parameters are frozen with `training.vlm.freeze_vision` before the trainer is built, so both train
the same language-model weights), no gradient checkpointing.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def vision_import_baseline(model: str) -> float | None:
    """`fairness.import_baseline` for a vision-language model: its architecture module (looked up
    through AutoModelForImageTextToText's mapping) and PIL's image plugins are imported first too."""
    from PIL import Image
    from transformers import AutoConfig, AutoModelForImageTextToText

    from .fairness import import_baseline

    Image.init()
    try:
        AutoModelForImageTextToText._model_mapping[type(AutoConfig.from_pretrained(model))]
    except (KeyError, OSError, ValueError):
        pass  # counted above the baseline instead, on both sides alike
    return import_baseline(model)


def run_directpo(spec: dict) -> dict:
    """`directpo train` in this process, as `child.directpo_train_config` sets it up (with its
    defaults: packed layout, vision frozen), the reference precomputed or live as the spec says."""
    from dataclasses import replace

    from ..runfiles import read_metrics
    from ..training.loop import train
    from .child import directpo_train_config

    baseline = vision_import_baseline(spec["model"])
    tc = replace(directpo_train_config({**spec, "precision": "fp32"}), precompute_ref=spec["precompute_ref"])
    train(tc)
    out = Path(spec["output_dir"])
    metrics = read_metrics(out, split="train")
    cfg = json.loads((out / "directpo_config.json").read_text())
    return {"step_end_s": [m["elapsed_s"] for m in metrics], "import_rss_mib": baseline,
            "trainable_params": cfg.get("trainable_params"), "train_pairs": cfg.get("train_examples")}


def run_trl(spec: dict) -> dict:
    """TRL 1.16's DPOTrainer with the model's processor (its vision collator), the reference model
    live: TRL refuses `precompute_ref_log_probs=True` for vision datasets (see `vision_parity`)."""
    import torch
    import trl
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from ..training.vlm import freeze_vision
    from ..vision import load_processor, load_vision_model
    from .trl import same_optimizer
    from .vision_parity import _trl_dataset, read_pairs

    baseline = vision_import_baseline(spec["model"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    n = spec["batch"] * (spec["steps"] + 1)
    rows = read_pairs(spec["data"], n)
    model = load_vision_model(spec["model"], dtype=torch.float32)
    freeze_vision(model)
    processor = load_processor(spec["model"])  # Qwen2-VL's without its video part: no torchvision here

    class Clock(TrainerCallback):
        def __init__(self):
            self.t: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            self.t.append(time.perf_counter())

    micro = spec["micro_batch"]
    cfg = DPOConfig(output_dir=spec["output_dir"], per_device_train_batch_size=micro,
                    gradient_accumulation_steps=spec["batch"] // micro, max_steps=spec["steps"] + 1,
                    max_length=spec["max_length"], beta=0.1, logging_steps=1, report_to="none",
                    save_strategy="no", use_cpu=True, precompute_ref_log_probs=False, gradient_checkpointing=False,
                    dataloader_num_workers=0, seed=0, bf16=False, fp16=False, disable_tqdm=True,
                    **same_optimizer({"optimizer": "rmsprop"}))
    clock = Clock()
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=_trl_dataset(rows), processing_class=processor,
                         callbacks=[clock])
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"step_end_s": clock.t, "import_rss_mib": baseline, "trainable_params": trainable, "train_pairs": n,
            "trl_version": trl.__version__}


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    res = run_directpo(spec) if spec["system"] == "directpo" else run_trl(spec)
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    Path(spec["result"]).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m directpo.bench.vision_child SPEC.json (internal)")
    sys.exit(main(sys.argv[1]))
