"""Reward-model inference: read a Bradley–Terry reward model's scalar head, and `RewardModel`, the
scorer that loads a `directpo rm` output directory (training lives in `directpo.rlhf.reward_model`).

The reward model is the language model with a scalar linear head read at the last response token
(`AutoModelForSequenceClassification(num_labels=1)` built from the causal-LM checkpoint: the
backbone is the LM's, the head is new). Sequences are collated right-padded (`collate_padded`: one
row per prompt + response), so the last real token of row r is at `attention_mask[r].sum() − 1`;
we read the score there ourselves rather than through HF's "last token ≠ pad" rule, which breaks
when pad = EOS and responses end in EOS.

Training normalises the rewards so that E[r] = 0 over the training responses: the mean is stored
as `reward_offset` (`OFFSET_KEY`) in the saved config (the head has no bias to fold it into) and
`RewardModel` subtracts it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..data import TokenizedExample
from ..data.collate import collate_padded
from ..data.formats import Example
from ..errors import UserValueError
from ..models import (autocast_ctx, load_tokenizer, pick_device, quiet_transformers, remote_code_error,
                      safetensors_only_error)
from ..narrow import narrow_last_layer

OFFSET_KEY = "reward_offset"


def load_reward_backbone(name_or_dir: str, pad_token_id: int, device="cpu", dtype: torch.dtype = torch.float32,
                         trust_remote_code: bool = False, trained_head: bool = False):
    """LM checkpoint (or a saved reward model) -> sequence classifier with one output. trained_head:
    the checkpoint must hold the head (a reward model to score with, not an LM to train one from)."""
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    # safetensors only, as `directpo.models.load_model` (and with its explanation): pickled checkpoints can run code.
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name_or_dir, num_labels=1, dtype=dtype, pad_token_id=pad_token_id, use_safetensors=True,
            trust_remote_code=trust_remote_code, output_loading_info=True)
    except OSError as e:
        raise (safetensors_only_error(name_or_dir, e) or e) from e
    except ValueError as e:  # its own code, refused: one line naming --trust-remote-code and the code
        explained = remote_code_error(name_or_dir, e)
        if explained is None:
            raise
        raise explained from None
    # A head missing from the checkpoint is drawn at random, silently (transformers' warning is muted):
    # every reward would be noise, and best-of-n, eval and PPO would report on it as a success.
    new = [k for k in info.get("missing_keys", ()) if k.split(".")[0] in ("score", "classifier")]
    if trained_head and new:
        raise UserValueError(f"{name_or_dir}: no reward head in its weights ({', '.join(new)}): it is a language "
                             "model, not a reward model; train one on preference pairs with `directpo rm` and give its "
                             "output folder as --reward-model, or score with --reward-fn")
    model.config.pad_token_id = pad_token_id
    return model.to(device)


def _head(model) -> nn.Linear:
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return head
    raise UserValueError(f"{type(model).__name__}: no linear 'score' head to read a reward from")


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(R,) scalar head on the hidden state of each right-padded row's last real token, fp32."""
    last = attention_mask.sum(1) - 1
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    with narrow_last_layer(model.base_model, model, input_ids, rows * input_ids.shape[1] + last):  # one row each
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    h = hidden[rows, last]
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


class RewardModel:
    """A saved reward model as a scorer: `rm(prompts, completions) -> list[float]` (normalised).

    Texts are tokenized as in training (prompt as at inference, EOS appended, the run's max_length
    and max_prompt_length); prompts may be text or lists of messages.
    """

    def __init__(self, path: str, device: str | None = None, batch_size: int = 16, precision: str = "fp32"):
        self.path, self.batch_size, self.precision = str(path), batch_size, precision
        self.device = pick_device(device)
        self.tokenizer = load_tokenizer(self.path)
        self.model = load_reward_backbone(self.path, self.tokenizer.pad_token_id, self.device, trained_head=True)
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
    batched = True  # takes lists (see directpo.eval.scorers)
