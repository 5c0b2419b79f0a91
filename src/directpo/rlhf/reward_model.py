"""`directpo rm`: a Bradley–Terry reward model (paper §3, eq. 2), and `RewardModel` to score with it.

The reward model is the language model with a scalar linear head read at the last response token
(`AutoModelForSequenceClassification(num_labels=1)` built from the causal-LM checkpoint: the
backbone is the LM's, the head is new). Pairs go through the core's data pipeline
(`load_examples` -> `tokenize_examples`: same prompt masking, EOS appended, truncation) and are
collated right-padded (`collate_padded`: one row per prompt + response), so the last real token
of row r is at `attention_mask[r].sum() − 1`; we read the score there ourselves rather than through
HF's "last token ≠ pad" rule, which breaks when pad = EOS and responses end in EOS.

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
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..data import SkipReport, TokenizedExample, TokenizeStats, load_examples, tokenize_examples
from ..data.collate import collate_padded
from ..data.formats import Example, ranking_to_pairs
from ..losses import bradley_terry_loss
from ..models import load_tokenizer, pick_device, quiet_transformers
from ..train.config import TrainConfig
from ..train.loop import COMPLETE_MARKER, autocast_ctx, batch_order, log
from ..train.optim import build_optimizer, warmup_schedule

OFFSET_KEY = "reward_offset"


def load_reward_backbone(name_or_dir: str, pad_token_id: int, device="cpu", dtype: torch.dtype = torch.float32,
                         trust_remote_code: bool = False):
    """LM checkpoint (or a saved reward model) -> sequence classifier with one output."""
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    # safetensors only, as `directpo.models.load_model`: pickled checkpoints can run code.
    model = AutoModelForSequenceClassification.from_pretrained(name_or_dir, num_labels=1, dtype=dtype,
                                                               pad_token_id=pad_token_id, use_safetensors=True,
                                                               trust_remote_code=trust_remote_code)
    model.config.pad_token_id = pad_token_id
    return model.to(device)


def _head(model) -> nn.Linear:
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return head
    raise ValueError(f"{type(model).__name__}: no linear 'score' head to read a reward from")


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(R,) scalar head on the hidden state of each right-padded row's last real token, fp32."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    last = attention_mask.sum(1) - 1
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return _head(model)(h).squeeze(-1).float()


def pair_rewards(model, batch) -> torch.Tensor:
    """(B, K) rewards of every response of a `collate_padded` batch (row r = sequence r)."""
    r = sequence_rewards(model, batch.input_ids, batch.attention_mask)
    idx = batch.seq_index
    return r[idx.clamp(min=0)].masked_fill(idx < 0, float("nan"))


@torch.no_grad()
def dataset_rewards(model, examples: list[TokenizedExample], pad_id: int, batch_size: int, device,
                    precision: str = "fp32") -> torch.Tensor:
    """(len(examples), K) rewards in input order (length-sorted batches)."""
    was = model.training
    model.eval()
    K = max(len(ex.response_ids) for ex in examples)
    out = torch.full((len(examples), K), float("nan"))
    order = sorted(range(len(examples)), key=lambda i: examples[i].num_tokens)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = collate_padded([examples[i] for i in idx], pad_id).to(device)
        with autocast_ctx(torch.device(device), precision):
            r = pair_rewards(model, batch)
        out[idx, :r.shape[1]] = r.float().cpu()
    model.train(was)
    return out


def _pairs(spec, tokenizer, cfg: TrainConfig, what: str):
    report, stats = SkipReport(), TokenizeStats()
    examples = load_examples(spec, on_invalid=cfg.on_invalid, split=cfg.data_split, report=report)
    single = next((ex for ex in examples if len(ex.responses) < 2), None)
    if single is not None:
        raise ValueError(f"{single.source}, row {single.row}: a reward model needs ≥ 2 ranked responses per row; "
                         "this row has one")
    # Bradley–Terry is pairwise: a ranking of K > 2 gives its (better, worse) pairs.
    examples = ranking_to_pairs(examples, cfg.ranking_pairs)
    tokenized = tokenize_examples(examples, tokenizer, cfg.max_length, cfg.max_prompt_length,
                                  on_invalid=cfg.on_invalid, report=report, stats=stats)
    log(f"{what}: {len(tokenized)} pairs from {spec}; {report.summary()}; {stats.summary()}")
    return tokenized, report


def _stats(r: torch.Tensor, losses: torch.Tensor) -> dict:
    r = r.detach()
    return {"loss": losses.detach().sum().item(), "accuracy": (r[:, 0] > r[:, 1]).float().sum().item(),
            "rewards/chosen": r[:, 0].sum().item(), "rewards/rejected": r[:, 1].sum().item(),
            "rewards/margins": (r[:, 0] - r[:, 1]).sum().item()}


def evaluate_rm(model, examples, pad_id, cfg: TrainConfig, device) -> dict:
    r = dataset_rewards(model, examples, pad_id, cfg.micro_batch_size, device, cfg.precision)
    return {k: v / len(examples) for k, v in _stats(r, bradley_terry_loss(r[:, 0], r[:, 1])).items()}


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    if (out / "metrics.jsonl").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a run (metrics.jsonl); pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)


def train_reward_model(cfg: TrainConfig) -> dict:
    """Fit r_φ by Bradley–Terry on cfg.data; save it (safetensors), normalised to E[r] = 0."""
    cfg.validate()
    unsupported = [f"--{k.replace('_', '-')}" for k in ("resume", "save_every", "lora_r") if getattr(cfg, k, None)]
    if unsupported:
        raise ValueError(f"directpo rm does not support {', '.join(unsupported)} (checkpoints and LoRA are "
                         "`directpo train` features)")
    out = Path(cfg.output_dir)
    prepare_output_dir(out, cfg.overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=getattr(cfg, "trust_remote_code", False))
    pad = tokenizer.pad_token_id
    train_set, report = _pairs(cfg.data, tokenizer, cfg, "train")
    eval_set = _pairs(cfg.eval_data, tokenizer, cfg, "eval")[0] if cfg.eval_data else None

    model = load_reward_backbone(cfg.model, pad, device, trust_remote_code=getattr(cfg, "trust_remote_code", False))
    model.train()
    optimizer = build_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = warmup_schedule(optimizer, cfg.warmup_steps)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(len(train_set) / cfg.batch_size)))
    params = [p for p in model.parameters() if p.requires_grad]
    settings = {"directpo_version": __version__, "command": "rm", **asdict(cfg), "train_pairs": len(train_set),
                "skipped_rows": dict(report.counts), "total_steps": total_steps}
    (out / "directpo_config.json").write_text(json.dumps(settings, indent=2))
    log(f"training reward model: {total_steps} steps × {cfg.batch_size} pairs (micro-batch {cfg.micro_batch_size}) "
        f"on {device}, {cfg.optimizer} lr {cfg.lr}, {cfg.precision}")

    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, desc="rm", unit="step", mininterval=1.0, dynamic_ncols=True)
    metrics = open(out / "metrics.jsonl", "w")

    def write(line: dict) -> None:
        metrics.write(json.dumps(line) + "\n")
        metrics.flush()

    last, last_eval = {}, None
    if eval_set is not None:
        last_eval = {"split": "eval", "step": 0, **evaluate_rm(model, eval_set, pad, cfg, device)}
        write(last_eval)
    t_start = time.perf_counter()
    batches = batch_order(len(train_set), cfg.batch_size, cfg.seed)
    for step in range(1, total_steps + 1):
        t0 = time.perf_counter()
        epoch, idx = next(batches)
        idx = sorted(idx, key=lambda i: train_set[i].num_tokens)
        sums: dict = {}
        for s in range(0, len(idx), cfg.micro_batch_size):
            batch = collate_padded([train_set[i] for i in idx[s:s + cfg.micro_batch_size]], pad).to(device)
            with autocast_ctx(device, cfg.precision):
                r = pair_rewards(model, batch)
                losses = bradley_terry_loss(r[:, 0], r[:, 1])
            (losses.sum() / len(idx)).backward()
            for k, v in _stats(r, losses).items():
                sums[k] = sums.get(k, 0.0) + v
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        last = {"split": "train", "step": step, "epoch": epoch, **{k: v / len(idx) for k, v in sums.items()},
                "lr": lr, "grad_norm": float(grad_norm), "pairs_per_s": len(idx) / (time.perf_counter() - t0),
                "elapsed_s": time.perf_counter() - t_start}
        write(last)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"loss {last['loss']:.4f} acc {last['accuracy']:.2f}")
        elif step % cfg.log_every == 0 or step == total_steps:
            log(f"step {step}/{total_steps} loss {last['loss']:.4f} acc {last['accuracy']:.2f} lr {lr:.2e}")
        if eval_set is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps):
            last_eval = {"split": "eval", "step": step, **evaluate_rm(model, eval_set, pad, cfg, device)}
            write(last_eval)
            log(f"eval @ step {step}: loss {last_eval['loss']:.4f} acc {last_eval['accuracy']:.3f}")
    if bar is not None:
        bar.close()
    metrics.close()

    # Normalise: E[r] = 0 over the training responses (paper §3, following Ziegler et al.).
    r = dataset_rewards(model, train_set, pad, cfg.micro_batch_size, device, cfg.precision)
    offset = float(r[~torch.isnan(r)].mean())
    model.config.update({OFFSET_KEY: offset})
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    settings[OFFSET_KEY] = offset
    (out / "directpo_config.json").write_text(json.dumps(settings, indent=2))
    result = {"output_dir": str(out), "train": last, "eval": last_eval, OFFSET_KEY: offset}
    (out / COMPLETE_MARKER).write_text(json.dumps(result))
    log(f"saved reward model (offset {offset:+.4f} subtracted: E[r] = 0 on the training responses) to {out}")
    return result


class RewardModel:
    """A saved reward model as a scorer: `rm(prompts, completions) -> list[float]` (normalised).

    Texts are tokenized as in training (prompt as at inference, EOS appended, the run's max_length
    and max_prompt_length); prompts may be text or lists of messages.
    """

    def __init__(self, path: str, device: str | None = None, batch_size: int = 16, precision: str = "fp32"):
        self.path, self.batch_size, self.precision = str(path), batch_size, precision
        self.device = pick_device(device)
        self.tokenizer = load_tokenizer(self.path)
        self.model = load_reward_backbone(self.path, self.tokenizer.pad_token_id, self.device)
        self.model.eval()
        self.model.requires_grad_(False)
        self.offset = float(getattr(self.model.config, OFFSET_KEY, 0.0) or 0.0)
        settings_file = Path(self.path) / "directpo_config.json"
        settings = json.loads(settings_file.read_text()) if settings_file.exists() else {}
        self.max_length = settings.get("max_length")
        self.max_prompt_length = settings.get("max_prompt_length")

    def tokenize(self, prompt, completion: str, index: int = 0) -> TokenizedExample:
        from ..data.tokenize import tokenize_example

        response = [{"role": "assistant", "content": completion}] if isinstance(prompt, list) else completion
        return tokenize_example(Example(prompt, [response], f"reward model {self.path} input", index),
                                self.tokenizer, self.max_length, self.max_prompt_length)

    def __call__(self, prompts, completions) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        examples = [self.tokenize(p, c, i) for i, (p, c) in enumerate(zip(prompts, completions))]
        r = dataset_rewards(self.model, examples, self.tokenizer.pad_token_id, self.batch_size, self.device,
                            self.precision)[:, 0]
        return (r - self.offset).tolist()

    score = __call__
    batched = True  # takes lists (see directpo.rlhf.rewards)
