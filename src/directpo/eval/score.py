"""`directpo score`: read a language model out as a reward model (paper §5).

For every pair: the summed response log-probs under the model, and with a reference model the
implicit rewards r̂ = β·(log π − log πref) of chosen and rejected, in input order.

Rows with images (issue #30) are read with a vision-language model as training reads them: its
processor renders each prompt with its images (`tokenize_vision_examples`), so the log-probs are
the ones training's reference table holds for the same rows. A text-only model would drop the
image placeholders and score the text alone: refused.
"""
from __future__ import annotations

import torch

from ..console import log
from ..data import SkipReport, TokenizeStats, load_examples, make_collate, tokenize_examples
from ..data.formats import DataError, write_jsonl
from ..errors import UserValueError
from ..logprobs import dataset_logps, packed_row_tokens
from ..losses import implicit_reward
from ..metrics import last_valid
from ..models import check_vocab, is_adapter_dir, load_model_or_adapter, load_tokenizer, pick_device, suppress_eos
from ..precision import resolve_precision


def score(model: str, data: str, out: str, ref: str | None = None, beta: float = 0.1, max_length: int | None = 512,
          max_prompt_length: int | None = None, batch_size: int = 8, on_invalid: str = "error",
          device: str | None = None, precision: str = "fp32", split: str | None = None,
          layout: str = "packed", fixed_length: bool = False) -> dict:
    """`fixed_length`: the responses are fixed-length completions, scored as π' (and πref') gives them."""
    dev = pick_device(device)
    precision = resolve_precision(precision, dev)[0]
    report, stats = SkipReport(), TokenizeStats()
    examples = pairs_only(load_examples(data, on_invalid=on_invalid, split=split, report=report), on_invalid, report)
    processor = vision_processor(model, ref, data, examples)
    if processor is not None and fixed_length:
        raise UserValueError("--fixed-length reads plain text rows; a vision-language model's rows are conversations")
    if processor is not None:
        from ..data.vision_tokenize import tokenize_vision_examples
        from ..vision import load_vision_model

        tokenizer = processor.tokenizer
        tokenized, stats = tokenize_vision_examples(examples, processor, max_length, max_prompt_length,
                                                    on_invalid=on_invalid, skipped=report)
        load = load_vision_model
    else:
        tokenizer = load_tokenizer(model)
        tokenized = tokenize_examples(examples, tokenizer, max_length, max_prompt_length, on_invalid, report, stats,
                                      fixed_length)
        load = load_model_or_adapter
    dtype = torch.bfloat16 if precision == "bf16" else None

    def logps(m, what):
        collate = make_collate(layout, tokenizer.pad_token_id, packed_row_tokens(None, m))
        return dataset_logps(m, tokenized, collate, batch_size, dev, dtype, progress=what)

    policy = load(model, dev)
    check_vocab(tokenizer, policy, model)
    suppress_eos(policy, tokenizer, fixed_length)
    pol = logps(policy, "scoring")
    ref_lp = None
    if ref:
        policy.to("meta")  # its weights freed; the vocabulary check below needs only its shapes
        ref_model = load(ref, dev)
        check_vocab(tokenizer, policy, model, ref_model, ref)
        suppress_eos(ref_model, tokenizer, fixed_length)
        ref_lp = logps(ref_model, "scoring (reference)")
    def lines():
        for i, ex in enumerate(tokenized):
            k = len(ex.response_ids) - 1  # a ranking of K > 2: its best and its worst response
            line = {"row": ex.row, "chosen_logp": pol[i, 0].item(), "rejected_logp": pol[i, k].item(),
                    "chosen_tokens": len(ex.response_ids[0]), "rejected_tokens": len(ex.response_ids[k])}
            if ref_lp is not None:
                line.update(ref_chosen_logp=ref_lp[i, 0].item(), ref_rejected_logp=ref_lp[i, k].item(),
                            chosen_reward=implicit_reward(pol[i, 0], ref_lp[i, 0], beta).item(),
                            rejected_reward=implicit_reward(pol[i, k], ref_lp[i, k], beta).item())
            yield line

    write_jsonl(lines(), out)  # whole or absent: an interrupted run leaves an existing file as it was
    if ref_lp is not None:
        margin = implicit_reward(pol[:, 0], ref_lp[:, 0], beta) - implicit_reward(last_valid(pol), last_valid(ref_lp),
                                                                                  beta)
        what = "implicit-reward"
    else:
        margin = pol[:, 0] - last_valid(pol)
        what = "log-prob"
    result = {"pairs": len(tokenized), "skipped": report.total, f"{what.replace('-', '_')}_accuracy":
              (margin > 0).float().mean().item(), "mean_margin": margin.mean().item(), "out": out}
    log(f"scored {len(tokenized)} pairs ({report.summary()}): {what} accuracy "
          f"{(margin > 0).float().mean().item():.4f}, mean margin {margin.mean().item():.4f} -> {out}")
    return result


def pairs_only(examples: list, on_invalid: str, report: SkipReport) -> list:
    """The examples with two or more responses. A prompt/completion row (SFT's, or an unpaired one with
    a label) has no rejected response to compare: an error of its row, or with on_invalid='skip' a
    counted skip (its log-prob margin would be NaN, and a batch of them a traceback)."""
    kept = []
    for ex in examples:
        if len(ex.responses) >= 2:
            kept.append(ex)
            continue
        err = DataError(ex.source, ex.row, "rejected", "missing: score reads pairs (prompt, chosen, rejected) or "
                                                       "rankings; this is a prompt/completion row", kind="missing")
        if on_invalid != "skip":
            raise err
        report.add(err)
    if not kept:
        raise DataError(examples[0].source, None, None, f"no pairs to score: {report.summary()}")
    return kept


def vision_processor(model: str, ref: str | None, data: str, examples) -> object | None:
    """The processor of `model` when rows of `data` have images (None for text rows): it must then be
    a vision-language model, and so must `ref` (a model directory: an adapter directory of a VLM is
    not read yet); anything else is refused in one line before a model loads."""
    from ..vision import is_vision_model, load_processor

    with_images = sum(bool(ex.images) for ex in examples)
    if not with_images:
        return None
    rows = f"{data} ({with_images} row{'s' * (with_images != 1)})"
    for flag, name in (("--model", model), ("--ref", ref)):
        if name is None:
            continue
        if is_adapter_dir(name):
            raise UserValueError(f"images in {rows}, but {flag} {name} is an adapter directory: image rows are not "
                                 "scored with adapters yet (issue #30); give the vision-language model's directory")
        if not is_vision_model(name):
            raise UserValueError(f"images in {rows}, but {flag} {name} is a text-only model: give a vision-language "
                                 "model (one with a vision tower) to score them, or remove the 'images'/'image' "
                                 "field to score the text alone")
    return load_processor(model)
