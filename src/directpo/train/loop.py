"""The training loop, readable top to bottom. One loop for every loss (DPO, IPO, Plackett–Luce,
SFT, Unlikelihood, ...): the loss is looked up by name in `directpo.losses.LOSSES`.

    data -> tokenized examples -> (policy, reference log-probs) -> for each step:
        for each micro-batch: policy log-probs (grad), reference log-probs (precomputed table, or a
                              live frozen model), loss = Σ per-example losses / batch size, backward
        clip, optimizer step, lr schedule, one metrics.jsonl line, maybe evaluate
    -> save the policy (safetensors) and tokenizer in Hugging Face format.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import __version__
from ..data import SkipReport, TokenizeStats, load_examples, make_collate, tokenize_examples
from ..data.formats import ranking_to_pairs
from ..logprobs import dataset_logps, example_logps, packed_row_tokens
from ..losses import LossInputs, LossParams, get_loss, sft_loss
from ..metrics import last_valid, ranking_metrics
from ..models import freeze, load_model, load_tokenizer, pick_device
from ..reference import default_cache_dir, model_fingerprint, reference_logps
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import device_for, init_from_env
from .lora import adapters_disabled, apply_lora, save_policy
from .optim import build_optimizer, warmup_schedule


COMPLETE_MARKER = "run_complete.json"


def log(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # one voice in multi-process runs
        print(f"[directpo] {msg}", file=sys.stderr, flush=True)


def prepare_data(spec, tokenizer, cfg: TrainConfig, what: str):
    """Load, validate and tokenize a data file into the shape the loss takes; report what was
    skipped or truncated."""
    loss = get_loss(cfg.loss)
    report, stats = SkipReport(), TokenizeStats()
    examples = load_examples(spec, on_invalid=cfg.on_invalid, split=cfg.data_split, report=report)
    if cfg.loss == "sft":  # Preferred-FT: only the best response is a target
        examples = [type(ex)(ex.prompt, ex.responses[:1], ex.source, ex.row) for ex in examples]
    else:
        single = next((ex for ex in examples if len(ex.responses) < 2), None)
        if single is not None:
            raise ValueError(f"{single.source}, row {single.row}: the '{cfg.loss}' loss needs ≥ 2 responses per "
                             "row; this row has one (a prompt/completion row is for `directpo sft`)")
    if cfg.ranking_to_pairs:
        examples = ranking_to_pairs(examples, cfg.ranking_pairs)
    if loss.pairwise:
        ranked = next((ex for ex in examples if len(ex.responses) != 2), None)
        if ranked is not None:
            raise ValueError(f"{ranked.source}, row {ranked.row}: the '{cfg.loss}' loss takes pairs, this row has "
                             f"{len(ranked.responses)} ranked responses: use --loss plackett_luce, or "
                             "--ranking-to-pairs to expand rankings into pairs")
    tokenized = tokenize_examples(examples, tokenizer, cfg.max_length, cfg.max_prompt_length,
                                  on_invalid=cfg.on_invalid, report=report, stats=stats)
    log(f"{what}: {len(tokenized)} examples from {spec}; {report.summary()}; {stats.summary()}")
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


def micro_batches(idx: list[int], examples, cfg: TrainConfig) -> list[list[int]]:
    """Split a (length-sorted) batch into micro-batches: by count, or greedily by a token budget.
    Any split gives the same summed gradient; the budget only bounds activation memory."""
    if not cfg.micro_batch_tokens:
        return [idx[s:s + cfg.micro_batch_size] for s in range(0, len(idx), cfg.micro_batch_size)]
    out, cur, used = [], [], 0
    for i in idx:
        n = examples[i].num_tokens
        if cur and used + n > cfg.micro_batch_tokens:
            out.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    return out + ([cur] if cur else [])


def autocast_ctx(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def micro_batch_loss(policy, batch, ref: torch.Tensor | None, cfg: TrainConfig, spec, params: LossParams):
    """Per-example losses of one micro-batch and its metric sums (sums, so micro-batches add up)."""
    out = example_logps(policy, batch, unlikelihood=spec.needs_unlikelihood)
    pol, ul = out if spec.needs_unlikelihood else (out, None)
    lengths = batch.response_lengths().to(pol.dtype)
    res = spec.fn(LossInputs(pol, ref, lengths, ul), params)
    losses = res.losses
    if cfg.sft_weight:  # RPO-style NLL term on the best response, for any loss
        losses = losses + cfg.sft_weight * sft_loss(pol[:, 0], lengths[:, 0])
    p = pol.detach()
    stats = {"loss": losses.detach().sum().item(), "logps/chosen": p[:, 0].sum().item(),
             "nll/token": (-p[:, 0] / lengths[:, 0].clamp(min=1)).sum().item()}
    if p.shape[1] > 1:
        stats["logps/rejected"] = last_valid(p).sum().item()
    if res.rewards is not None:
        r = res.rewards
        rank = ranking_metrics(r)
        chosen, rejected = r[:, 0], last_valid(r)
        stats.update({"rewards/chosen": chosen.sum().item(), "rewards/rejected": rejected.sum().item(),
                      "rewards/margins": (chosen - rejected).sum().item(),
                      "rewards/accuracies": rank["accuracy"].sum().item()})
        if r.shape[1] > 2:
            stats.update({"rewards/top1": rank["top1"].sum().item(),
                          "rewards/kendall_tau": rank["kendall_tau"].sum().item()})
    return losses, stats


def add_stats(total: dict, stats: dict) -> None:
    for k, v in stats.items():
        total[k] = total.get(k, 0.0) + v


@torch.no_grad()
def evaluate(policy, examples, ref_table, cfg: TrainConfig, collate, device, spec, params) -> dict[str, float]:
    was_training = policy.training
    policy.eval()
    totals: dict = {}
    order = sorted(range(len(examples)), key=lambda i: examples[i].num_tokens)
    for s in range(0, len(order), cfg.micro_batch_size):
        mb = order[s:s + cfg.micro_batch_size]
        batch = collate([examples[i] for i in mb]).to(device)
        ref = ref_table[mb].to(device) if ref_table is not None else None
        with autocast_ctx(device, cfg.precision):
            add_stats(totals, micro_batch_loss(policy, batch, ref, cfg, spec, params)[1])
    policy.train(was_training)
    return {k: v / len(examples) for k, v in totals.items()}


def _summary(m: dict, short: bool = False) -> str:
    parts = [f"loss {m['loss']:.4f}"]
    if "rewards/accuracies" in m:
        parts.append(f"acc {m['rewards/accuracies']:.2f}")
        if not short:
            parts.append(f"margin {m['rewards/margins']:.4f}")
    if "rewards/kendall_tau" in m:
        parts.append(f"tau {m['rewards/kendall_tau']:.2f}")
    if "rewards/accuracies" not in m:
        parts.append(f"nll/tok {m['nll/token']:.3f}")
    if short and "pairs_per_s" in m:
        parts.append(f"{m['pairs_per_s']:.1f} ex/s")
    return " ".join(parts)


class NonFiniteError(RuntimeError):
    pass


# Settings that may change between a run and its resumption (they do not change the trajectory).
RESUMABLE_CHANGES = {"nproc", "fsdp", "resume", "overwrite", "progress", "log_every", "max_steps", "epochs",
                     "save_every", "keep_last", "eval_every", "eval_data", "threads", "device", "ref_cache",
                     "skip_nonfinite", "output_dir"}


def check_output_dir(out: Path, overwrite: bool, resume: str | None) -> None:
    if (out / "metrics.jsonl").exists() and not (overwrite or resume):
        raise FileExistsError(f"{out} already holds a run (metrics.jsonl); pass --resume to continue it or "
                              "--overwrite to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"cannot write to output directory {out}: {e.strerror or e}") from None


def _open_metrics(path: Path, start_step: int):
    """metrics.jsonl for appending; on resume, drop lines of steps after the checkpoint (redone)."""
    if start_step == 0:
        return open(path, "w")
    keep = [line for line in open(path) if line.strip() and json.loads(line)["step"] <= start_step] \
        if path.exists() else []
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)
    return open(path, "a")


def check_vocab(tokenizer, model, name: str) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(f"{name}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has only "
                         f"{rows} rows: they do not belong together")


def resume_point(cfg: TrainConfig, out: Path):
    """The checkpoint to resume from (None: start fresh), after checking it belongs to this run."""
    if not cfg.resume:
        return None
    path = latest_checkpoint(out) if cfg.resume == "latest" else Path(cfg.resume)
    if path is None:
        log(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from step 0")
        return None
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"--resume {path}: not a checkpoint directory (no state.json)")
    saved = json.loads((path / "state.json").read_text())["config"]
    now = asdict(cfg)
    diff = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if diff:
        raise ValueError(f"--resume {path}: the checkpoint was made with other settings ({'; '.join(diff)}); "
                         "resume with the same settings, or start a new run")
    return path


def _crash_hook_from_env():
    """Tests only: DIRECTPO_TEST_KILL_DURING_SAVE=N kills the process mid-write of checkpoint N."""
    at = os.environ.get("DIRECTPO_TEST_KILL_DURING_SAVE")
    if not at:
        return lambda step: None
    return lambda step: (lambda tmp: os.kill(os.getpid(), signal.SIGKILL)) if step == int(at) else None


def train(cfg: TrainConfig) -> dict:
    cfg.validate()
    out = Path(cfg.output_dir)
    d = init_from_env()
    if d.main:
        check_output_dir(out, cfg.overwrite, cfg.resume)
    d.barrier()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = device_for(d, cfg.device) or pick_device(cfg.device)
    torch.manual_seed(cfg.seed)

    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    train_set, report, _ = prepare_data(cfg.data, tokenizer, cfg, "train")
    eval_set = prepare_data(cfg.eval_data, tokenizer, cfg, "eval")[0] if cfg.eval_data else None

    spec = get_loss(cfg.loss)
    loss_params = LossParams(cfg.beta, cfg.label_smoothing, cfg.unlikelihood_weight)
    sharded = cfg.fsdp and d.enabled
    if sharded:  # checked before loading anything
        if cfg.merge:  # merging adapters into sharded weights would need the whole model on one rank
            raise ValueError("--fsdp does not combine with --merge: save the adapters, merge them afterwards")
        if spec.needs_reference and not cfg.precompute_ref:
            raise ValueError("--fsdp needs precomputed reference log-probs (drop --no-precompute-ref)")
    # FSDP: rank 0 alone reads the weights; the others build the model on the meta device (no
    # storage) and receive their shards from rank 0 in `shard_model`, so no rank > 0 ever holds a
    # whole copy. Rank 0 also computes the reference tables below and broadcasts them.
    empty = sharded and not d.main
    policy = load_model(cfg.model, device, trust_remote_code=cfg.trust_remote_code, empty=empty)
    check_vocab(tokenizer, policy, cfg.model)
    if cfg.lora_r:
        policy = apply_lora(policy, cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules, cfg.lora_dropout)
    policy.train()
    # πref: the starting policy, frozen (paper §4), unless another model is given. When its
    # log-probs are precomputed, the untouched policy itself serves: no second copy in memory.
    same_as_policy = not cfg.ref or cfg.ref == cfg.model
    if not spec.needs_reference:
        ref_model = None
    elif not same_as_policy:
        ref_model = freeze(load_model(cfg.ref, device, trust_remote_code=cfg.trust_remote_code, empty=empty))
        check_vocab(tokenizer, ref_model, cfg.ref)
    elif cfg.precompute_ref or cfg.lora_r:
        ref_model = policy  # with LoRA: the same network, adapters disabled (see `adapters_disabled`)
    else:
        ref_model = freeze(copy.deepcopy(policy))
    collate = make_collate(cfg.layout, tokenizer.pad_token_id, packed_row_tokens(cfg.row_tokens, policy, ref_model))
    ac_dtype = torch.bfloat16 if cfg.precision == "bf16" else None

    # Reference log-probs of the eval set (and, with precompute_ref, of the training set) never
    # change: compute each table once, cached on disk across runs, then free the reference model.
    cache_dir = {"off": None, "auto": default_cache_dir()}.get(cfg.ref_cache, cfg.ref_cache)
    model_fp = (model_fingerprint(ref_model) if d.main and cache_dir is not None and ref_model is not None
                else None)

    def ref_table(examples, what):
        def compute(model, exs):
            with adapters_disabled(model):
                return dataset_logps(model, exs, collate, cfg.micro_batch_size, device, ac_dtype,
                                     progress=f"reference log-probs ({what})" if cfg.progress else None)
        return reference_logps(ref_model, examples, compute, cfg.precision, cache_dir, model_fp, log=log)[0]

    # (Only rank 0 evaluates; with several processes it computes the train table and sends it round.)
    eval_ref = ref_table(eval_set, "eval") if d.main and eval_set and ref_model is not None else None
    if cfg.fsdp and eval_ref is not None or (cfg.fsdp and d.enabled and eval_set and not d.main):
        eval_ref = d.broadcast(eval_ref, shape=(len(eval_set), 0))  # sharded eval runs on every rank
    train_ref = None
    if cfg.precompute_ref and ref_model is not None:
        train_ref = ref_table(train_set, "train") if d.main else None
        train_ref = d.broadcast(train_ref, shape=(len(train_set), 0))
        ref_model = None  # the table replaces the model: its memory is free for training

    if sharded:  # after the reference tables: rank 0 computed them from the whole starting model
        policy = d.shard_model(policy)
    optimizer = build_optimizer(policy.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = warmup_schedule(optimizer, cfg.warmup_steps)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    params = [p for p in policy.parameters() if p.requires_grad]

    (out / "directpo_config.json").write_text(json.dumps({
        "directpo_version": __version__, "command": "sft" if cfg.loss == "sft" else "train", **asdict(cfg),
        "reference": (None if not spec.needs_reference else cfg.ref or cfg.model),
        "reference_mode": ("none" if not spec.needs_reference else "precomputed" if cfg.precompute_ref else "live"),
        "train_examples": len(train_set), "skipped_rows": dict(report.counts), "total_steps": total_steps},
        indent=2))
    log(f"training {cfg.loss}: {total_steps} steps × {cfg.batch_size} examples (micro-batch "
        f"{cfg.micro_batch_size}) on {device}, {cfg.optimizer} lr {cfg.lr}, β {cfg.beta}, {cfg.precision}")

    # Resume: weights, optimizer, scheduler and RNG from the checkpoint (the reference above was
    # set up from the *initial* model, as it must be); the data order is a function of the step.
    start_step, ckpt = 0, resume_point(cfg, out)
    if ckpt is not None:
        start_step = load_checkpoint(ckpt, policy, optimizer, scheduler, shards=d if sharded else None)["step"]
        log(f"resumed from {ckpt} at step {start_step}")
    batches = batch_order(len(train_set), cfg.batch_size, cfg.seed)
    for _ in range(start_step):
        next(batches)
    crash_hook = _crash_hook_from_env()
    run_config = asdict(cfg)
    skipped_steps = 0

    bar = None
    if cfg.progress and d.main:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=start_step, desc=cfg.loss, unit="step", mininterval=1.0,
                   dynamic_ncols=True)
    metrics_file = _open_metrics(out / "metrics.jsonl", start_step) if d.main else open(os.devnull, "w")
    last, last_eval = {}, None

    def run_eval(step: int) -> dict:
        res = {"split": "eval", "step": step,
               **evaluate(policy, eval_set, eval_ref, cfg, collate, device, spec, loss_params)}
        metrics_file.write(json.dumps(res) + "\n")
        metrics_file.flush()
        log(f"eval @ step {step}: " + _summary(res))
        return res

    # Evaluation: rank 0 alone, unless the model is sharded (then every rank must take part).
    evaluates = d.main or sharded
    if evaluates and eval_set is not None and start_step == 0:  # the starting point (for DPO every implicit reward is 0)
        last_eval = run_eval(0)
    t_start = time.perf_counter()
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.perf_counter()
        epoch, idx = next(batches)
        # Group similar lengths into the same micro-batch: less padding, same summed gradient.
        idx = sorted(idx, key=lambda i: train_set[i].num_tokens)
        sums, tokens = {}, 0
        local = d.shard(idx)  # this process's share of the global batch
        for mb in micro_batches(local, train_set, cfg):
            batch = collate([train_set[i] for i in mb]).to(device)
            tokens += batch.num_tokens
            with autocast_ctx(device, cfg.precision):
                if not spec.needs_reference:
                    ref = None
                elif train_ref is not None:
                    ref = train_ref[mb].to(device)
                else:
                    with torch.no_grad(), adapters_disabled(ref_model):
                        ref = example_logps(ref_model, batch)
                losses, stats = micro_batch_loss(policy, batch, ref, cfg, spec, loss_params)
            # Σ over the micro-batch / full batch size: accumulated grads equal the full-batch mean's.
            (losses.sum() / len(idx)).backward()
            add_stats(sums, stats)
        d.all_reduce_grads(params)
        sums = d.sum_stats({**sums, "_tokens": tokens})
        tokens = sums.pop("_tokens")
        if sharded:
            grad_norm = d.clip_grad_norm(params, cfg.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        lr = scheduler.get_last_lr()[0]
        if not (math.isfinite(sums["loss"]) and math.isfinite(float(grad_norm))):
            # Never let NaN/inf into the weights: stop (the last checkpoint stays as it was) or skip.
            what = f"non-finite {'loss' if not math.isfinite(sums['loss']) else 'gradient norm'} at step {step}"
            rows = sorted(train_set[i].row for i in idx)
            optimizer.zero_grad(set_to_none=True)
            if not cfg.skip_nonfinite:
                metrics_file.close()
                raise NonFiniteError(f"{what} (batch rows {rows[:16]}{' ...' if len(rows) > 16 else ''} of "
                                     f"{cfg.data}); stopped without updating the weights. Pass --skip-nonfinite "
                                     "to skip such steps, or lower the learning rate")
            skipped_steps += 1
            log(f"{what}: step skipped ({skipped_steps} so far), batch rows {rows[:16]}")
            scheduler.step()
            continue
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
            bar.set_postfix_str(_summary(last, short=True))
        elif step % cfg.log_every == 0 or step == total_steps:
            log(f"step {step}/{total_steps} {_summary(last)} lr {lr:.2e} {last['pairs_per_s']:.1f} examples/s")
        if evaluates and eval_set is not None and ((cfg.eval_every and step % cfg.eval_every == 0)
                                                or step == total_steps):
            last_eval = run_eval(step)
        if cfg.save_every and step % cfg.save_every == 0:
            state = d.gather_state(policy, optimizer) if sharded else None  # every rank takes part
            if d.main:
                save_checkpoint(out, step, epoch, policy, optimizer, scheduler, run_config, cfg.keep_last,
                                state=state, _crash_hook=crash_hook(step))
            d.barrier()
    if bar is not None:
        bar.close()
    metrics_file.close()

    result = {"output_dir": str(out), "train": last, "eval": last_eval, "skipped_nonfinite_steps": skipped_steps}
    full = d.full_state_dict(policy) if sharded else None
    if d.main:
        save_policy(policy, out, merge=cfg.merge, state_dict=full)
        tokenizer.save_pretrained(out)
        (out / COMPLETE_MARKER).write_text(json.dumps(result))  # written last: the run finished
        log(f"saved model and tokenizer to {out}")
    d.barrier()
    d.close()
    return result
