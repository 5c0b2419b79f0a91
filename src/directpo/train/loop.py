"""The DPO training loop, readable top to bottom.

    data -> tokenized pairs -> (policy, frozen reference) -> for each step:
        for each micro-batch: policy log-probs (grad), reference log-probs (no grad or precomputed),
                              loss = Σ per-pair losses / batch size, backward
        clip, optimizer step, lr schedule, one metrics.jsonl line, maybe evaluate
    -> save the policy (safetensors) and tokenizer in Hugging Face format.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import __version__
from ..data import SkipReport, TokenizeStats, load_examples, make_collate, tokenize_examples
from ..logprobs import dataset_logps, example_logps
from ..losses import get_pairwise_loss
from ..models import freeze, load_model, load_tokenizer, pick_device
from ..reference import default_cache_dir, model_fingerprint, reference_logps
from .config import TrainConfig
from .optim import build_optimizer, warmup_schedule


def log(msg: str) -> None:
    print(f"[directpo] {msg}", file=sys.stderr, flush=True)


def prepare_data(spec, tokenizer, cfg: TrainConfig, what: str):
    """Load, validate and tokenize a preference file; report what was skipped or truncated."""
    report, stats = SkipReport(), TokenizeStats()
    examples = load_examples(spec, on_invalid=cfg.on_invalid, split=cfg.data_split, report=report)
    tokenized = tokenize_examples(examples, tokenizer, cfg.max_length, cfg.max_prompt_length,
                                  on_invalid=cfg.on_invalid, report=report, stats=stats)
    bad = [ex for ex in tokenized if len(ex.response_ids) != 2]
    if bad:
        raise ValueError(f"{bad[0].source}, row {bad[0].row}: the '{cfg.loss}' loss takes pairs, "
                         f"this row has {len(bad[0].response_ids)} ranked responses")
    log(f"{what}: {len(tokenized)} pairs from {spec}; {report.summary()}; {stats.summary()}")
    return tokenized, report, stats


def batch_order(n: int, batch_size: int, seed: int):
    """Yield (epoch, example indices) forever: a fresh seeded permutation each epoch.

    The order depends only on (seed, epoch), so a run is reproducible and step k's batch can be
    recomputed from k alone.
    """
    epoch = 0
    while True:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for s in range(0, n, batch_size):
            yield epoch, perm[s:s + batch_size]
        epoch += 1


def pair_stats(res, pol: torch.Tensor, ref: torch.Tensor | None = None) -> dict[str, float]:
    """Sums (not means) over the pairs of a micro-batch, so micro-batches add up exactly."""
    margin = res.chosen_rewards - res.rejected_rewards
    return {
        "loss": res.losses.detach().sum().item(),
        "rewards/chosen": res.chosen_rewards.sum().item(),
        "rewards/rejected": res.rejected_rewards.sum().item(),
        "rewards/accuracies": (margin > 0).float().sum().item(),
        "rewards/margins": margin.sum().item(),
        "logps/chosen": pol[:, 0].detach().sum().item(),
        "logps/rejected": pol[:, 1].detach().sum().item(),
    }


def autocast_ctx(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate(policy, examples, ref_table, cfg: TrainConfig, collate, device) -> dict[str, float]:
    dtype = torch.bfloat16 if cfg.precision == "bf16" else None
    pol = dataset_logps(policy, examples, collate, cfg.micro_batch_size, device, dtype)
    res = get_pairwise_loss(cfg.loss)(pol[:, 0], pol[:, 1], ref_table[:, 0], ref_table[:, 1], beta=cfg.beta,
                                      label_smoothing=cfg.label_smoothing)
    return {k: v / len(examples) for k, v in pair_stats(res, pol).items()}


def check_output_dir(out: Path, overwrite: bool) -> None:
    if (out / "metrics.jsonl").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a run (metrics.jsonl); pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)


def train(cfg: TrainConfig) -> dict:
    cfg.validate()
    out = Path(cfg.output_dir)
    check_output_dir(out, cfg.overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)

    tokenizer = load_tokenizer(cfg.model)
    collate = make_collate(cfg.layout, tokenizer.pad_token_id, cfg.row_tokens)
    train_set, report, _ = prepare_data(cfg.data, tokenizer, cfg, "train")
    eval_set = prepare_data(cfg.eval_data, tokenizer, cfg, "eval")[0] if cfg.eval_data else None

    policy = load_model(cfg.model, device)
    policy.train()
    # πref: the starting policy, frozen (paper §4), unless another model is given. When its
    # log-probs are precomputed, the untouched policy itself serves: no second copy in memory.
    if cfg.ref:
        ref_model = freeze(load_model(cfg.ref, device))
    elif cfg.precompute_ref:
        ref_model = policy
    else:
        ref_model = freeze(copy.deepcopy(policy))
    ac_dtype = torch.bfloat16 if cfg.precision == "bf16" else None

    # Reference log-probs of the eval set (and, with precompute_ref, of the training set) never
    # change: compute each table once, cached on disk across runs, then free the reference model.
    cache_dir = {"off": None, "auto": default_cache_dir()}.get(cfg.ref_cache, cfg.ref_cache)
    model_fp = model_fingerprint(ref_model) if cache_dir is not None else None

    def ref_table(examples, what):
        def compute(model, exs):
            return dataset_logps(model, exs, collate, cfg.micro_batch_size, device, ac_dtype,
                                 progress=f"reference log-probs ({what})" if cfg.progress else None)
        return reference_logps(ref_model, examples, compute, cfg.precision, cache_dir, model_fp, log=log)[0]

    eval_ref = ref_table(eval_set, "eval") if eval_set else None
    train_ref = None
    if cfg.precompute_ref:
        train_ref = ref_table(train_set, "train")
        ref_model = None  # the table replaces the model: its memory is free for training

    loss_fn = get_pairwise_loss(cfg.loss)
    optimizer = build_optimizer(policy.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = warmup_schedule(optimizer, cfg.warmup_steps)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    params = [p for p in policy.parameters() if p.requires_grad]

    (out / "directpo_config.json").write_text(json.dumps({
        "directpo_version": __version__, "command": "train", **asdict(cfg),
        "reference": cfg.ref or f"frozen copy of {cfg.model}", "train_pairs": len(train_set),
        "skipped_rows": dict(report.counts), "total_steps": total_steps}, indent=2))
    log(f"training {total_steps} steps × {cfg.batch_size} pairs (micro-batch {cfg.micro_batch_size}) on {device}, "
        f"{cfg.optimizer} lr {cfg.lr}, β {cfg.beta}, {cfg.precision}")

    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, desc="dpo", unit="step", mininterval=1.0, dynamic_ncols=True)
    metrics_file = open(out / "metrics.jsonl", "w")
    last, last_eval = {}, None

    def run_eval(step: int) -> dict:
        res = {"split": "eval", "step": step, **evaluate(policy, eval_set, eval_ref, cfg, collate, device)}
        metrics_file.write(json.dumps(res) + "\n")
        metrics_file.flush()
        log(f"eval @ step {step}: loss {res['loss']:.4f} reward accuracy {res['rewards/accuracies']:.3f} "
            f"margin {res['rewards/margins']:.4f}")
        return res

    if eval_set is not None:  # step 0: policy = reference, every implicit reward is 0
        last_eval = run_eval(0)
    t_start = time.perf_counter()
    batches = batch_order(len(train_set), cfg.batch_size, cfg.seed)
    for step in range(1, total_steps + 1):
        t0 = time.perf_counter()
        epoch, idx = next(batches)
        # Group similar lengths into the same micro-batch: less padding, same summed gradient.
        idx = sorted(idx, key=lambda i: train_set[i].num_tokens)
        sums, tokens = {}, 0
        for s in range(0, len(idx), cfg.micro_batch_size):
            mb = idx[s:s + cfg.micro_batch_size]
            batch = collate([train_set[i] for i in mb]).to(device)
            tokens += batch.num_tokens
            with autocast_ctx(device, cfg.precision):
                pol = example_logps(policy, batch)
                if train_ref is not None:
                    ref = train_ref[mb].to(device)
                else:
                    with torch.no_grad():
                        ref = example_logps(ref_model, batch)
            res = loss_fn(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=cfg.beta,
                          label_smoothing=cfg.label_smoothing)
            # Σ over the micro-batch / full batch size: accumulated grads equal the full-batch mean's.
            (res.losses.sum() / len(idx)).backward()
            for k, v in pair_stats(res, pol).items():
                sums[k] = sums.get(k, 0.0) + v
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        dt = time.perf_counter() - t0
        last = {"split": "train", "step": step, "epoch": epoch, **{k: v / len(idx) for k, v in sums.items()},
                "lr": lr, "grad_norm": float(grad_norm), "pairs_per_s": len(idx) / dt, "tokens_per_s": tokens / dt,
                "elapsed_s": time.perf_counter() - t_start}
        metrics_file.write(json.dumps(last) + "\n")
        metrics_file.flush()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['rewards/accuracies']:.2f}",
                            pairs_s=f"{last['pairs_per_s']:.1f}")
        elif step % cfg.log_every == 0 or step == total_steps:
            log(f"step {step}/{total_steps} loss {last['loss']:.4f} acc {last['rewards/accuracies']:.2f} "
                f"margin {last['rewards/margins']:.4f} lr {lr:.2e} {last['pairs_per_s']:.1f} pairs/s")
        if eval_set is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps):
            last_eval = run_eval(step)
    if bar is not None:
        bar.close()
    metrics_file.close()

    policy.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log(f"saved model and tokenizer to {out}")
    return {"output_dir": str(out), "train": last, "eval": last_eval}
