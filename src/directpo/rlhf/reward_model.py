"""`directpo rm`: training a Bradley–Terry reward model (paper §3, eq. 2). Scoring with it
(`RewardModel`, `load_reward_backbone`, `pair_rewards`, ...) lives in `directpo.eval.reward_model`.

The reward model is the language model with a scalar linear head read at the last response token
(`AutoModelForSequenceClassification(num_labels=1)` built from the causal-LM checkpoint: the
backbone is the LM's, the head is new). Pairs go through the core's data pipeline
(`load_examples` -> `tokenize_examples`: same prompt masking, EOS appended, truncation) and are
collated right-padded (`collate_padded`: one row per prompt + response), and the reward is read at
each row's last real token (`directpo.eval.reward_model.sequence_rewards`).

Loss: −log σ(r(x, yw) − r(x, yl)) (`directpo.losses.bradley_terry_loss`), same optimizer, warm-up
and batch order as `directpo train`. After training the rewards are normalised so that
E[r] = 0 over the training responses (chosen and rejected): the mean is stored as
`reward_offset` in the saved config (the head has no bias to fold it into) and `RewardModel`
subtracts it.
"""
from __future__ import annotations

import json
import math
import time

import torch

from ..console import log
from ..diskio import staging_dir, tensor_bytes, warn_if_short
from ..data import SkipReport, TokenizeStats, load_examples, tokenize_examples
from ..data.collate import collate_padded
from ..data.formats import DataError, ranking_to_pairs
from ..eval.reward_model import OFFSET_KEY, dataset_rewards, load_reward_backbone, pair_rewards
from ..losses import bradley_terry_loss
from ..memory import keep_heap, release_heap
from ..models import autocast_ctx, load_tokenizer, pick_device
from ..training.loop import batch_order
from ..training.alarms import HealthMonitor
from ..training.optim import build_optimizer, lr_schedule
from ..training.run import CONFIG_FILE, Recipe, RunDir, StepDriver, resume, run_steps, setup_torch
from .config import RewardModelConfig


def _pairs(data_path: str, tokenizer, cfg: RewardModelConfig, what: str):
    report, stats = SkipReport(), TokenizeStats()
    examples = load_examples(data_path, on_invalid=cfg.on_invalid, split=cfg.data_split, report=report)
    single = next((ex for ex in examples if len(ex.responses) < 2), None)
    if single is not None:
        raise DataError(single.source, single.row, None, "a reward model needs ≥ 2 ranked responses per row; this row "
                                                         "has one")
    # Bradley–Terry is pairwise: a ranking of K > 2 gives its (better, worse) pairs.
    examples = ranking_to_pairs(examples, cfg.ranking_pairs)
    tokenized = tokenize_examples(examples, tokenizer, cfg.max_length, cfg.max_prompt_length,
                                  on_invalid=cfg.on_invalid, report=report, stats=stats)
    log(f"{what}: {len(tokenized)} pairs from {data_path}; {report.summary()}; {stats.summary()}")
    return tokenized, report


def _stats(r: torch.Tensor, losses: torch.Tensor) -> dict:
    r = r.detach()
    return {"loss": losses.detach().sum().item(), "accuracy": (r[:, 0] > r[:, 1]).float().sum().item(),
            "rewards/chosen": r[:, 0].sum().item(), "rewards/rejected": r[:, 1].sum().item(),
            "rewards/margins": (r[:, 0] - r[:, 1]).sum().item()}


def evaluate_rm(model, examples, pad_id, cfg: RewardModelConfig, device) -> dict:
    r = dataset_rewards(model, examples, pad_id, cfg.micro_batch_size, device, cfg.precision)
    return {k: v / len(examples) for k, v in _stats(r, bradley_terry_loss(r[:, 0], r[:, 1])).items()}


def _summary(m: dict) -> str:
    return f"loss {m['loss']:.4f} acc {m['accuracy']:.2f}"


def train_reward_model(cfg: RewardModelConfig, callbacks=()) -> dict:
    """Fit r_φ by Bradley–Terry on cfg.data; save it (safetensors), normalised to E[r] = 0."""
    cfg.validate()
    with RunDir(cfg.output_dir) as run:  # claimed (checked, locked) before anything is written
        run.prepare(cfg, "rm")
        try:
            return _train_reward_model(cfg, run, callbacks)
        finally:
            release_heap()  # (`keep_heap` at setup, on the CPU)


def _train_reward_model(cfg: RewardModelConfig, run: RunDir, callbacks=()) -> dict:
    setup_torch(cfg.threads, cfg.seed)
    device = pick_device(cfg.device)
    keep_heap(device)  # on the CPU, freed activations stay for the next step (`memory.keep_heap`)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    train_set, report = _pairs(cfg.data, tokenizer, cfg, "train")
    eval_set = _pairs(cfg.eval_data, tokenizer, cfg, "eval")[0] if cfg.eval_data else None

    model = load_reward_backbone(cfg.model, tokenizer.pad_token_id, device, trust_remote_code=cfg.trust_remote_code)
    model.train()
    optimizer = build_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(len(train_set) / cfg.batch_size)))
    scheduler = lr_schedule(optimizer, cfg, total_steps)
    settings = run.record_config("rm", cfg, train_pairs=len(train_set), skipped_rows=dict(report.counts),
                                 total_steps=total_steps)
    log(f"training reward model: {total_steps} steps × {cfg.batch_size} pairs (micro-batch {cfg.micro_batch_size}) "
        f"on {device}, {cfg.optimizer} lr {cfg.lr}, {cfg.precision}")
    start_step, _ = resume(run, cfg, model, optimizer, scheduler)
    recipe = RewardModelRecipe(cfg, run, model, tokenizer.pad_token_id, device, train_set, eval_set, optimizer,
                               scheduler, start_step)
    done = run_steps(recipe, start_step, total_steps, callbacks)
    recipe.driver.check_weights("the final reward model")
    return save_reward_model(model, tokenizer, train_set, cfg, run, settings,
                             {"output_dir": str(run.path), "train": done["train"], "eval": done["eval"],
                              "stopped_at": done["stopped_at"]})


class RewardModelRecipe(Recipe):
    """The reward model's hooks of the step loop (`training.run.run_steps`): a Bradley–Terry step."""

    name = "rm"

    def __init__(self, cfg: RewardModelConfig, run: RunDir, model, pad: int, device, train_set, eval_set, optimizer,
                 scheduler, start_step: int):
        self.cfg, self.run, self.model, self.pad, self.device = cfg, run, model, pad, device
        self.train_set, self.eval_set, self.optimizer, self.scheduler = train_set, eval_set, optimizer, scheduler
        self.batches = batch_order(len(train_set), cfg.batch_size, cfg.seed)
        for _ in range(start_step):  # the data order is a function of the step
            next(self.batches)
        self.driver = StepDriver(model.parameters(), optimizer, scheduler, cfg.max_grad_norm,
                                 skip_nonfinite=cfg.skip_nonfinite, divergence_factor=cfg.divergence_factor,
                                 hint=f"Lower --lr (now {cfg.lr:g})")
        self.alarms = HealthMonitor("rm")

    def pair_loss(self, mb: list[int]):
        batch = collate_padded([self.train_set[i] for i in mb], self.pad).to(self.device)
        with autocast_ctx(self.device, self.cfg.precision):
            r = pair_rewards(self.model, batch)
            losses = bradley_terry_loss(r[:, 0], r[:, 1])
        return losses, _stats(r, losses)

    def train_step(self, step: int) -> dict | None:
        t0, mb_size = time.perf_counter(), self.cfg.micro_batch_size
        self.epoch, idx = next(self.batches)
        idx = sorted(idx, key=lambda i: self.train_set[i].num_tokens)
        mbs = [idx[s:s + mb_size] for s in range(0, len(idx), mb_size)]
        sums, grad_norm, lr = self.driver.step(self.driver.accumulate(mbs, self.pair_loss, len(idx)),
                                               lambda: f"at step {step}")
        if grad_norm is None:
            return None
        return {"split": "train", "step": step, "epoch": self.epoch, **{k: v / len(idx) for k, v in sums.items()},
                "lr": lr, "grad_norm": grad_norm, "pairs_per_s": len(idx) / (time.perf_counter() - t0),
                "elapsed_s": time.perf_counter() - self.t_start}

    def progress_text(self, m: dict) -> tuple[str, str]:
        return _summary(m), f"{_summary(m)} lr {m['lr']:.2e}"

    def eval_text(self, m: dict) -> str:
        return _summary(m)

    @property
    def evaluates(self) -> bool:
        return self.eval_set is not None

    def evaluate(self, step: int) -> dict:
        return {"split": "eval", "step": step, **evaluate_rm(self.model, self.eval_set, self.pad, self.cfg,
                                                             self.device)}

    def save_checkpoint(self, step: int):
        return self.run.save_checkpoint(step, self.epoch, self.model, self.optimizer, self.scheduler, self.cfg)


def save_reward_model(model, tokenizer, train_set, cfg: RewardModelConfig, run: RunDir, settings: dict,
                      result: dict) -> dict:
    """Normalise (E[r] = 0 over the training responses: paper §3, following Ziegler et al.), save
    the model and tokenizer, mark the run complete."""
    device = next(model.parameters()).device
    r = dataset_rewards(model, train_set, tokenizer.pad_token_id, cfg.micro_batch_size, device, cfg.precision)
    offset = float(r[~torch.isnan(r)].mean())
    model.config.update({OFFSET_KEY: offset})
    needed = tensor_bytes(model.state_dict())
    warn_if_short(run.path, needed, f"the reward model ({run.path})")
    with staging_dir(run.path, needed, f"; the reward model was not written (the files in {run.path} are as they "
                                       "were)") as tmp:  # written whole, or not at all
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    (run.path / CONFIG_FILE).write_text(json.dumps({**settings, OFFSET_KEY: offset}, indent=2))
    result = {**result, OFFSET_KEY: offset}
    run.complete(result)
    log(f"saved reward model (offset {offset:+.4f} subtracted: E[r] = 0 on the training responses) to {run.path}")
    return result
