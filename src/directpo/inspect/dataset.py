"""Read preference data exactly as `train` does and measure it: `inspect_data`.

The rows go through the loaders `train` uses (`load_examples`, then `tokenize_examples` with the
same tokenizer, chat template, `max_length` and `max_prompt_length`), so what is reported is what
a run would see. Invalid rows are always collected (read with on_invalid='skip'): with
`on_invalid='error'` the report says where `train` would stop, and still measures the rest.

Two views of each kept example:
* as trained: the ids `tokenize_examples` returned, truncated at the limits (truncation, special
  tokens, rendered examples, the reference's log-probs);
* untruncated: the same example tokenized without the run's limits (only the examples the limits
  cut are tokenized again) for what the data itself holds: length bias, duplicates, the length
  histograms. Its own limits are `UNTRUNCATED_FACTOR` times the run's (prompts up to that many
  tokens, responses at least as many), through `tokenize_example`, so a text far longer is cut
  before it is tokenized as in training (`data.tokenize.bounded`): one 50 MB row takes megabytes,
  not gigabytes. The examples still cut there are counted (`untruncated_cap`): their lengths are
  lower bounds.

Rows with images (issue #30) are read as `train` reads them when `--model` is a vision-language
model: its processor renders each prompt with its images (`tokenize_vision_examples`), so the
report counts their image tokens, shows an image example as the model reads it (a run of image
tokens collapsed, `<|image_pad|>×64`) and scores the pairs with their images. Without one
(`--tokenizer` alone, a text-only model) they are measured by their text alone, as before.
"""
from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, replace

from ..data import (DataError, SkipReport, TokenizedExample, TokenizeStats, load_examples, make_collate,
                    tokenize_example, tokenize_examples)
from ..data.checks import red_flags, summarize, summary_paragraph
from ..data.formats import read_records
from ..data.images import flatten
from ..errors import UserValueError

SHAPES = ("explicit", "hh", "conversational", "ranked", "completion", "other", "unreadable")
SHAPE_NAMES = {"explicit": "explicit text pairs {prompt, chosen, rejected}",
               "hh": "HH-RLHF transcripts {chosen, rejected}",
               "conversational": "conversational (chat messages)",
               "ranked": "ranked responses {prompt, responses, ranking|scores}",
               "completion": "prompt/completion (SFT only: one response)",
               "other": "no chosen/rejected/responses field",
               "unreadable": "not a JSON object (or not UTF-8)"}
BOUNDARY = "⟦|⟧"
UNTRUNCATED_FACTOR = 4  # the untruncated view measures texts up to this many times the run's limit
SHOW_CHARS = 400  # of each side of a rendered example


def row_shape(rec: dict) -> str:
    """Which of the accepted row shapes (`directpo.data.formats`) a record has, by its fields."""
    rec = {k: v for k, v in rec.items() if v is not None}
    if "responses" in rec:
        return "ranked"
    if "completion" in rec and "chosen" not in rec:
        return "completion"
    if "chosen" not in rec and "rejected" not in rec:
        return "other"
    if any(isinstance(rec.get(k), list) for k in ("prompt", "chosen", "rejected")):
        return "conversational"
    return "explicit" if "prompt" in rec else "hh"


def read_shapes(data: str, split: str | None = None) -> dict[int, str]:
    """{row: shape} of every row of `data` (unreadable rows too)."""
    return {row: "unreadable" if isinstance(rec, DataError) else row_shape(rec)
            for row, rec in read_records(data, split)}


def _quantiles(values: list[int]) -> dict:
    if not values:
        return {}
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"min": s[0], "median": statistics.median(s), "mean": statistics.fmean(s), "p90": pick(0.9),
            "p99": pick(0.99), "max": s[-1]}


def untruncated_cap(max_length: int | None, max_prompt_length: int | None = None) -> int | None:
    """The most tokens of a prompt the untruncated view measures (responses: at least as many);
    None (no limit) when the run has none either."""
    limit = max(max_length or 0, max_prompt_length or 0)
    return UNTRUNCATED_FACTOR * limit if limit else None


def untruncated(examples, tokenized: list[TokenizedExample], tokenizer,
                cap: int | None = None) -> list[TokenizedExample]:
    """`tokenized` with each example the limits cut replaced by its tokenization without them, or
    with `cap`: prompts up to `cap` tokens and responses up to 2·`cap` − the prompt, each text cut
    before it is tokenized (`tokenize_example`'s bounded inputs), so memory is bounded by `cap`."""
    by_row = {ex.row: ex for ex in examples}
    limits = (2 * cap, cap) if cap else (None, None)
    return [tokenize_example(by_row[t.row], tokenizer, *limits) if t.prompt_truncated or t.responses_truncated
            else t for t in tokenized]


def decode_collapsed(ids: list[int], tokenizer, collapse=frozenset()) -> str:
    """`ids` as text, special tokens shown, each run of a token in `collapse` (a VLM's image token:
    hundreds per image) written once with its count, `<|image_pad|>×64`."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False,  # noqa: E731
                                          clean_up_tokenization_spaces=False)
    parts, start, i = [], 0, 0
    while i < len(ids):
        if ids[i] not in collapse:
            i += 1
            continue
        j = i
        while j < len(ids) and ids[j] == ids[i]:
            j += 1
        parts += [decode(ids[start:i]), f"{decode([ids[i]])}×{j - i}"]
        start = i = j
    return "".join(parts + [decode(ids[start:])])


def render_example(t: TokenizedExample, tokenizer, chars: int = SHOW_CHARS, collapse=frozenset()) -> dict:
    """The prompt and chosen/rejected responses as the model reads them (special tokens shown), the
    boundary marked with ⟦|⟧; long prompts keep their end, long responses their start. `collapse`:
    token ids whose runs are written once with their count (`decode_collapsed`)."""
    decode = lambda ids: decode_collapsed(ids, tokenizer, collapse)  # noqa: E731
    prompt = decode(t.prompt_ids)
    if len(prompt) > chars:
        prompt = "…" + prompt[-chars:]
    sides = []
    for ids in (t.response_ids[0], t.response_ids[-1]):
        text = decode(ids)
        sides.append(text if len(text) <= chars else text[:chars] + "…")
    out = {"row": t.row, "prompt_tokens": len(t.prompt_ids), "chosen": prompt + BOUNDARY + sides[0]}
    if len(t.response_ids) > 1:
        out["rejected"] = prompt + BOUNDARY + sides[1]
    return out


def _range(values: list) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else {}


def image_token_ids(processor) -> frozenset[int]:
    """The id of the token a VLM's processor expands each image into (`<|image_pad|>`, `<image>`)."""
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None and getattr(processor, "image_token", None) is not None:
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return frozenset() if token_id is None else frozenset([token_id])


def image_tokens_per_row(tokenized: list[TokenizedExample], image_ids: frozenset[int]) -> dict | None:
    """Image tokens per row with images (min/median/max), as the processor expanded them into the
    prompts (Qwen2-VL's grow with the image's size, LLaVA's are fixed per image); None without a
    processor ("n/a" in the report: no number rather than a guessed one)."""
    counts = [sum(i in image_ids for i in t.prompt_ids) for t in tokenized if t.vision is not None]
    return _range(counts) if image_ids and counts else None


def image_stats(examples, tokens: dict | None = None) -> dict | None:
    """Images of the kept rows: how many rows have them, images per row, sizes (width × height, the
    smallest, median and largest by pixel count), encoded bytes; None for data without images.
    Read from the headers the loader checked: no image is decoded here."""
    rows = [ex for ex in examples if ex.images]
    if not rows:
        return None
    refs = [r for ex in rows for r in ex.images]
    by_area = sorted(refs, key=lambda r: (r.width * r.height, r.width))
    size = lambda r: f"{r.width}×{r.height}"  # noqa: E731
    known = [r.nbytes for r in refs if r.nbytes is not None]
    return {"rows_with_images": len(rows), "rows": len(examples), "images": len(refs),
            "images_per_row": _range([len(ex.images) for ex in rows]),
            "size": {"min": size(by_area[0]), "median": size(by_area[(len(by_area) - 1) // 2]),
                     "max": size(by_area[-1])},
            "width": _range([r.width for r in refs]), "height": _range([r.height for r in refs]),
            "formats": dict(Counter(r.format or "in memory" for r in refs).most_common()),
            "total_bytes": sum(known), "images_without_bytes": len(refs) - len(known),  # in-memory PIL images
            "image_tokens_per_row": tokens}


def _by_shape(shapes: dict[int, str], tokenized: list[TokenizedExample]) -> dict:
    read = Counter(shapes.values())
    kept = Counter(shapes.get(t.row, "other") for t in tokenized)
    return {s: {"rows": read[s], "kept": kept[s], "what": SHAPE_NAMES[s]} for s in SHAPES if read[s] or kept[s]}


def _invalid(report: SkipReport, on_invalid: str) -> dict:
    out = {"total": report.total, "by_kind": dict(sorted(report.counts.items())), "examples": dict(report.first)}
    if on_invalid == "error" and report.total:
        out["train_stops_at"] = next(iter(report.first.values()))  # the first error met, in file order
    return out


def _lengths(full: list[TokenizedExample], trained: list[TokenizedExample]) -> dict:
    pairs = [t for t in full if len(t.response_ids) >= 2]
    out = {"untruncated": {"prompt": _quantiles([len(t.prompt_ids) for t in full]),
                           "chosen": _quantiles([len(t.response_ids[0]) for t in pairs]),
                           "rejected": _quantiles([len(t.response_ids[-1]) for t in pairs]),
                           "total": _quantiles([len(t.prompt_ids) + max(map(len, t.response_ids)) for t in full])},
           "as_trained": {"prompt": _quantiles([len(t.prompt_ids) for t in trained]),
                          "total": _quantiles([len(t.prompt_ids) + max(map(len, t.response_ids)) for t in trained])}}
    return out


def _per_pair(full, trained, ref_lp) -> list[dict]:
    rows = []
    for i, (f, t) in enumerate(zip(full, trained)):
        row = {"row": t.row, "prompt_tokens": len(f.prompt_ids), "chosen_tokens": len(f.response_ids[0]),
               "rejected_tokens": len(f.response_ids[-1]), "prompt_cut": t.prompt_truncated,
               "responses_cut": t.responses_truncated}
        if ref_lp is not None:
            k = sum(1 for x in ref_lp[i].tolist() if x == x) - 1  # the last (worst) scored response
            row.update(ref_chosen_logp=ref_lp[i, 0].item(), ref_rejected_logp=ref_lp[i, k].item())
        rows.append(row)
    return rows


TINY_HIDDEN = 256  # on CPU, models this narrow run fastest on one thread (more only add synchronization)


def reference_logps(model: str, tokenizer, tokenized: list[TokenizedExample], batch_size: int = 8,
                    device: str | None = None, precision: str = "fp32", progress: bool = True,
                    threads: int = 0, vision: bool = False):
    """(len(tokenized), K) summed response log-probs under `model`, as `directpo score` computes them.

    `threads`: CPU threads for torch while scoring (0: one for a tiny model on CPU, else torch's
    default); the previous setting is restored after. `vision`: `model` is a vision-language model
    (`tokenized` from its processor, the images in the examples)."""
    import torch

    from ..logprobs import dataset_logps, packed_row_tokens
    from ..models import check_vocab, load_model_or_adapter, pick_device

    dev = pick_device(device)
    if vision:
        from ..vision import load_vision_model

        ref = load_vision_model(model, dev)
    else:
        ref = load_model_or_adapter(model, dev)
    check_vocab(tokenizer, ref, model)
    collate = make_collate("packed", tokenizer.pad_token_id, packed_row_tokens(None, ref))
    dtype = torch.bfloat16 if precision == "bf16" else None
    config = getattr(ref.config, "text_config", None) or ref.config  # (a VLM: its language model's width)
    if not threads and dev.type == "cpu" and getattr(config, "hidden_size", TINY_HIDDEN + 1) <= TINY_HIDDEN:
        threads = 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    # Log-probs alone: an unpaired row's label (desirable or not) plays no part, and batches mixing
    # labelled rows with pairs or completions are refused by the training collate.
    tokenized = [replace(t, label=None) if t.label is not None else t for t in tokenized]
    try:
        return dataset_logps(ref, tokenized, collate, batch_size, dev, dtype,
                             progress="reference" if progress else None)
    finally:
        torch.set_num_threads(before)


def _reference_summary(model: str, tokenized, lp) -> dict:
    import torch

    from ..metrics import last_valid

    pairs = torch.tensor([len(t.response_ids) >= 2 for t in tokenized])
    chosen, rejected = lp[pairs, 0], last_valid(lp[pairs])
    margin = chosen - rejected
    n = int(pairs.sum())
    return {"model": model, "pairs": n, "accuracy": (margin > 0).float().mean().item() if n else None,
            "mean_margin": margin.mean().item() if n else None,
            "mean_chosen_logp": chosen.mean().item() if n else None,
            "mean_rejected_logp": rejected.mean().item() if n else None}


def inspect_data(data: str, tokenizer, model: str | None = None, max_length: int | None = 512,
                 max_prompt_length: int | None = None, on_invalid: str = "error", split: str | None = None,
                 batch_size: int = 8, device: str | None = None, precision: str = "fp32",
                 progress: bool = True, threads: int = 0) -> dict:
    """Everything `directpo inspect` reports, as one JSON-ready dict (plus "per_pair": a list of
    one dict per kept example, for pairs.jsonl and the figures). `tokenizer`: a loaded tokenizer
    (the model's); `model`: the reference, whose log-probs are added when given."""
    if on_invalid not in ("error", "skip"):
        raise UserValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise UserValueError(f"--max-prompt-length {max_prompt_length} must be smaller than --max-length {max_length} "
                             "(the prompt and its response share --max-length)")
    report = SkipReport()
    loaded = load_examples(data, on_invalid="skip", split=split, report=report)
    processor = vision_processor(model, loaded)
    tokenizer = processor.tokenizer if processor is not None else tokenizer
    cap = untruncated_cap(max_length, max_prompt_length)
    tokenized, full, stats = _tokenize(loaded, tokenizer, processor, max_length, max_prompt_length, cap, report)
    shapes = read_shapes(data, split)
    summary = summarize(tokenized, tokenizer, stats, report, full=full)
    image_ids = image_token_ids(processor) if processor is not None else frozenset()
    rendered = {}
    for t in tokenized:
        shape = "images" if t.vision is not None else shapes.get(t.row, "other")
        if shape not in rendered:
            rendered[shape] = render_example(t, tokenizer, collapse=image_ids)
    ins = {"data": data, "settings": {"max_length": max_length, "max_prompt_length": max_prompt_length,
                                      "on_invalid": on_invalid, "data_split": split, "model": model,
                                      "tokenizer": getattr(tokenizer, "name_or_path", None)},
           "rows": {"read": len(shapes), "kept": len(tokenized), "by_shape": _by_shape(shapes, tokenized)},
           "invalid": _invalid(report, on_invalid), "checks": summary, "tokenize_stats": asdict(stats),
           "lengths": _lengths(full, tokenized), "examples": rendered,
           "untruncated_cap": {"tokens": cap, "examples": sum(bool(t.prompt_truncated or t.responses_truncated)
                                                                for t in full)}}
    images = image_stats(loaded, image_tokens_per_row(tokenized, image_ids))
    if images is not None:
        ins["images"] = images
        ins["images"]["read_with"] = "the model's processor" if processor is not None else "text alone"
    ref_lp = None
    if model is not None:
        ref_lp = reference_logps(model, tokenizer, tokenized, batch_size, device, precision, progress, threads,
                                 vision=processor is not None)
        ins["reference"] = _reference_summary(model, tokenized, ref_lp)
    ins["red_flags"] = _flags(ins)
    ins["paragraph"] = summary_paragraph(summary, ins["red_flags"])
    ins["per_pair"] = _per_pair(full, tokenized, ref_lp)
    return ins


def vision_processor(model: str | None, examples) -> object | None:
    """The processor of `model` when it is a vision-language model and rows have images (they are
    then read as `train` reads them); None otherwise: the rows are measured by their text alone."""
    from ..models import is_adapter_dir
    from ..vision import is_vision_model, load_processor

    if model is None or not any(ex.images for ex in examples) or is_adapter_dir(model) \
            or not is_vision_model(model):
        return None
    return load_processor(model)


def _tokenize(loaded, tokenizer, processor, max_length, max_prompt_length, cap, report):
    """(as trained, untruncated, stats) of the loaded examples: by the VLM's processor, images
    included, or by the tokenizer, the rows with images by their text alone (their image parts
    left out, not printed by a text-only chat template as content lists)."""
    if processor is None:
        stats = TokenizeStats()
        examples = [replace(ex, prompt=flatten(ex.prompt), images=[]) if ex.images else ex for ex in loaded]
        tokenized = tokenize_examples(examples, tokenizer, max_length, max_prompt_length, "skip", report, stats)
        return tokenized, untruncated(examples, tokenized, tokenizer, cap), stats
    from ..data.vision_tokenize import tokenize_vision_example, tokenize_vision_examples

    tokenized, stats = tokenize_vision_examples(loaded, processor, max_length, max_prompt_length, "skip", report)
    by_row = {ex.row: ex for ex in loaded}
    full = []
    for t in tokenized:  # a prompt with images is never cut: only responses were (module doc: the cap)
        try:
            full.append(tokenize_vision_example(by_row[t.row], processor, 2 * cap if cap else None)
                        if t.responses_truncated else t)
        except DataError:  # its prompt alone past the cap: measured as trained
            full.append(t)
    return tokenized, full, stats


def _flags(ins: dict) -> list[str]:
    flags = []
    stop = ins["invalid"].get("train_stops_at")
    if stop:
        flags.append(f"{ins['invalid']['total']} invalid rows: `train` (on_invalid=error) stops at the first: {stop}")
    by_shape = ins["rows"]["by_shape"]
    if by_shape.get("completion", {}).get("kept"):
        flags.append(f"{by_shape['completion']['kept']} prompt/completion rows have one response: the preference "
                     "losses refuse them (they are for `directpo sft`)")
    if by_shape.get("ranked", {}).get("kept"):
        flags.append(f"{by_shape['ranked']['kept']} ranked rows: pairwise losses need --ranking-to-pairs (or "
                     "--loss plackett_luce); checks here compare their best and worst responses")
    if ins.get("images") and ins["images"]["image_tokens_per_row"] is None:
        flags.append(f"{ins['images']['rows_with_images']} rows have images, measured here by their text alone: "
                     "give --model a vision-language model to read them as train does (their image tokens "
                     "counted, the reference's log-probs with the images); a text-only model refuses them in train")
    n = (ins.get("untruncated_cap") or {}).get("examples")
    if n:
        flags.append(f"{n} example{'s are' if n > 1 else ' is'} longer than {ins['untruncated_cap']['tokens']} "
                     "tokens (a prompt, or a response after it): untruncated lengths are counted up to there")
    checks = ins["checks"]
    if stop:  # not "left out": train stops (said above)
        checks = {**checks, "skipped": {**checks["skipped"], "total": 0}}
    return flags + red_flags(checks)
