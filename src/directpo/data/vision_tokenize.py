"""Vision-language examples -> token ids and image tensors (issue #30).

The prompt (messages with `{"type": "image"}` parts, or a text holding the processor's image token
once per image) is rendered as text prompts are (`render`: the processor's chat template with the
generation prompt), then `processor(text=..., images=...)` gives its ids, each image token expanded
to the image's many patch tokens, and the image tensors. Responses are text: their ids follow the
same boundary rule as text (`data/tokenize.py`), computed on the *unexpanded* prompt: image tokens
are special tokens, which no merge crosses, so what follows the prompt tokenizes the same either way
(tested against the processor on the whole [prompt + response] text).

Truncation never cuts a prompt: its image tokens must match the image tensors one for one, and
which of them a left cut would drop is a model-specific question. Responses are cut from the right
to fit `max_length`; a prompt longer than `max_prompt_length`, or leaving no room for a response
within `max_length`, is a `DataError` of kind 'prompt_too_long' (or skipped with on_invalid='skip').

M-RoPE (Qwen2-VL and its successors' image positions): the prompt's (3, P) positions are computed
here, a pure function of the ids, the token types and the image grids mirroring
`Qwen2VLModel.get_rope_index` for images, so the packed layout can restart the responses after the
prompt without the model. Decided from the processor: it returns `image_grid_thw` and its image
processor has a `merge_size`.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .formats import DataError, Example, SkipReport
from .tokenize import TokenizedExample, TokenizeStats, _response_ids, render, tokenize_each

# What the processor returns per token, not per image: rebuilt for every batch layout by the collate.
PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def tokenize_vision_examples(examples: list[Example], processor, max_length: int | None = None,
                             max_prompt_length: int | None = None, on_invalid: str = "error",
                             skipped: SkipReport | None = None) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenized examples (with `vision`, and `prompt_positions` for M-RoPE models) and their stats.

    Bad rows raise a `DataError` naming file, row and field, or with on_invalid='skip' are counted
    in `skipped` and left out."""
    skipped = skipped if skipped is not None else SkipReport()
    stats = TokenizeStats()
    out = tokenize_each(examples, lambda ex: tokenize_vision_example(ex, processor, max_length, max_prompt_length,
                                                                     stats), on_invalid, skipped)
    return out, stats


def tokenize_vision_example(example: Example, processor, max_length: int | None = None,
                            max_prompt_length: int | None = None,
                            stats: TokenizeStats | None = None) -> TokenizedExample:
    stats = stats if stats is not None else TokenizeStats()
    tokenizer = getattr(processor, "tokenizer", processor)
    prompt_text, responses, add_special = render(example, processor)
    _check_image_count(example, processor, prompt_text)
    enc = _encode(processor, prompt_text, example, add_special)
    p_ids = enc["input_ids"][0].tolist()
    # The boundary rule on the unexpanded prompt (see the module doc).
    plain = tokenizer(prompt_text, add_special_tokens=add_special)["input_ids"]
    eos = tokenizer.eos_token_id
    response_ids = []
    for text in responses:
        ids, merged = _response_ids(tokenizer, prompt_text, text, plain, False, add_special)
        stats.boundary_merges += merged
        if not example.conversational and eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        response_ids.append(ids)
    n_trunc = _fit(example, p_ids, response_ids, max_length, max_prompt_length)
    stats.responses_truncated += n_trunc
    vision = {k: v for k, v in enc.items() if k not in PER_TOKEN and isinstance(v, torch.Tensor)}
    lazy = ImageInputs(processor, prompt_text, example, add_special, vision) if vision else None
    types = enc.get("mm_token_type_ids")
    types = None if types is None else types[0].clone()
    positions = None
    if is_mrope(processor, enc):
        if types is None:
            types = (enc["input_ids"][0] == _image_token_id(processor)).long()
        positions = mrope_positions(types, vision["image_grid_thw"], processor.image_processor.merge_size)
    return TokenizedExample(p_ids, response_ids, example.source, example.row, False, n_trunc, example.label,
                            vision=lazy, prompt_positions=positions,
                            prompt_token_types=types if positions is not None else None)


class ImageInputs(Mapping):
    """One example's image tensors (`TokenizedExample.vision`), made again by the processor whenever a
    batch needs them: a data set holds its examples' image references and the few numbers per image
    (grids, sizes), not their pixels. A 224-px image is 1.2 MB of fp32 patches for Qwen2-VL; held for
    50k pairs that would be 60 GB, where TRL's collator also processes images batch by batch.

    Made again exactly: the processor is deterministic on the same image, and what it gives is
    checked against what it gave when the row was tokenized (shapes, and the small tensors' values);
    an image that changed on disk since is the row's one-line `DataError`. `digest`: a hash of the
    decoded images and the image processor's settings, the row's identity in the reference cache and
    the duplicate checks (its pixels, without making them), checked again each time they are made."""

    def __init__(self, processor, prompt_text: str, example: Example, add_special: bool, made: dict):
        self._processor, self._text, self._example, self._special = processor, prompt_text, example, add_special
        self._keys = list(made)
        self._small = {k: v for k, v in made.items() if v.numel() <= _SMALL}
        self._shapes = {k: v.shape for k, v in made.items()}
        self.digest = _digest(processor, [ref.open() for ref in example.images], self._small)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:  # (Mapping's would make the tensors to answer)
        return key in self._keys

    @property
    def small(self) -> dict[str, torch.Tensor]:
        """The tensors kept from tokenization (grids, sizes: at most `_SMALL` numbers each), which a
        forward given cached image features (`data.image_features`) needs without the pixels."""
        return self._small

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors()[key]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The processor's image tensors for this example, made now."""
        images = [ref.open() for ref in self._example.images]
        enc = _encode(self._processor, self._text, self._example, self._special, images)
        out = {k: enc[k] for k in self._keys}
        if _digest(self._processor, images, self._small) != self.digest or \
                any(out[k].shape != shape for k, shape in self._shapes.items()):
            raise DataError(self._example.source, self._example.row, "images",
                            "an image changed since the data was read (its tensors differ): rerun the command",
                            kind="image_changed")
        return out


_SMALL = 64  # tensors of at most this many numbers (image grids, sizes) are kept; pixels are made again


def _digest(processor, images: list, small: dict) -> bytes:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    config = getattr(getattr(processor, "image_processor", None), "to_json_string", None)
    h.update((config() if config else type(processor).__name__).encode())
    for img in images:
        h.update(f"{img.mode}{img.size}".encode())
        h.update(img.tobytes())
    for k in sorted(small):
        h.update(k.encode() + small[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


def _image_token_id(processor) -> int | None:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None and getattr(processor, "image_token", None) is not None:
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return token_id


def _check_image_count(example: Example, processor, prompt_text: str) -> None:
    """As many images as the rendered prompt has image placeholders (the processor's image token)."""
    token = getattr(processor, "image_token", None)
    if token is None:
        return
    wanted, given = prompt_text.count(token), len(example.images)
    if wanted != given:
        raise DataError(example.source, example.row, "images",
                        f"{given} image{'s' * (given != 1)}, but the prompt has {wanted} image placeholder"
                        f"{'s' * (wanted != 1)} ({token!r} once rendered): give one image per placeholder",
                        kind="image_count")


def _encode(processor, prompt_text: str, example: Example, add_special: bool, images: list | None = None):
    """The processor's output for the prompt and the example's images (decoded now, unless given)."""
    images = [ref.open() for ref in example.images] if images is None else images
    try:
        return processor(text=[prompt_text], images=[images] if images else None, return_tensors="pt",
                         add_special_tokens=add_special)
    except ValueError as e:  # the processor's own checks (counts, sizes) are this row's error
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(example.source, example.row, "images", f"the processor refused the images: {message}"[:300],
                        kind="image_processor") from None


def _fit(example: Example, p_ids: list[int], response_ids: list[list[int]], max_length: int | None,
         max_prompt_length: int | None) -> int:
    """Responses cut from the right to fit `max_length` (in place); returns how many were cut. The
    prompt is never cut (module doc): one too long is a DataError."""
    limit = max_prompt_length
    if limit is not None and len(p_ids) > limit:
        raise DataError(example.source, example.row, "prompt",
                        f"prompt is {len(p_ids)} tokens (its images included) and a prompt with images is never cut, "
                        f"but max_prompt_length={limit}; raise it, or on_invalid='skip' to leave such rows out",
                        kind="prompt_too_long")
    if max_length is None:
        return 0
    room = max_length - len(p_ids)
    if room < 1:
        raise DataError(example.source, example.row, "prompt",
                        f"prompt is {len(p_ids)} tokens (its images included), leaving no room for a response within "
                        f"max_length={max_length}; raise max_length, or on_invalid='skip' to leave such rows out",
                        kind="prompt_too_long")
    n = 0
    for k, ids in enumerate(response_ids):
        if len(ids) > room:
            response_ids[k] = ids[:room]
            n += 1
    return n


def is_mrope(processor, enc) -> bool:
    """Whether the processor's model places image tokens with M-RoPE (Qwen2-VL style): the processor
    returns image grids (t, h, w) and its image processor merges patches by `merge_size`."""
    merge = getattr(getattr(processor, "image_processor", None), "merge_size", None)
    return "image_grid_thw" in enc and isinstance(merge, int)


def mrope_positions(token_types: torch.Tensor, image_grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """(3, P) M-RoPE positions (temporal, height, width) of one prompt, as `Qwen2VLModel.get_rope_index`
    computes them for images: a text run counts on in all three streams; an image run of grid
    (t, h/m, w/m) gets the grid's coordinates offset by the position where it starts, and the next
    run starts at that position + max(h, w)/m."""
    out = torch.zeros(3, token_types.shape[0], dtype=torch.long)
    grids = iter(image_grid_thw.tolist())
    pos, i, n = 0, 0, token_types.shape[0]
    types = token_types.tolist()
    while i < n:
        j = i
        while j < n and types[j] == types[i]:
            j += 1
        if types[i] == 0:
            out[:, i:j] = torch.arange(pos, pos + j - i)
            pos += j - i
        else:
            t, h, w = next(grids)
            h, w = h // merge_size, w // merge_size
            grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
            out[:, i:j] = grid.reshape(3, -1) + pos
            pos += max(h, w)
        i = j
    return out
