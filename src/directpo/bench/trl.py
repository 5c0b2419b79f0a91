"""The TRL side of `directpo bench`: one DPOTrainer run, in the subprocess the runner starts.

TRL is optional (the `bench` extra) and imported only here, inside `run_trl`. The settings are the
shared anchor script's (`shared/bench/trl_dpo.py`): DPOConfig with report_to='none',
save_strategy='no', logging_steps=1, β 0.1, seed 0, no tqdm, use_cpu on the CPU; directpo's
optimizer (RMSprop, lr 1e-6, constant, clipping at 10: `same_optimizer`), its micro-batch and
accumulation, gradient checkpointing as the runner says (DPOConfig's default is on); steps are timed by a TrainerCallback at `on_step_end`. The trainer additionally records, per
optimizer step, the sizes of the tensors it was given (rows, real tokens, label tokens, Σ len²),
from which `directpo.bench.report` counts tokens and model FLOPs.
"""
from __future__ import annotations

import json
import os
import tempfile
import time


def _lora_config(r: int):
    """The adapters of directpo's `--lora-r r` (every linear layer of the blocks, its α, no dropout),
    for TRL's `peft_config`; None: full fine-tuning."""
    if not r:
        return None
    from dataclasses import fields

    from peft import LoraConfig

    from ..training.config import TrainConfig

    d = {f.name: f.default for f in fields(TrainConfig)}
    return LoraConfig(r=r, lora_alpha=d["lora_alpha"], lora_dropout=d["lora_dropout"],
                      target_modules=d["lora_target_modules"], task_type="CAUSAL_LM")


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    import trl
    from trl import DPOConfig, DPOTrainer

    from ..models import safetensors_only_error
    from .fairness import import_baseline

    import_rss = import_baseline(spec["model"])  # torch, transformers, datasets, TRL imported; nothing loaded yet

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = spec.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    use_cpu = not str(device).startswith("cuda")
    if not use_cpu and ":" in str(device):
        torch.cuda.set_device(torch.device(device))

    with open(spec["data"]) as f:
        rows = [json.loads(line) for line in f if line.strip()]

    tok = AutoTokenizer.from_pretrained(spec["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # safetensors only, as directpo's side (`directpo.models.load_model`): a pickled .bin can run code.
    try:
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, use_safetensors=True)
    except OSError as e:
        raise (safetensors_only_error(spec["model"], e) or e) from e

    class Clock(TrainerCallback):
        def __init__(self):
            self.t: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            if not use_cpu:
                torch.cuda.synchronize()
            self.t.append(time.perf_counter())

    class CountingDPOTrainer(DPOTrainer):
        """Records what each training step processes: padded rows, real tokens, label tokens."""

        step_inputs: list[dict] = []

        def training_step(self, model, inputs, *args, **kwargs):
            mask = inputs["attention_mask"]
            lens = mask.sum(dim=1).double()
            self.step_inputs.append({"rows": int(mask.shape[0]), "tokens": int(lens.sum().item()),
                                     "labels": int(inputs["completion_mask"][:, 1:].sum().item()),
                                     "sq_len": float((lens * lens).sum().item()), "padded_len": int(mask.shape[1])})
            return super().training_step(model, inputs, *args, **kwargs)

    out_dir = spec.get("output_dir") or tempfile.mkdtemp(prefix="directpo-bench-trl-")
    os.makedirs(out_dir, exist_ok=True)
    micro = spec.get("trl_micro_batch") or spec["batch"]
    cfg = DPOConfig(output_dir=out_dir, per_device_train_batch_size=micro,
                    gradient_accumulation_steps=spec["batch"] // micro, max_steps=spec["steps"] + 1,
                    max_length=spec["max_length"], beta=0.1, logging_steps=1, report_to="none",
                    save_strategy="no", use_cpu=use_cpu, precompute_ref_log_probs=spec["precompute_ref"],
                    dataloader_num_workers=0, seed=0, bf16=spec["precision"] == "bf16", fp16=False, disable_tqdm=True,
                    gradient_checkpointing=bool(spec.get("gradient_checkpointing")), **same_optimizer(spec))
    clock = Clock()
    trainer = CountingDPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                                 callbacks=[clock], peft_config=_lora_config(spec.get("lora_r") or 0))
    trainer.step_inputs = []
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # (inside accelerate's wrapper)
    used = {"name": type(opt).__name__.lower(), **{k: opt.defaults.get(k) for k in (
        "lr", "weight_decay", "alpha", "eps", "momentum", "centered") if k in opt.defaults}}
    return {"step_end_times": clock.t, "step_inputs": trainer.step_inputs, "train_pairs": len(trainer.train_dataset),
            "trl_version": trl.__version__, "train_wall_s": total, "trainable_params": trainable,
            "import_rss_mib": import_rss, "micro_batch": micro, "grad_accum": spec["batch"] // micro,
            "optimizer": used}


def same_optimizer(spec: dict) -> dict:
    """DPOConfig's optimizer settings for directpo's (`training.optim`, `TrainConfig` defaults): its
    RMSprop with every hyper-parameter given (transformers' `optim_args`), lr 1e-6 constant after
    no warm-up, gradient norm clipped at directpo's 10 (TRL's defaults: AdamW, a linear decay, 1.0)."""
    from dataclasses import fields

    from ..training.config import TrainConfig
    from .fairness import rmsprop_settings

    d = {f.name: f.default for f in fields(TrainConfig)}
    name = spec.get("optimizer") or "rmsprop"
    if name != "rmsprop":
        raise ValueError(f"the TRL side runs directpo's rmsprop only, not {name!r}")
    r = rmsprop_settings(1e-6)
    args = ",".join(f"{k}={r[k]}" for k in ("alpha", "eps", "momentum", "weight_decay", "centered"))
    return {"optim": "rmsprop", "optim_args": args, "learning_rate": r["lr"], "weight_decay": r["weight_decay"],
            "lr_scheduler_type": "constant", "warmup_steps": 0, "max_grad_norm": d["max_grad_norm"]}
