"""The DPO/SFT training loop, readable top to bottom. One loop for every loss (DPO, IPO,
Plackett–Luce, SFT, Unlikelihood, ...): the loss is looked up by name in `directpo.losses.LOSSES`.

    data -> tokenized examples -> (policy, reference log-probs) -> for each step:
        for each micro-batch: policy log-probs (grad), reference log-probs (precomputed table, or a
                              live frozen model), loss = Σ per-example losses / batch size, backward
        clip, optimizer step, lr schedule, one metrics.jsonl line, maybe evaluate, maybe checkpoint
    -> save the policy (safetensors) and tokenizer in Hugging Face format.

The run directory, checkpoints, resume and the optimizer step are the shared run machinery
(`directpo.train.run`), the same for the reward model and PPO.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch

from ..console import log
from ..data import SkipReport, TokenizeStats, load_examples, make_collate, tokenize_examples
from ..data.checks import red_flags, summarize, summary_paragraph
from ..data.formats import ranking_to_pairs
from ..logprobs import dataset_logps, example_logps, packed_row_tokens
from ..losses import LossInputs, LossParams, LossSpec, get_loss, sft_loss
from ..metrics import last_valid, ranking_metrics
from ..models import autocast_ctx, check_vocab, freeze, load_model, load_tokenizer, pick_device
from ..reference import default_cache_dir, model_fingerprint, reference_logps
from .alarms import HealthMonitor
from .config import TrainConfig
from .distributed import Dist, device_for, init_from_env
from .lora import adapters_disabled, apply_lora, save_policy
from .optim import build_optimizer, warmup_schedule
from .run import (COMPLETE_MARKER, Interrupted, NonFiniteError, Progress, RunDir, StepDriver, StopRequest,
                  resume, setup_torch)

__all__ = ["COMPLETE_MARKER", "NonFiniteError", "TrainConfig", "batch_order", "micro_batches", "train"]


# ----------------------------------------------------------------------------------------------
# Data


def prepare_data(data_path: str, tokenizer, cfg: TrainConfig, what: str):
    """Load, validate and tokenize a data file into the shape the loss takes; report what was
    skipped or truncated."""
    loss = get_loss(cfg.loss, cfg.loss_weights)
    report, stats = SkipReport(), TokenizeStats()
    examples = load_examples(data_path, on_invalid=cfg.on_invalid, split=cfg.data_split, report=report)
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
    log(f"{what}: {len(tokenized)} examples from {data_path}; {report.summary()}; {stats.summary()}")
    return tokenized, report, stats


def check_data(examples, tokenizer, stats, report) -> str:
    """The cheap checks of `directpo inspect` before step 1: one paragraph in the log (and the model
    card), a warning line for each red flag (length bias, duplicates, pairs truncated away, ...)."""
    summary = summarize(examples, tokenizer, stats, report)
    flags = red_flags(summary)
    paragraph = summary_paragraph(summary, flags)
    log(f"data: {paragraph}")
    for flag in flags:
        log(f"warning: {flag} (directpo inspect --data ... writes the full report)")
    return paragraph


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


# ----------------------------------------------------------------------------------------------
# The loss of a micro-batch, and evaluation


def loss_params(cfg: TrainConfig) -> LossParams:
    return LossParams(beta=cfg.beta, label_smoothing=cfg.label_smoothing, unlikelihood_weight=cfg.unlikelihood_weight,
                      simpo_gamma=cfg.simpo_gamma, orpo_lambda=cfg.orpo_lambda)


def micro_batch_loss(policy, batch, ref: torch.Tensor | None, cfg: TrainConfig, loss_spec: LossSpec,
                     params: LossParams):
    """Per-example losses of one micro-batch and its metric sums (sums, so micro-batches add up)."""
    out = example_logps(policy, batch, unlikelihood=loss_spec.needs_unlikelihood)
    pol, ul = out if loss_spec.needs_unlikelihood else (out, None)
    lengths = batch.response_lengths().to(pol.dtype)
    res = loss_spec.fn(LossInputs(pol, ref, lengths, ul), params)
    losses = res.losses
    if cfg.sft_weight:  # RPO-style NLL term on the best response, for any loss
        losses = losses + cfg.sft_weight * sft_loss(pol[:, 0], lengths[:, 0])
    p = pol.detach()
    stats = {"loss": losses.detach().sum().item(), "logps/chosen": p[:, 0].sum().item(),
             "nll/token": (-p[:, 0] / lengths[:, 0].clamp(min=1)).sum().item()}
    if p.shape[1] > 1:
        stats["logps/rejected"] = last_valid(p).sum().item()
    for name, part in (res.components or {}).items():  # a comma-list --loss: each part, unweighted
        stats[f"loss/{name}"] = part.detach().sum().item()
    if res.rewards is not None:
        stats.update(reward_stats(res.rewards))
    return losses, stats


def reward_stats(r: torch.Tensor) -> dict[str, float]:
    """Sums over a micro-batch of the implicit-reward metrics (chosen, rejected, margin, accuracy,
    and for rankings top-1 and Kendall's τ)."""
    rank = ranking_metrics(r)
    chosen, rejected = r[:, 0], last_valid(r)
    stats = {"rewards/chosen": chosen.sum().item(), "rewards/rejected": rejected.sum().item(),
             "rewards/margins": (chosen - rejected).sum().item(),
             "rewards/accuracies": rank["accuracy"].sum().item()}
    if r.shape[1] > 2:
        stats.update({"rewards/top1": rank["top1"].sum().item(),
                      "rewards/kendall_tau": rank["kendall_tau"].sum().item()})
    return stats


def add_stats(total: dict, stats: dict) -> None:
    for k, v in stats.items():
        total[k] = total.get(k, 0.0) + v


@torch.no_grad()
def evaluate_pairs(policy, examples, ref_table, cfg: TrainConfig, collate, device, loss_spec, params) -> dict:
    """Mean loss and reward metrics of the policy over held-out examples."""
    was_training = policy.training
    policy.eval()
    totals: dict = {}
    order = sorted(range(len(examples)), key=lambda i: examples[i].num_tokens)
    for s in range(0, len(order), cfg.micro_batch_size):
        mb = order[s:s + cfg.micro_batch_size]
        batch = collate([examples[i] for i in mb]).to(device)
        ref = ref_table[mb].to(device) if ref_table is not None else None
        with autocast_ctx(device, cfg.precision):
            add_stats(totals, micro_batch_loss(policy, batch, ref, cfg, loss_spec, params)[1])
    policy.train(was_training)
    return {k: v / len(examples) for k, v in totals.items()}


def summary_line(m: dict, short: bool = False) -> str:
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


# ----------------------------------------------------------------------------------------------
# Models: the policy, πref, and the reference log-prob tables


def load_policy_and_reference(cfg: TrainConfig, tokenizer, device, loss_spec: LossSpec, empty: bool):
    """(policy, πref model or None). πref: the starting policy, frozen (paper §4), unless another
    model is given. When its log-probs are precomputed, the untouched policy itself serves (no
    second copy); with LoRA, the same network with adapters disabled."""
    policy = load_model(cfg.model, device, trust_remote_code=cfg.trust_remote_code, empty=empty)
    check_vocab(tokenizer, policy, cfg.model)
    if cfg.lora_r:
        policy = apply_lora(policy, cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules, cfg.lora_dropout)
    policy.train()
    if not loss_spec.needs_reference:
        return policy, None
    if cfg.ref and cfg.ref != cfg.model:
        ref_model = freeze(load_model(cfg.ref, device, trust_remote_code=cfg.trust_remote_code, empty=empty))
        check_vocab(tokenizer, policy, cfg.model, ref=ref_model, ref_name=cfg.ref)
        if cfg.ref_sync_every:
            check_same_shapes(policy, ref_model, cfg.model, cfg.ref)
        return policy, ref_model
    if (cfg.precompute_ref or cfg.lora_r) and not cfg.ref_sync_every:
        return policy, policy
    return policy, freeze(copy.deepcopy(policy))


def check_same_shapes(policy, ref_model, policy_name: str, ref_name: str) -> None:
    """TR-DPO mixes the weights of policy and reference: they must be the same architecture."""
    a = {k: v.shape for k, v in policy.state_dict().items()}
    b = {k: v.shape for k, v in ref_model.state_dict().items()}
    if a != b:
        raise ValueError(f"--ref-sync-every: {ref_name} and {policy_name} are not the same architecture (their "
                         "weights cannot be mixed); leave --ref out (πref = the starting policy)")


@torch.no_grad()
def sync_reference(ref_model, policy, mix: float) -> None:
    """TR-DPO's update, πref ← α·πθ + (1−α)·πref, parameter by parameter (buffers copied)."""
    pol = dict(policy.named_parameters())
    for name, p in ref_model.named_parameters():
        if mix < 1:
            p.mul_(1 - mix).add_(pol[name].detach(), alpha=mix)
        else:  # a hard update: exactly the policy's weights
            p.copy_(pol[name].detach())


def check_sharding(cfg: TrainConfig, loss_spec: LossSpec) -> None:
    """What FSDP cannot do, refused before anything is loaded."""
    if cfg.merge:  # merging adapters into sharded weights would need the whole model on one rank
        raise ValueError("--fsdp does not combine with --merge: save the adapters, merge them afterwards")
    if loss_spec.needs_reference and not cfg.precompute_ref:
        raise ValueError("--fsdp needs precomputed reference log-probs (drop --no-precompute-ref)")


def reference_tables(cfg: TrainConfig, d: Dist, ref_model, train_set, eval_set, collate, device):
    """(train table or None, eval table or None): reference log-probs that never change, computed
    once (cached on disk across runs) by rank 0 and sent round. The eval table always exists when
    there is an eval set and a reference; the train table only with precompute_ref."""
    if ref_model is None:
        return None, None
    cache_dir = {"off": None, "auto": default_cache_dir()}.get(cfg.ref_cache, cfg.ref_cache)
    model_fp = model_fingerprint(ref_model) if d.main and cache_dir is not None else None
    ac_dtype = torch.bfloat16 if cfg.precision == "bf16" else None

    def table(examples, what):
        def compute(model, exs):
            with adapters_disabled(model):
                return dataset_logps(model, exs, collate, cfg.micro_batch_size, device, ac_dtype,
                                     progress=f"reference log-probs ({what})" if cfg.progress else None)
        return reference_logps(ref_model, examples, compute, cfg.precision, cache_dir, model_fp, log=log)[0]

    eval_ref = table(eval_set, "eval") if d.main and eval_set else None
    if cfg.fsdp and d.enabled and eval_set:  # sharded evaluation runs on every rank
        eval_ref = d.broadcast(eval_ref, shape=(len(eval_set), 0))
    train_ref = None
    if cfg.precompute_ref and not cfg.ref_sync_every:  # TR-DPO's reference moves: no fixed table
        train_ref = d.broadcast(table(train_set, "train") if d.main else None, shape=(len(train_set), 0))
    return train_ref, eval_ref


# ----------------------------------------------------------------------------------------------
# The loop


@dataclass
class Trainer:
    """What one DPO/SFT run holds while it trains."""

    cfg: TrainConfig
    d: Dist
    run: RunDir
    device: torch.device
    policy: torch.nn.Module
    ref_model: torch.nn.Module | None  # live reference (None when precomputed or not needed)
    train_set: list
    eval_set: list | None
    train_ref: torch.Tensor | None
    eval_ref: torch.Tensor | None
    collate: object
    loss_spec: LossSpec
    loss_params: LossParams
    sharded: bool
    tokenizer: object
    skipped_rows: dict

    def batch_loss(self, mb: list[int]):
        """Per-example losses and metric sums of micro-batch `mb` (indices into the train set)."""
        batch = self.collate([self.train_set[i] for i in mb]).to(self.device)
        with autocast_ctx(self.device, self.cfg.precision):
            if not self.loss_spec.needs_reference:
                ref = None
            elif self.train_ref is not None:
                ref = self.train_ref[mb].to(self.device)
            else:
                with torch.no_grad(), adapters_disabled(self.ref_model):
                    ref = example_logps(self.ref_model, batch)
            losses, stats = micro_batch_loss(self.policy, batch, ref, self.cfg, self.loss_spec, self.loss_params)
        stats["_tokens"] = batch.num_tokens
        return losses, stats

    def evaluate(self, step: int, metrics, alarms: HealthMonitor) -> dict:
        res = {"split": "eval", "step": step, **evaluate_pairs(self.policy, self.eval_set, self.eval_ref, self.cfg,
                                                                self.collate, self.device, self.loss_spec,
                                                                self.loss_params)}
        alerts = alarms.annotate(res)  # health alarms ride on the metrics line and get a console line each
        metrics.write(res)
        log(f"eval @ step {step}: " + summary_line(res))
        for a in alerts:
            log(str(a))
        return res

    @property
    def evaluates(self) -> bool:
        """Rank 0 evaluates alone, unless the model is sharded (then every rank must take part)."""
        return self.eval_set is not None and (self.d.main or self.sharded)


def setup(cfg: TrainConfig) -> Trainer:
    """Everything before the first step: processes, run directory, data, models, reference tables."""
    cfg.validate()
    d = init_from_env()
    run = RunDir(cfg.output_dir, main=d.main)
    run.prepare(cfg.overwrite, cfg.resume)
    d.barrier()
    setup_torch(cfg.threads, cfg.seed)
    device = device_for(d, cfg.device) or pick_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    train_set, report, stats = prepare_data(cfg.data, tokenizer, cfg, "train")
    if d.main:
        run.data_summary = check_data(train_set, tokenizer, stats, report)
    eval_set = prepare_data(cfg.eval_data, tokenizer, cfg, "eval")[0] if cfg.eval_data else None

    loss_spec = get_loss(cfg.loss, cfg.loss_weights)
    if "simpo" in cfg.loss.split(",") and cfg.beta < 1:
        log(f"warning: simpo with β {cfg.beta:g}: its reward β·log π/|y| then rarely clears the margin γ "
            f"{cfg.simpo_gamma:g}; SimPO's authors use β ≈ 2 (--beta 2.0)")
    sharded = cfg.fsdp and d.enabled
    if sharded:
        check_sharding(cfg, loss_spec)
    # FSDP: rank 0 alone reads the weights; the others build the model on the meta device and
    # receive their shards from rank 0 (`shard_model`), so no rank > 0 ever holds a whole copy.
    policy, ref_model = load_policy_and_reference(cfg, tokenizer, device, loss_spec, empty=sharded and not d.main)
    collate = make_collate(cfg.layout, tokenizer.pad_token_id, packed_row_tokens(cfg.row_tokens, policy, ref_model))
    train_ref, eval_ref = reference_tables(cfg, d, ref_model, train_set, eval_set, collate, device)
    if train_ref is not None:
        ref_model = None  # the table replaces the model: its memory is free for training
    if sharded:  # after the reference tables: rank 0 computed them from the whole starting model
        policy = d.shard_model(policy)
    trainer = Trainer(cfg, d, run, device, policy, ref_model, train_set, eval_set, train_ref, eval_ref, collate,
                      loss_spec, loss_params(cfg), sharded,
                      tokenizer, dict(report.counts))
    return trainer


def train(cfg: TrainConfig) -> dict:
    t = setup(cfg)
    cfg, d, run = t.cfg, t.d, t.run
    optimizer = build_optimizer(t.policy.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = warmup_schedule(optimizer, cfg.warmup_steps)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(len(t.train_set) / cfg.batch_size)))
    run.record_config("sft" if cfg.loss == "sft" else "train", cfg, total_steps=total_steps,
                      reference=(cfg.ref or cfg.model) if t.loss_spec.needs_reference else None,
                      reference_mode=("none" if not t.loss_spec.needs_reference else
                                      f"live, TR-DPO: synced every {cfg.ref_sync_every} steps, α {cfg.ref_sync_mix:g}"
                                      if cfg.ref_sync_every else "precomputed" if cfg.precompute_ref else "live"),
                      train_examples=len(t.train_set), skipped_rows=t.skipped_rows)
    per_step = min(cfg.batch_size, len(t.train_set))  # a data set smaller than a batch is the whole batch
    log(f"training {cfg.loss}: {total_steps} steps × {per_step} examples"
        f"{f' (all the data: --batch-size {cfg.batch_size} is larger)' if per_step < cfg.batch_size else ''} "
        f"(micro-batch {cfg.micro_batch_size}) on {t.device}, {cfg.optimizer} lr {cfg.lr}, β {cfg.beta}, "
        f"{cfg.precision}")
    # Resume: weights, optimizer, scheduler and RNG from the checkpoint (the reference above was
    # set up from the *initial* model, as it must be); the data order is a function of the step.
    start_step, state = resume(run, cfg, t.policy, optimizer, scheduler, shards=d if t.sharded else None)
    if cfg.ref_sync_every and start_step:  # TR-DPO: the reference as it was at the checkpoint
        t.ref_model.load_state_dict(state["extra"]["reference"])
    batches = batch_order(len(t.train_set), cfg.batch_size, cfg.seed)
    for _ in range(start_step):
        next(batches)
    driver = StepDriver(t.policy.parameters(), optimizer, scheduler, cfg.max_grad_norm, d, t.sharded,
                        cfg.skip_nonfinite, cfg.divergence_factor, hint=f"Lower --lr (now {cfg.lr:g})")
    progress = Progress(cfg.progress and d.main, total_steps, start_step, cfg.loss, cfg.log_every)
    metrics = run.metrics(start_step)
    last, last_eval, alarms = {}, None, HealthMonitor(cfg.loss)
    if t.evaluates and start_step == 0:  # the starting point (for DPO every implicit reward is 0)
        last_eval = t.evaluate(0, metrics, alarms)
    t_start = time.perf_counter()
    with StopRequest() as stop, metrics, progress:
        for step in range(start_step + 1, total_steps + 1):
            t0 = time.perf_counter()
            epoch, idx = next(batches)
            # Group similar lengths into the same micro-batch: less padding, same summed gradient.
            idx = sorted(idx, key=lambda i: t.train_set[i].num_tokens)
            sums = driver.accumulate(micro_batches(d.shard(idx), t.train_set, cfg), t.batch_loss, len(idx))
            rows = sorted(t.train_set[i].row for i in idx)
            sums, grad_norm, lr = driver.step(sums, lambda: f"at step {step} (batch rows {rows[:16]}"
                                                            f"{' ...' if len(rows) > 16 else ''} of {cfg.data})")
            if grad_norm is None:
                continue
            if cfg.ref_sync_every and step % cfg.ref_sync_every == 0:
                sync_reference(t.ref_model, t.policy, cfg.ref_sync_mix)
            dt, tokens = time.perf_counter() - t0, sums.pop("_tokens")
            last = {"split": "train", "step": step, "epoch": epoch, **{k: v / len(idx) for k, v in sums.items()},
                    "lr": lr, "grad_norm": grad_norm, "pairs_per_s": len(idx) / dt, "tokens_per_s": tokens / dt,
                    "elapsed_s": time.perf_counter() - t_start}
            alerts = alarms.annotate(last)
            metrics.write(last)
            progress.update(step, summary_line(last, short=True),
                            f"{summary_line(last)} lr {lr:.2e} {last['pairs_per_s']:.1f} examples/s")
            for a in alerts:
                log(str(a))
            if t.evaluates and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps):
                last_eval = t.evaluate(step, metrics, alarms)
            stopping = stop.requested(d)
            if cfg.save_every and step % cfg.save_every == 0 or stopping:
                save_checkpoint(t, step, epoch, optimizer, scheduler)
            if stopping:
                raise Interrupted(f"interrupted at step {step}/{total_steps}; checkpoint saved in "
                                  f"{run.path / 'checkpoints'}: resume with --resume")
    return finish(t, {"output_dir": str(run.path), "train": last, "eval": last_eval,
                      "skipped_nonfinite_steps": driver.skipped, "alerts": [a.to_dict() for a in alarms.raised]})


def save_checkpoint(t: Trainer, step: int, epoch: int, optimizer, scheduler) -> None:
    state = t.d.gather_state(t.policy, optimizer) if t.sharded else None  # every rank takes part
    extra = {"reference": {k: v.detach().cpu().clone() for k, v in t.ref_model.state_dict().items()}} \
        if t.cfg.ref_sync_every else None  # TR-DPO: the moved reference is part of the state
    t.run.save_checkpoint(step, epoch, t.policy, optimizer, scheduler, t.cfg, state=state, extra=extra)
    t.d.barrier()


def finish(t: Trainer, result: dict) -> dict:
    """Save the policy (adapters, or the whole model) and tokenizer; mark the run complete."""
    full = t.d.full_state_dict(t.policy) if t.sharded else None
    if t.d.main:
        save_policy(t.policy, t.run.path, merge=t.cfg.merge, state_dict=full)
        t.tokenizer.save_pretrained(t.run.path)
        t.run.complete(result)  # written last: the run finished
        log(f"saved model and tokenizer to {t.run.path}")
    t.d.barrier()
    t.d.close()
    return result
