"""Prompts to sample from: `load_prompts` reads a prompt file, `encode_prompt` turns a prompt into ids.

Prompts come from a JSONL/JSON/Parquet file (or a `datasets` source) whose rows have a `prompt`
field (text, or a list of {role, content} messages), or from any preference file `directpo train`
reads: its prompts are used, and its best response (`chosen`), or a `reference` field, is kept as
the reference completion for win rates. Files are read, and bad rows reported or skipped, exactly
as for training data (`directpo.data.formats.parse_records`).

Prompts are tokenized exactly as in training (`directpo.data.tokenize`: `render_prompt`,
`prompt_ids`, `truncate_prompt`): `tokenizer(prompt)` with special tokens, chat templates with
the generation prompt, cut from the left keeping BOS. With a `max_prompt_length`, a prompt far longer
than it is cut to its end before it is tokenized (`directpo.data.tokenize.bounded`: the same ids,
memory bounded by the setting, not by the data).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..console import log
from ..errors import UserValueError
from .errors import location
from .formats import (DataError, Example, SkipReport, _is_messages, _messages, _with_images, check_unicode,
                      message_text, parse_records, parse_row)
from .tokenize import IMAGE_COMMANDS, TokenizedExample, bos_text, bounded, prompt_ids, render_prompt, truncate_prompt

_PAIR_FIELDS = ("chosen", "rejected", "responses", "completion")


@dataclass
class PromptItem:
    prompt: str | list  # text, or a list of {role, content} messages
    reference: str | None = None  # a reference completion (for win rates), when the row has one
    source: str = ""
    row: int = 0
    images: list = field(default_factory=list)  # `ImageRef`s in placeholder order (a vision-language prompt)


def parse_prompt_row(rec: dict, source: str, row: int) -> PromptItem:
    """A prompt row ({prompt[, reference]}) or any preference/SFT row directpo reads."""
    rec = {k: v for k, v in rec.items() if v is not None}
    check_unicode(rec, ("prompt", "reference"), source, row)
    reference, images = None, []
    if any(k in rec for k in _PAIR_FIELDS):  # preference, ranked or SFT row: its prompt, its best response
        ex = parse_row(rec, source, row)  # (its images checked and attached)
        prompt, reference, images = ex.prompt, ex.responses[0], ex.images
    elif "prompt" not in rec:
        raise DataError(source, row, "prompt", "missing: a prompt row needs a 'prompt' field (text or messages)",
                        kind="missing")
    elif _is_messages(rec["prompt"]):
        prompt = _messages(rec["prompt"], source, row, "prompt")
    elif isinstance(rec["prompt"], str):
        prompt = rec["prompt"]
    else:
        raise DataError(source, row, "prompt", f"expected a string or a list of messages, got "
                                               f"{type(rec['prompt']).__name__}", kind="type")
    if "reference" in rec:
        reference = rec["reference"]
        if not isinstance(reference, str) and not _is_messages(reference):
            raise DataError(source, row, "reference", f"expected a string, got {type(reference).__name__}",
                            kind="type")
    if not images and ("images" in rec or "image" in rec):  # checked against the placeholders as in training
        ex = _with_images(Example(prompt, [], source, row), rec, source, row)
        prompt, images = ex.prompt, ex.images
    return PromptItem(prompt, None if reference is None else message_text(reference), source, row, images)


def load_prompts(spec: str, on_invalid: str = "error", split: str | None = None,
                 report: SkipReport | None = None) -> list[PromptItem]:
    """Every prompt of `spec`, in file order. Bad rows raise a DataError naming file, row and field
    (or are skipped and counted with on_invalid='skip'). Blank prompts are kept (sampled from the
    start token alone, as training reads an empty prompt) and said in one line: often a wrong field."""
    items = parse_records(spec, parse_prompt_row, on_invalid, split, report, what="prompts")
    note = blank_prompts_note(items)
    if note:
        log(note)
    return items


def blank_prompts_note(items: list[PromptItem]) -> str | None:
    """'warning: N of M prompts are blank (the first at FILE line L) ...', or None when none is."""
    blank = [it for it in items if isinstance(it.prompt, str) and not it.prompt.strip()]
    if not blank:
        return None
    first = f"{blank[0].source} {location(blank[0].source, blank[0].row)}"
    return (f"warning: {len(blank)} of {len(items)} prompt{'s' * (len(items) != 1)} "
            f"{'are' if len(blank) != 1 else 'is'} blank (the first at {first}): "
            "each is sampled from the start token alone (BOS, or EOS without one); if the prompts are in "
            "another field, name it 'prompt'")


def encode_prompt(prompt: str | list, tokenizer, max_prompt_length: int | None = None, source: str = "prompt",
                  row: int | None = None) -> list[int]:
    """Prompt ids as `directpo.data.tokenize` builds a training example's (BOS kept when cutting
    from the left); `source`/`row` name the prompt in an error (a chat template missing or refusing)."""
    text, add_special = render_prompt(prompt, tokenizer, source, row)
    _, (ids, _), _ = bounded(text, "end", max_prompt_length, tokenizer,
                             lambda t: prompt_ids(t, tokenizer, add_special), bos_text(tokenizer))
    return truncate_prompt(ids, tokenizer, max_prompt_length)


def refuse_images(items: list[PromptItem]) -> None:
    """Text alone would be sampled, the image placeholders dropped: refused in one line naming the
    file, its first image row and the commands that read images."""
    with_images = [it for it in items if it.images]
    if with_images:
        n, first = len(with_images), with_images[0]
        raise UserValueError(f"images in {first.source} ({n} row{'s' * (n != 1)}, the first at "
                             f"{location(first.source, first.row)}): {IMAGE_COMMANDS} read them with a vision-language "
                             "--model (issue #30); remove the 'images'/'image' field to use the text alone")


def encode_image_prompt(item: PromptItem, processor, max_prompt_length: int | None = None) -> TokenizedExample:
    """A prompt for a vision-language model, encoded as training encodes a prompt
    (`vision_tokenize.tokenize_vision_example`: the processor's chat template with the generation
    prompt, image tokens expanded, never cut): its `prompt_ids`, `vision` (image tensors made on
    demand, `.digest` the images' identity) and, for M-RoPE models, `prompt_positions` (3, P)."""
    from .vision_tokenize import tokenize_vision_example

    example = Example(item.prompt, [], item.source, item.row, images=item.images)
    return tokenize_vision_example(example, processor, None, max_prompt_length)
