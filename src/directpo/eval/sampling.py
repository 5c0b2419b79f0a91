"""`directpo sample`: completions from a model for a prompt file, batched, seeded.

Prompts come from a prompt file or any preference file `directpo train` reads
(`directpo.data.prompts.load_prompts`), are tokenized exactly as in training
(`directpo.data.prompts.encode_prompt`), left-padded, and sampled with
our own loop with a KV cache (`sample_batch`): plain ancestral sampling from softmax(logits / T),
optionally nucleus-filtered, and nothing else (no default top-k, no repetition penalty, whatever
a checkpoint's generation config says): at temperature 1 and top-p 1, samples come from π itself,
which the KL estimator of `directpo eval` relies on. Completion ids keep the EOS the
model generated (it is part of y); texts are decoded without it.

Reproducibility: batch b is sampled from its own generator seeded `seed + b` (the global RNG is
untouched), so the same settings give the same samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..console import log
from ..data.formats import SkipReport, write_jsonl
from ..data.prompts import PromptItem, encode_prompt, load_prompts
from ..errors import UserValueError
from ..models import load_model, load_tokenizer, pick_device, unwrap_peft


def check_sampling_args(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise UserValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserValueError(f"temperature must be ≥ 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserValueError(f"top_p must be in (0, 1], got {top_p}")


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None):
    """One token per row from softmax(logits / T), optionally nucleus-filtered; argmax at T = 0.

    Inverse-CDF sampling: one uniform u per row, the first token whose cumulative probability
    exceeds u·total (float64 sums). It draws B random numbers instead of B × vocabulary, and is
    exact: token i is picked with probability p_i."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:  # keep the smallest set of most likely tokens whose mass reaches top_p
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # the first token is never dropped
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64) * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    return tok.clamp(max=probs.shape[-1] - 1)  # u·total == total (rounding): the last token


def _cache_kw(model) -> str:
    """The name of the KV-cache argument: `cache` in recent transformers, `past_key_values` before."""
    import inspect

    base = unwrap_peft(model)
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _forward(model, **kw):
    try:
        return model(**kw, logits_to_keep=1)  # only the last position's logits are needed
    except TypeError:  # models without logits_to_keep
        return model(**kw)


@torch.no_grad()
def sample_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 temperature: float, top_p: float, eos_id: int | None, pad_id: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestral sampling with a KV cache from left-padded prompts: (B, ≤ max_new_tokens) new ids,
    `pad_id` after a row's EOS. Position ids count real tokens only, as in training."""
    from transformers import DynamicCache

    B = input_ids.shape[0]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache, cache_kw = DynamicCache(), _cache_kw(model)
    out = _forward(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=True, **{cache_kw: cache})
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    pos = position_ids[:, -1:]
    new = []
    for _ in range(max_new_tokens):
        tok = next_token(out.logits[:, -1], temperature, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        new.append(tok)
        if eos_id is not None:
            done |= tok == eos_id
        if bool(done.all()) or len(new) == max_new_tokens:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        pos = pos + 1
        out = _forward(model, input_ids=tok[:, None], attention_mask=attention_mask, position_ids=pos,
                       use_cache=True, **{cache_kw: cache})
    return torch.stack(new, dim=1)


@torch.no_grad()
def generate_completions(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int = 128,
                         temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                         progress: str | None = None) -> list[list[int]]:
    """One sampled completion per entry of `prompt_ids` (repeat a prompt for several samples).

    Returns completion ids, cut after the first EOS (which is kept).
    """
    check_sampling_args(max_new_tokens, temperature, top_p)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out: list[list[int]] = []
    starts = list(range(0, len(prompt_ids), batch_size))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(prompt_ids), desc=progress, unit="sample", mininterval=1.0, dynamic_ncols=True)
    for b, s in enumerate(starts):
        chunk = prompt_ids[s:s + batch_size]
        P = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), P), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), P), dtype=torch.long)
        for i, p in enumerate(chunk):  # left padding: every row's last prompt token at P - 1
            input_ids[i, P - len(p):] = torch.tensor(p)
            mask[i, P - len(p):] = 1
        gen = torch.Generator(device=device).manual_seed(seed + b)  # batch b: seed + b, whatever came before
        seqs = sample_batch(model, input_ids.to(device), mask.to(device), max_new_tokens, temperature, top_p, eos,
                            pad, gen)
        for row in seqs.tolist():
            if eos is not None and eos in row:
                row = row[:row.index(eos) + 1]
            out.append(row)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    model.train(was_training)
    return out


def decode(tokenizer, ids: list[int]) -> str:
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)


@dataclass
class Samples:
    """n completions for each prompt, prompt-major: sample j of prompt i at i * n + j."""

    items: list[PromptItem]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    n: int

    def prompt_of(self, k: int) -> PromptItem:
        return self.items[k // self.n]

    @property
    def prompts(self) -> list:
        return [self.items[k // self.n].prompt for k in range(len(self.texts))]

    def lengths(self, eos_id: int | None) -> list[int]:
        """Generated tokens per sample, the EOS not counted."""
        return [len(c) - (1 if c and c[-1] == eos_id else 0) for c in self.completion_ids]


def draw_samples(model, tokenizer, items: list[PromptItem], n: int = 1, max_new_tokens: int = 128,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                 max_prompt_length: int | None = None, progress: str | None = None) -> Samples:
    if n < 1:
        raise UserValueError(f"n must be ≥ 1, got {n}")
    encoded = [encode_prompt(it.prompt, tokenizer, max_prompt_length) for it in items]
    prompt_ids = [p for p in encoded for _ in range(n)]
    comps = generate_completions(model, tokenizer, prompt_ids, max_new_tokens, temperature, top_p, seed, batch_size,
                                 progress)
    return Samples(items, prompt_ids, comps, [decode(tokenizer, c) for c in comps], n)


def sample(model: str, prompts: str, out: str, n: int = 1, max_new_tokens: int = 128, temperature: float = 1.0,
           top_p: float = 1.0, seed: int = 0, batch_size: int = 16, max_prompt_length: int | None = None,
           device: str | None = None, on_invalid: str = "error", split: str | None = None,
           progress: bool = True) -> dict:
    """Write one JSON line per sample: prompt_index, index (sample j of that prompt), prompt, completion."""
    report = SkipReport()
    items = load_prompts(prompts, on_invalid, split, report)
    tokenizer = load_tokenizer(model)
    policy = load_model(model, pick_device(device))
    s = draw_samples(policy, tokenizer, items, n, max_new_tokens, temperature, top_p, seed, batch_size,
                     max_prompt_length, progress="sampling" if progress else None)
    lengths = s.lengths(tokenizer.eos_token_id)
    write_jsonl(({"prompt_index": k // n, "index": k % n, "prompt": s.prompt_of(k).prompt, "completion": text,
                  "completion_tokens": lengths[k], "finished": bool(s.completion_ids[k])
                  and s.completion_ids[k][-1] == tokenizer.eos_token_id}
                 for k, text in enumerate(s.texts)), out)
    log(f"sampled {len(s.texts)} completions ({n} per prompt, {len(items)} prompts; "
          f"{report.summary()}) -> {out}")
    return {"prompts": len(items), "samples": len(s.texts), "skipped": report.total,
            "length_mean": sum(lengths) / len(lengths), "out": out}
