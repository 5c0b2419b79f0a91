"""The DPO/SFT training loop, readable top to bottom. One loop for every loss (DPO, IPO,
Plackett–Luce, SFT, Unlikelihood, ...): the loss is looked up by name in `directpo.losses.LOSSES`.

    data -> tokenized examples -> (policy, reference log-probs) -> for each step:
        for each micro-batch: policy log-probs (grad), reference log-probs (precomputed table, or a
                              live frozen model), loss = Σ per-example losses / batch size, backward
        clip, optimizer step, lr schedule, one metrics.jsonl line, maybe evaluate, maybe checkpoint
    -> save the policy (safetensors) and tokenizer in Hugging Face format.

The run directory, checkpoints, resume and the optimizer step are the shared run machinery
(`directpo.training.run`), the same for the reward model and PPO; what a run prepares before its
first step (data, models, reference tables) is `directpo.training.prepare`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch

from ..console import log
from ..data import make_collate
from ..logprobs import example_logps, packed_row_tokens
from ..losses import LossInputs, LossParams, LossSpec, get_loss, sft_loss
from ..memory import bound_heap, keep_heap, release_heap
from ..metrics import add_stats, last_valid, mean_metrics, reward_stats, summary_line
from ..models import (autocast_ctx, enable_activation_checkpointing, load_tokenizer, pick_device, suppress_eos,
                      suppress_token)
from ..vision import save_processor
from .adapters import tokenizer_source
from .alarms import HealthMonitor
from .budget import apply_memory_budget
from .config import TrainConfig
from .distributed import Dist, device_for, init_from_env
from .export import export_model, gather_trainable
from .lora import adapters_disabled, is_lora, save_policy
from .lora_reference import LoraReference
from .offload import make_optimizer
from .optim import lr_schedule
from .prepare import (Sources, check_data, check_sharding, kto_balance, load_policy_and_reference, load_sharded,
                      prepare_data, reference_tables)
from .run import COMPLETE_MARKER, NonFiniteError, Recipe, RunDir, StepDriver, resume, run_steps, settle_precision, \
    setup_torch
from .vlm import run_processor

__all__ = ["COMPLETE_MARKER", "NonFiniteError", "TrainConfig", "batch_order", "micro_batches", "train"]


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
                      simpo_gamma=cfg.simpo_gamma, orpo_lambda=cfg.orpo_lambda,
                      kto_desirable_weight=cfg.kto_desirable_weight, kto_undesirable_weight=cfg.kto_undesirable_weight)


def micro_batch_loss(policy, batch, ref: torch.Tensor | None, cfg: TrainConfig, loss_spec: LossSpec,
                     params: LossParams):
    """Per-example losses of one micro-batch and its metric sums (sums, so micro-batches add up)."""
    out = example_logps(policy, batch, unlikelihood=loss_spec.needs_unlikelihood)
    pol, ul = out if loss_spec.needs_unlikelihood else (out, None)
    if ref is not None and ref.shape[1] > pol.shape[1]:
        # A precomputed table is as wide as the dataset's longest ranking; a micro-batch of shorter
        # rankings has fewer columns, and the table's extra ones are NaN (no response) for its rows.
        ref = ref[:, :pol.shape[1]]
    lengths = batch.response_lengths().to(pol.dtype)
    res = loss_spec.fn(LossInputs(pol, ref, lengths, ul, batch.labels), params)
    losses = res.losses
    if cfg.sft_weight:  # RPO-style NLL term on the best response, for any loss
        losses = losses + cfg.sft_weight * sft_loss(pol[:, 0], lengths[:, 0])
    p = pol.detach()
    stats = {"loss": losses.detach().sum().item(), "logps/chosen": p[:, 0].sum().item(),
             "nll/token": (-p[:, 0] / lengths[:, 0].clamp(min=1)).sum().item()}
    if p.shape[1] > 1 and batch.labels is None:  # (an unpaired example's second response is a mismatched one)
        stats["logps/rejected"] = last_valid(p).sum().item()
    for name, part in (res.components or {}).items():  # a comma-list --loss: each part, unweighted
        stats[f"loss/{name}"] = part.detach().sum().item()
    stats.update({k: float(v) for k, v in (res.stats or {}).items()})  # the loss's own (KTO's kl, BCO's δ)
    if res.rewards is not None:
        stats.update(reward_stats(res.rewards))
    return losses, stats


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
    return mean_metrics(totals, len(examples))


# ----------------------------------------------------------------------------------------------
# TR-DPO's moving reference


@torch.no_grad()
def sync_reference(ref_model, policy, mix: float) -> None:
    """TR-DPO's update, πref ← α·πθ + (1−α)·πref, parameter by parameter (buffers copied)."""
    pol = dict(policy.named_parameters())
    for name, p in ref_model.named_parameters():
        if mix < 1:
            p.mul_(1 - mix).add_(pol[name].detach(), alpha=mix)
        else:  # a hard update: exactly the policy's weights
            p.copy_(pol[name].detach())


# ----------------------------------------------------------------------------------------------
# The loop


@dataclass
class RunningMean:
    """BCO's reward shift δ: the running mean of the batch-mean implicit rewards of every step so
    far (each step's mean over chosen and rejected of its whole batch, all processes), as TRL's
    `RunningMoments` keeps it: a plain mean over all batches seen, not an exponential moving average.
    One difference, for exactness: TRL folds a batch in before using δ on it; here step t uses the
    mean of steps 1..t−1 (0 at step 1, where every reward is 0 anyway). Folding the batch in first
    would need its rewards before its loss, i.e. a second forward pass, or a δ that depends on how
    the batch is split into micro-batches and processes."""

    mean: float = 0.0
    count: int = 0

    def update(self, value: float) -> None:
        self.count += 1
        self.mean += (value - self.mean) / self.count


@dataclass
class Trainer(Recipe):
    """What one DPO/SFT run holds while it trains, and its hooks of the step loop."""

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
    delta: RunningMean | None = None  # BCO's δ (losses that keep a running mean)
    memory_plan: dict | None = None  # --memory-budget: the micro-batch chosen and why (`training.plan`)
    # set by `run_training`: the optimizer, its schedule and step, the batch order, the alarms
    optimizer: object = None
    scheduler: object = None
    driver: StepDriver | None = None
    batches: object = None
    alarms: HealthMonitor | None = None
    lora_ref: LoraReference | None = None  # TR-DPO with LoRA: πref = base + its own adapter
    processor: object = None  # a vision-language model's (saved with the model, in place of the tokenizer)

    @property
    def name(self) -> str:  # the progress bar's label
        return self.cfg.loss

    @property
    def dist(self) -> Dist:
        return self.d

    def ref_logps(self, mb: list[int], batch, cols: slice) -> torch.Tensor | None:
        """Reference log-probs of micro-batch `mb`'s responses `cols` (`batch` holds just those)."""
        if not self.loss_spec.needs_reference:
            return None
        if self.train_ref is not None:
            return self.train_ref[mb][:, cols].to(self.device)
        ref_mode = self.lora_ref.active() if self.lora_ref is not None else adapters_disabled(self.ref_model)
        with torch.no_grad(), ref_mode:
            return example_logps(self.ref_model, batch)

    def batch_loss(self, mb: list[int]):
        """Per-example losses and metric sums of micro-batch `mb` (indices into the train set)."""
        examples, cols = [self.train_set[i] for i in mb], slice(None)
        if self.loss_spec.unpaired:  # KTO: z0 is known (`begin_step`), so only the own completions run here
            examples, cols = [ex.only(0) for ex in examples], slice(0, 1)
        batch = self.collate(examples).to(self.device)
        with autocast_ctx(self.device, self.cfg.precision):
            ref = self.ref_logps(mb, batch, cols)
            losses, stats = micro_batch_loss(self.policy, batch, ref, self.cfg, self.loss_spec, self.loss_params)
        stats["_tokens"] = batch.num_tokens
        return losses, stats

    def begin_step(self, mbs: list[list[int]]) -> None:
        """KTO: this step's reference point z0, over the whole batch (every micro-batch of every
        process), before any of its losses needs it; so the update does not depend on the split."""
        if self.loss_spec.unpaired:
            self.loss_params = replace(self.loss_params, kto_kl=self.reference_point(mbs))

    @torch.no_grad()
    def reference_point(self, mbs: list[list[int]]) -> float:
        """z0 = max(0, mean over the batch of log πθ(y'|x) − log πref(y'|x)), y' the mismatched
        completions (response 1); one forward without gradients, as z0 is detached anyway."""
        total, n = 0.0, 0
        for mb in mbs:
            batch = self.collate([self.train_set[i].only(1) for i in mb]).to(self.device)
            with autocast_ctx(self.device, self.cfg.precision):
                pol = example_logps(self.policy, batch)
                ref = self.ref_logps(mb, batch, slice(1, 2))
            total += (pol.float() - ref.float()).sum().item()
            n += len(mb)
        s = self.d.sum_stats({"kl": total, "n": float(n)})
        return max(0.0, s["kl"] / s["n"])

    def end_step(self, metrics: dict) -> None:
        """BCO: fold this step's batch-mean implicit reward into δ, for the steps after it."""
        if self.delta is not None:
            self.delta.update(metrics["bco/batch_reward"])
            self.loss_params = replace(self.loss_params, bco_delta=self.delta.mean)

    def extra_state(self) -> dict | None:
        """What a checkpoint needs beyond weights, optimizer and RNG to continue exactly."""
        extra = {}
        if self.lora_ref is not None:  # TR-DPO with LoRA: the reference adapter
            extra["reference_adapter"] = self.lora_ref.state_dict()
        elif self.cfg.ref_sync_every:  # TR-DPO: the moved reference
            extra["reference"] = {k: v.detach().cpu().clone() for k, v in self.ref_model.state_dict().items()}
        if self.delta is not None:  # BCO: the running mean δ
            extra["bco_delta"] = {"mean": self.delta.mean, "count": self.delta.count}
        return extra or None

    def restore(self, state: dict) -> None:
        """The inverse of `extra_state`, from a checkpoint's state."""
        extra = state.get("extra") or {}
        if self.lora_ref is not None:  # the reference as it was at the checkpoint
            self.lora_ref.load_state_dict(extra["reference_adapter"])
        elif self.cfg.ref_sync_every:
            self.ref_model.load_state_dict(extra["reference"])
        if self.delta is not None:
            self.delta = RunningMean(**extra["bco_delta"])
            self.loss_params = replace(self.loss_params, bco_delta=self.delta.mean)

    # -- the hooks of the step loop (`run.Recipe`) --------------------------------------------

    def train_step(self, step: int) -> dict | None:
        cfg, d, t0 = self.cfg, self.d, time.perf_counter()
        self.epoch, idx = next(self.batches)
        # Group similar lengths into the same micro-batch: less padding, same summed gradient.
        idx = sorted(idx, key=lambda i: self.train_set[i].num_tokens)
        mbs = micro_batches(d.shard(idx), self.train_set, cfg)
        self.begin_step(mbs)
        sums = self.driver.accumulate(mbs, self.batch_loss, len(idx))
        rows = sorted(self.train_set[i].row for i in idx)
        sums, grad_norm, lr = self.driver.step(sums, lambda: f"at step {step} (batch rows {rows[:16]}"
                                                             f"{' ...' if len(rows) > 16 else ''} of {cfg.data})")
        if grad_norm is None:
            return None
        if cfg.ref_sync_every and step % cfg.ref_sync_every == 0:
            if self.lora_ref is not None:  # the adapters' effective weights, not the shared base
                self.lora_ref.sync(cfg.ref_sync_mix)
            else:
                sync_reference(self.ref_model, self.policy, cfg.ref_sync_mix)
        dt, tokens = time.perf_counter() - t0, sums.pop("_tokens")
        line = {"split": "train", "step": step, "epoch": self.epoch, **mean_metrics(sums, len(idx)), "lr": lr,
                "grad_norm": grad_norm, "pairs_per_s": len(idx) / dt, "tokens_per_s": tokens / dt,
                "elapsed_s": time.perf_counter() - self.t_start}
        self.end_step(line)
        return line

    def progress_text(self, m: dict) -> tuple[str, str]:
        return summary_line(m, short=True), f"{summary_line(m)} lr {m['lr']:.2e} {m['pairs_per_s']:.1f} examples/s"

    def eval_text(self, m: dict) -> str:
        return summary_line(m)

    def evaluate(self, step: int) -> dict:
        # KTO's z0 on held-out data: each micro-batch's own (the training step's belongs to its batch)
        params = replace(self.loss_params, kto_kl=None)
        return {"split": "eval", "step": step, **evaluate_pairs(self.policy, self.eval_set, self.eval_ref, self.cfg,
                                                                 self.collate, self.device, self.loss_spec, params)}

    def save_checkpoint(self, step: int):
        path = self.run.save_checkpoint(step, self.epoch, self.policy, self.optimizer, self.scheduler, self.cfg,
                                        dist=self.d, sharded=self.sharded, extra=self.extra_state())  # every rank
        self.d.barrier()
        return path

    @property
    def evaluates(self) -> bool:
        """Rank 0 evaluates alone, unless the model is sharded (then every rank must take part)."""
        return self.eval_set is not None and (self.d.main or self.sharded)


def setup(cfg: TrainConfig, d, run: RunDir, sources: Sources | None = None) -> Trainer:
    """Everything before the first step, in the claimed run directory: data, models, reference
    tables. `sources`: models and tokenizer given as objects (the Python API) instead of by name."""
    sources = sources or Sources()
    setup_torch(cfg.threads, cfg.seed)
    device = device_for(d, cfg.device) or pick_device(cfg.device)
    settle_precision(run, cfg, device, d)  # --precision auto -> fp32 or bf16, before anything computes
    if cfg.memory_budget is not None and device.type == "cpu":  # before the load: the heap then holds what is counted
        note = bound_heap()
        if note and d.main:
            log(note)
    else:
        keep_heap(device)  # freed activations stay for the next step, not fresh pages each step (`memory.keep_heap`)
    processor = run_processor(cfg, sources)  # a vision-language model's: it tokenizes the images too
    tokenizer = sources.tokenizer or (processor.tokenizer if processor is not None else
                                      load_tokenizer(tokenizer_source(cfg.model),  # (an adapter's: maybe its base's)
                                                     trust_remote_code=cfg.trust_remote_code))
    loss_spec = get_loss(cfg.loss, cfg.loss_weights)
    train_set, report, stats = prepare_data(cfg.data, tokenizer, cfg, "train", processor)
    if d.main:  # (KTO: the checks see each row's own completion, not the mismatched one added for z0)
        run.data_summary = check_data([ex.only(0) for ex in train_set] if loss_spec.unpaired else train_set,
                                      tokenizer, stats, report, cfg.fixed_length)
        if loss_spec.unpaired:
            kto_balance(train_set, cfg)
    eval_set = prepare_data(cfg.eval_data, tokenizer, cfg, "eval", processor)[0] if cfg.eval_data else None

    if "simpo" in cfg.loss.split(",") and cfg.beta < 1:
        log(f"warning: simpo with β {cfg.beta:g}: its reward β·log π/|y| then rarely clears the margin γ "
            f"{cfg.simpo_gamma:g}; SimPO's authors use β ≈ 2 (--beta 2.0)")
    sharded = cfg.fsdp and d.enabled
    if sharded:  # FSDP: every rank reads its own shards of the weights, none the whole model
        check_sharding(cfg, loss_spec)
        policy, ref_model = load_sharded(cfg, d, tokenizer, loss_spec)
    else:
        policy, ref_model = load_policy_and_reference(cfg, tokenizer, device, loss_spec, empty=False, sources=sources,
                                                      vision=processor is not None)
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(policy)
    for m in (policy, ref_model):  # --fixed-length: π' and πref' (before the reference table's fingerprint)
        suppress_eos(m, tokenizer, cfg.fixed_length)
    collate = make_collate(cfg.layout, tokenizer.pad_token_id, packed_row_tokens(cfg.row_tokens, policy, ref_model))
    train_ref, eval_ref = reference_tables(cfg, d, ref_model, train_set, eval_set, collate, device, batch_order)
    if train_ref is not None:
        ref_model = None  # the table replaces the model: its memory is free for training
    trainer = Trainer(cfg, d, run, device, policy, ref_model, train_set, eval_set, train_ref, eval_ref, collate,
                      loss_spec, loss_params(cfg), sharded,
                      tokenizer, dict(report.counts), RunningMean() if loss_spec.running_mean else None)
    trainer.processor = processor
    if cfg.ref_sync_every and ref_model is policy and is_lora(policy):  # one base; πref's own adapter
        trainer.lora_ref = LoraReference(policy)
    if cfg.memory_budget is not None:
        apply_memory_budget(trainer)
    return trainer


def announce(t: Trainer, total_steps: int) -> None:
    """Record the run's settings (directpo_config.json) and say what it is about to do."""
    cfg = t.cfg
    t.run.record_config("sft" if cfg.loss == "sft" else "train", cfg, total_steps=total_steps,
                        reference=(cfg.ref or cfg.model) if t.loss_spec.needs_reference else None,
                        reference_mode=("none" if not t.loss_spec.needs_reference else
                                        f"live, TR-DPO: synced every {cfg.ref_sync_every} steps, α "
                                        f"{cfg.ref_sync_mix:g}" if cfg.ref_sync_every else
                                        "precomputed" if cfg.precompute_ref else "live"),
                        train_examples=len(t.train_set), skipped_rows=t.skipped_rows,
                        trainable_params=sum(p.numel() for p in t.policy.parameters() if p.requires_grad),
                        **({"memory_plan": t.memory_plan} if t.memory_plan else {}))
    per_step = min(cfg.batch_size, len(t.train_set))  # a data set smaller than a batch is the whole batch
    log(f"training {cfg.loss}: {total_steps} steps × {per_step} examples"
        f"{f' (all the data: --batch-size {cfg.batch_size} is larger)' if per_step < cfg.batch_size else ''} "
        f"(micro-batch {cfg.micro_batch_size}) on {t.device}, {cfg.optimizer} lr {cfg.lr}, β {cfg.beta}, "
        f"{cfg.precision}")


def train(cfg: TrainConfig, callbacks=(), sources: Sources | None = None) -> dict:
    """Train as `cfg` says (`directpo train`/`sft`); `callbacks`: `run.Callback`s (on step, on
    evaluation, on checkpoint; they may stop the run); `sources`: models given as objects (the
    Python API). Returns the summary run_complete.json holds."""
    cfg.validate()
    d = init_from_env()
    # The run directory is claimed (checked, locked) before anything is written, and let go
    # however the run ends.
    with RunDir(cfg.output_dir, main=d.main) as run:
        run.prepare(cfg, "sft" if cfg.loss == "sft" else "train")
        d.barrier()
        try:
            return run_training(setup(cfg, d, run, sources), callbacks)
        finally:
            release_heap()  # (a CPU run set glibc's thresholds: `bound_heap`, `keep_heap`)
            if cfg.fixed_length and sources is not None:  # the caller's model objects are theirs again
                for m in (sources.model, sources.ref_model):
                    if m is not None:
                        suppress_token(m, None)


def run_training(t: Trainer, callbacks=()) -> dict:
    """Optimizer, resume, the steps (`run.run_steps`: the one loop of every trainer), then save."""
    cfg, d, run = t.cfg, t.d, t.run
    t.optimizer = make_optimizer(t.policy.parameters(), cfg, t.device)  # (--optimizer-offload: `offload`)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(len(t.train_set) / cfg.batch_size)))
    t.scheduler = lr_schedule(t.optimizer, cfg, total_steps)
    announce(t, total_steps)
    # Resume: weights, optimizer, scheduler and RNG from the checkpoint (the reference above was
    # set up from the *initial* model, as it must be); the data order is a function of the step.
    start_step, state = resume(run, cfg, t.policy, t.optimizer, t.scheduler, shards=d if t.sharded else None)
    if start_step:  # the trainer's own state as it was at the checkpoint (TR-DPO's reference, BCO's δ)
        t.restore(state)
    t.batches = batch_order(len(t.train_set), cfg.batch_size, cfg.seed)
    for _ in range(start_step):
        next(t.batches)
    t.driver = StepDriver(t.policy.parameters(), t.optimizer, t.scheduler, cfg.max_grad_norm, d, t.sharded,
                          cfg.skip_nonfinite, cfg.divergence_factor, hint=f"Lower --lr (now {cfg.lr:g})")
    t.alarms = HealthMonitor(cfg.loss, loss_weights=cfg.loss_weights, vocab_size=t.policy.config.get_text_config().vocab_size)
    if cfg.sft_weight:  # its NLL term moves the loss off the chance value: no_learning has nothing to compare
        t.alarms.chance_loss = None
    done = run_steps(t, start_step, total_steps, callbacks)
    t.driver.check_weights("the final model")
    return finish(t, {"output_dir": str(run.path), "train": done["train"], "eval": done["eval"],
                      "stopped_at": done["stopped_at"], "skipped_nonfinite_steps": t.driver.skipped,
                      "alerts": [a.to_dict() for a in t.alarms.raised]})


def finish(t: Trainer, result: dict) -> dict:
    """Save the policy (adapters, or the whole model) and tokenizer; mark the run complete."""
    if t.sharded and not is_lora(t.policy):
        # whole weights under FSDP: streamed shard file by shard file (every rank gathers, rank 0
        # writes), so no process ever holds the whole model (`export`)
        export_model(t.policy, t.run.path, t.d)
    else:
        # LoRA under FSDP: only the adapters (small) are gathered whole onto rank 0, one at a time;
        # --merge was refused with --fsdp (`prepare.check_sharding`)
        adapters = gather_trainable(t.policy, t.d) if t.sharded else None
        if t.d.main:
            save_policy(t.policy, t.run.path, merge=t.cfg.merge, state_dict=adapters)
    if t.d.main:
        if t.processor is not None:  # (its tokenizer included)
            save_processor(t.processor, t.run.path)
        else:
            t.tokenizer.save_pretrained(t.run.path)
        t.run.complete(result)  # written last: the run finished
        log("saved " + ("the model merged with its LoRA adapters" if is_lora(t.policy) and t.cfg.merge else
                        "LoRA adapters (adapter_model.safetensors)" if is_lora(t.policy) else "model")
            + f" and tokenizer to {t.run.path}")
    t.d.barrier()
    t.d.close()
    return result
