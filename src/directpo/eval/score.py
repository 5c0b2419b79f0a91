"""`directpo score`: read a language model out as a reward model (paper §5).

For every pair: the summed response log-probs under the model, and with a reference model the
implicit rewards r̂ = β·(log π − log πref) of chosen and rejected, in input order.
"""
from __future__ import annotations

import torch

from ..console import log
from ..data import SkipReport, TokenizeStats, load_examples, make_collate, tokenize_examples
from ..data.formats import write_jsonl
from ..logprobs import dataset_logps, packed_row_tokens
from ..losses import implicit_reward
from ..models import check_vocab, load_model_or_adapter, load_tokenizer, pick_device
from ..precision import resolve_precision


def score(model: str, data: str, out: str, ref: str | None = None, beta: float = 0.1, max_length: int | None = 512,
          max_prompt_length: int | None = None, batch_size: int = 8, on_invalid: str = "error",
          device: str | None = None, precision: str = "fp32", split: str | None = None,
          layout: str = "packed") -> dict:
    dev = pick_device(device)
    precision = resolve_precision(precision, dev)[0]
    tokenizer = load_tokenizer(model)
    report, stats = SkipReport(), TokenizeStats()
    examples = load_examples(data, on_invalid=on_invalid, split=split, report=report)
    tokenized = tokenize_examples(examples, tokenizer, max_length, max_prompt_length, on_invalid, report, stats)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def logps(m, what):
        collate = make_collate(layout, tokenizer.pad_token_id, packed_row_tokens(None, m))
        return dataset_logps(m, tokenized, collate, batch_size, dev, dtype, progress=what)

    policy = load_model_or_adapter(model, dev)
    check_vocab(tokenizer, policy, model)
    pol = logps(policy, "scoring")
    ref_lp = None
    if ref:
        policy.to("meta")  # its weights freed; the vocabulary check below needs only its shapes
        ref_model = load_model_or_adapter(ref, dev)
        check_vocab(tokenizer, policy, model, ref_model, ref)
        ref_lp = logps(ref_model, "scoring (reference)")
    def lines():
        for i, ex in enumerate(tokenized):
            line = {"row": ex.row, "chosen_logp": pol[i, 0].item(), "rejected_logp": pol[i, 1].item(),
                    "chosen_tokens": len(ex.response_ids[0]), "rejected_tokens": len(ex.response_ids[1])}
            if ref_lp is not None:
                line.update(ref_chosen_logp=ref_lp[i, 0].item(), ref_rejected_logp=ref_lp[i, 1].item(),
                            chosen_reward=implicit_reward(pol[i, 0], ref_lp[i, 0], beta).item(),
                            rejected_reward=implicit_reward(pol[i, 1], ref_lp[i, 1], beta).item())
            yield line

    write_jsonl(lines(), out)  # whole or absent: an interrupted run leaves an existing file as it was
    if ref_lp is not None:
        margin = implicit_reward(pol[:, 0], ref_lp[:, 0], beta) - implicit_reward(pol[:, 1], ref_lp[:, 1], beta)
        what = "implicit-reward"
    else:
        margin = pol[:, 0] - pol[:, 1]
        what = "log-prob"
    result = {"pairs": len(tokenized), "skipped": report.total, f"{what.replace('-', '_')}_accuracy":
              (margin > 0).float().mean().item(), "mean_margin": margin.mean().item(), "out": out}
    log(f"scored {len(tokenized)} pairs ({report.summary()}): {what} accuracy "
          f"{(margin > 0).float().mean().item():.4f}, mean margin {margin.mean().item():.4f} -> {out}")
    return result
