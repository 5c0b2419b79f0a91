"""Tokenized examples -> a `Batch` of tensors.

Every layout is described by the same index vectors, so `directpo.logprobs` never needs to know
which one it got:

* ``label_pos[n]``: flat index (row * length + t) of the hidden state that predicts label n
* ``label_ids[n]``: the label token
* ``label_seq[n]``: the response sequence it belongs to, in [0, num_seqs)
* ``seq_index[i, k]``: the sequence id of response k of example i (-1 where example i has < K)

`collate_padded` is the plain layout: one row per (prompt + response), right-padded, responses
grouped by rank (all chosen, then all rejected), so chosen and rejected share one forward.

`collate_packed` computes each prompt once: an example is one segment [prompt | r1 | r2 | ...]
whose responses restart their position ids after the prompt and see only the prompt and their own
earlier tokens, and several segments share a row (no attention across segments), so no FLOP goes
to a repeated prompt and little to padding. The pattern travels as ``segments`` (attended segment
by segment in `directpo.attention`, or as a dense 4D mask from `Batch.dense_mask()` for models
that need one). Its log-probs equal the padded layout's.

Vision-language examples (`directpo.data.vision_tokenize`) add their image tensors as
``model_inputs`` (keyword tensors for the model's forward): in the padded layout once per row (an
example's images twice for a pair, as the model would see the two texts), in the packed layout
once per segment, so the vision tower encodes each image once per pair (the pixels are made when first
read: `VisionInputs`, so a forward given cached image features never makes them). M-RoPE models (Qwen2-VL)
get (3, R, T) packed positions from the prompts' own; padded rows get the token types from which
the model computes its positions itself.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch

from ..errors import UserValueError
from .tokenize import TokenizedExample


@dataclass
class Batch:
    input_ids: torch.Tensor  # (R, T)
    attention_mask: torch.Tensor | None  # (R, T) padding mask; None in the packed layout (see segments)
    position_ids: torch.Tensor | None  # (R, T) or None for 0..T-1
    label_pos: torch.Tensor  # (N,)
    label_ids: torch.Tensor  # (N,)
    label_seq: torch.Tensor  # (N,)
    seq_index: torch.Tensor  # (B, K)
    rows: list[int]  # source rows of the B examples
    token_count: int | None = None  # real tokens, where the mask alone cannot tell
    # packed layout: (row, start, prompt_len, response_lens) per example, in row order
    segments: list[tuple[int, int, int, tuple[int, ...]]] | None = None
    labels: torch.Tensor | None = None  # (B,) unpaired (KTO) examples: True where response 0 is desirable
    # extra keyword tensors for the model's forward (vision-language rows: pixel_values, image_grid_thw, ...;
    # a `VisionInputs`, whose pixels the processor makes only when they are read)
    model_inputs: "dict[str, torch.Tensor] | VisionInputs | None" = None

    @property
    def num_seqs(self) -> int:
        return int(self.seq_index.max().item()) + 1

    @property
    def num_examples(self) -> int:
        return self.seq_index.shape[0]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens the model processes."""
        if self.token_count is not None:
            return self.token_count
        return int(self.attention_mask.sum().item())

    def dense_mask(self) -> torch.Tensor:
        """Packed layout: the attention pattern its segments describe, as a (R, 1, T, T) boolean mask."""
        if self.segments is None:
            raise ValueError("dense_mask() is for the packed layout; a padded batch has attention_mask")
        R, T = self.input_ids.shape
        return dense_packed_mask(self.segments, R, T).to(self.input_ids.device)

    def to(self, device) -> "Batch":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in kw.items():
            if isinstance(v, torch.Tensor):
                kw[k] = v.to(device, non_blocking=True)
        if isinstance(self.model_inputs, VisionInputs):  # (moved when made: the pixels may never be)
            kw["model_inputs"] = self.model_inputs.to(device)
        elif self.model_inputs is not None:
            kw["model_inputs"] = {k: v.to(device, non_blocking=True) for k, v in self.model_inputs.items()}
        return Batch(**kw)

    def response_lengths(self) -> torch.Tensor:
        """(B, K) label tokens per response (0 where absent)."""
        counts = torch.bincount(self.label_seq, minlength=self.num_seqs)
        return counts[self.seq_index.clamp(min=0)].masked_fill(self.seq_index < 0, 0)


def collate_padded(examples: list[TokenizedExample], pad_id: int) -> Batch:
    K = max(len(ex.response_ids) for ex in examples)
    seqs: list[tuple[int, list[int], int]] = []  # (example, ids, prompt length)
    seq_index = torch.full((len(examples), K), -1, dtype=torch.long)
    for k in range(K):
        for i, ex in enumerate(examples):
            if k < len(ex.response_ids):
                seq_index[i, k] = len(seqs)
                seqs.append((i, ex.prompt_ids + ex.response_ids[k], len(ex.prompt_ids)))
    T = max(len(ids) for _, ids, _ in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    pos, lab, seq = [], [], []
    for r, (_, ids, p) in enumerate(seqs):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        attention_mask[r, :len(ids)] = 1
        # token t (t ≥ p) is predicted by the hidden state at t - 1
        pos.extend(range(r * T + p - 1, r * T + len(ids) - 1))
        lab.extend(ids[p:])
        seq.extend([r] * (len(ids) - p))
    rows = [[examples[i]] for i, _, _ in seqs]
    return Batch(input_ids, attention_mask, None, torch.tensor(pos), torch.tensor(lab), torch.tensor(seq),
                 seq_index, [ex.row for ex in examples], labels=_labels(examples),
                 model_inputs=_padded_model_inputs(rows, T))


def _labels(examples: list[TokenizedExample]) -> torch.Tensor | None:
    """(B,) desirable flags of unpaired examples; None for preference data (no labels)."""
    if all(ex.label is None for ex in examples):
        return None
    if any(ex.label is None for ex in examples):
        raise ValueError("a batch mixes unpaired (labelled) examples with preference pairs")
    return torch.tensor([bool(ex.label) for ex in examples])


def _assign_sequences(examples: list[TokenizedExample]) -> torch.Tensor:
    """Sequence ids grouped by rank, as in the padded layout: all best responses first."""
    K = max(len(ex.response_ids) for ex in examples)
    seq_index = torch.full((len(examples), K), -1, dtype=torch.long)
    n = 0
    for k in range(K):
        for i, ex in enumerate(examples):
            if k < len(ex.response_ids):
                seq_index[i, k] = n
                n += 1
    return seq_index


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of segment lengths into rows of `capacity` tokens."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for r, f in enumerate(free):
            if lengths[i] <= f:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def collate_packed(examples: list[TokenizedExample], pad_id: int, row_tokens: int | None = None) -> Batch:
    """Prefix-shared, packed layout. Rows hold up to max(row_tokens, longest segment) tokens.

    The attention pattern is carried as `segments`, not as a mask: `directpo.attention` attends
    segment by segment, and `Batch.dense_mask()` builds the equivalent (R, 1, T, T) mask for models
    that need one.
    """
    seq_index = _assign_sequences(examples)
    lengths = [len(ex.prompt_ids) + sum(len(r) for r in ex.response_ids) for ex in examples]
    rows = pack_rows(lengths, max(row_tokens or 0, max(lengths)))
    T = max(sum(lengths[i] for i in row) for row in rows)
    R = len(rows)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, T), dtype=torch.long)
    pos, lab, seq = [], [], []
    segments = []
    for r, row in enumerate(rows):
        o = 0
        for i in row:
            ex = examples[i]
            P = len(ex.prompt_ids)
            segments.append((r, o, P, tuple(len(resp) for resp in ex.response_ids)))
            input_ids[r, o:o + P] = torch.tensor(ex.prompt_ids)
            position_ids[r, o:o + P] = torch.arange(P)
            start = o + P
            for k, resp in enumerate(ex.response_ids):
                L = len(resp)
                input_ids[r, start:start + L] = torch.tensor(resp)
                position_ids[r, start:start + L] = torch.arange(P, P + L)
                # the first token is predicted by the prompt's last position, the rest by their predecessor
                base = r * T
                pos.append(base + o + P - 1)
                pos.extend(range(base + start, base + start + L - 1))
                lab.extend(resp)
                seq.extend([int(seq_index[i, k])] * L)
                start += L
            o = start
    in_rows = [[examples[i] for i in row] for row in rows]
    if any(ex.prompt_positions is not None for ex in examples):
        position_ids = mrope_packed_positions(in_rows, T)
    return Batch(input_ids, None, position_ids, torch.tensor(pos), torch.tensor(lab), torch.tensor(seq),
                 seq_index, [ex.row for ex in examples], token_count=sum(lengths), segments=segments,
                 labels=_labels(examples), model_inputs=VisionInputs.of(in_rows))


# ----------------------------------------------------------------------------------------------
# Vision-language rows: the image tensors of each row's examples, merged as the model wants them


def merge_vision(rows: list[list[TokenizedExample]]) -> dict[str, torch.Tensor] | None:
    """The image tensors of the examples in each row (row by row, in order: the order of their image
    tokens, which the model fills with image features in that order), merged for one forward: Qwen2-VL
    and LLaVA take all images of the batch concatenated on dim 0; Idefics3 takes (rows, images, C, H, W)
    with a `pixel_attention_mask`, a row's images padded with all-zero images (which it drops)."""
    made: dict[int, dict] = {}  # each example's tensors made once, though the padded layout has it in two rows
    parts = [[_tensors(ex, made) for ex in row if ex.vision] for row in rows]
    if not any(parts):
        return None
    first = next(v for row in parts for v in row)
    if "pixel_attention_mask" in first:  # Idefics2/3, SmolVLM: images batched per row
        return _merge_per_row(parts)
    keys = list(first)
    return {k: _cat_padded([v[k] for row in parts for v in row]) for k in keys}


def _cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenated on dim 0, dim 1 zero-padded to the longest: LLaVA-NeXT's (images, crops, C, H, W),
    which its processor pads to the most crops of one call's images and its model cuts back to each
    image's own count (by `image_sizes`), so examples processed apart merge as one call would give them."""
    if tensors[0].dim() < 3 or len({t.shape[1] for t in tensors}) == 1:
        return torch.cat(tensors)
    n = max(t.shape[1] for t in tensors)
    return torch.cat([torch.cat([t, t.new_zeros((t.shape[0], n - t.shape[1], *t.shape[2:]))], dim=1)
                      for t in tensors])


def _tensors(ex: TokenizedExample, made: dict) -> dict[str, torch.Tensor]:
    """An example's image tensors (`vision_tokenize.ImageInputs` makes them now; a plain dict is them)."""
    if id(ex) not in made:
        made[id(ex)] = ex.vision.tensors() if hasattr(ex.vision, "tensors") else ex.vision
    return made[id(ex)]


def _merge_per_row(parts: list[list[dict]]) -> dict[str, torch.Tensor]:
    """(rows, most images in a row, ...) for each tensor, zero-padded (an image of zeros is no image)."""
    first = next(v for row in parts for v in row)
    per_row = [{k: torch.cat([v[k] for v in row], dim=1) for k in first} if row else None for row in parts]
    n = max(r["pixel_values"].shape[1] for r in per_row if r is not None)
    out = {}
    for k, t in first.items():
        padded = []
        for r in per_row:
            x = r[k] if r is not None else t.new_zeros((1, 0, *t.shape[2:]))
            pad = x.new_zeros((1, n - x.shape[1], *x.shape[2:]))
            padded.append(torch.cat([x, pad], dim=1))
        out[k] = torch.cat(padded)
    return out


def _padded_model_inputs(rows: list[list[TokenizedExample]], length: int) -> "VisionInputs | None":
    """Padded layout: each row's example's images (so an example's images twice for a pair), and for
    M-RoPE models the rows' token types, from which the model computes its positions itself."""
    if not any(ex.vision for row in rows for ex in row):
        return None
    extra = {}
    if any(row[0].prompt_token_types is not None for row in rows):
        types = torch.zeros((len(rows), length), dtype=torch.long)
        for r, (ex,) in enumerate(rows):
            if ex.prompt_token_types is not None:
                types[r, :len(ex.prompt_token_types)] = ex.prompt_token_types
        extra["mm_token_type_ids"] = types
    return VisionInputs(rows, extra)


class VisionInputs(Mapping):
    """A batch's image keyword tensors (`Batch.model_inputs`), the pixels made by the processor when
    first read (`merge_vision`), not when the batch is collated: a forward given the images' cached
    features (`data.image_features`) reads only `examples()` (whose `vision.digest` names them) and
    `small()` (the grids and token types), and the pictures are never processed again."""

    def __init__(self, rows: list[list[TokenizedExample]], extra: dict[str, torch.Tensor], device=None):
        self.rows, self.extra, self.device = rows, extra, device
        self._made: dict[str, torch.Tensor] | None = None

    @classmethod
    def of(cls, rows: list[list[TokenizedExample]]) -> "VisionInputs | None":
        return cls(rows, {}) if any(ex.vision for row in rows for ex in row) else None

    def examples(self) -> list[TokenizedExample]:
        """The examples with images, once per time the forward reads their images, in that order."""
        return [ex for row in self.rows for ex in row if ex.vision]

    def _keys(self) -> list[str]:
        return [*self.examples()[0].vision.keys(), *self.extra]

    def __iter__(self):
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def __contains__(self, key) -> bool:  # (Mapping's would make the pixels to answer)
        return key in self._keys()

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors()[key]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor, the pixels made now (once per `VisionInputs`)."""
        if self._made is None:
            made = {**merge_vision(self.rows), **self.extra}
            self._made = {k: v.to(self.device, non_blocking=True) if self.device is not None else v
                          for k, v in made.items()}
        return self._made

    def small(self) -> dict[str, torch.Tensor] | None:
        """Every tensor but the pixels (`pixel_*`), without making them: the examples' kept small
        tensors (`ImageInputs`: grids, sizes) merged as `merge_vision` merges them, and the token
        types; None where that cannot be (images batched per row, or a tensor not kept)."""
        examples = self.examples()
        keys = [k for k in examples[0].vision if not k.startswith("pixel_")]
        kept = [getattr(ex.vision, "small", None) for ex in examples]
        if "pixel_attention_mask" in examples[0].vision and keys or \
                any(s is None or any(k not in s for k in keys) for s in kept):
            return None
        out = {**{k: torch.cat([s[k] for s in kept]) for k in keys}, **self.extra}
        return {k: v.to(self.device) for k, v in out.items()} if self.device is not None else out

    def to(self, device) -> "VisionInputs":
        moved = VisionInputs(self.rows, self.extra, device)
        if self._made is not None:
            moved._made = {k: v.to(device, non_blocking=True) for k, v in self._made.items()}
        return moved


def mrope_packed_positions(rows: list[list[TokenizedExample]], length: int) -> torch.Tensor:
    """(3, R, T) M-RoPE positions of a packed batch: each prompt's own (3, P) positions, each response
    restarting after the prompt (at its largest position + 1) in all three streams, as the padded
    row of that response has them; padding 0."""
    out = torch.zeros((3, len(rows), length), dtype=torch.long)
    for r, row in enumerate(rows):
        o = 0
        for ex in row:
            P = len(ex.prompt_ids)
            prompt = ex.prompt_positions if ex.prompt_positions is not None else torch.arange(P).expand(3, P)
            out[:, r, o:o + P] = prompt
            nxt = int(prompt.max()) + 1 if P else 0
            o += P
            for resp in ex.response_ids:
                out[:, r, o:o + len(resp)] = torch.arange(nxt, nxt + len(resp))
                o += len(resp)
    return out


def dense_packed_mask(segments: list[tuple[int, int, int, tuple[int, ...]]], rows: int, length: int) -> torch.Tensor:
    """(R, 1, T, T) boolean mask (True = attend) of a packed layout: causal, within a segment, and a
    response sees the prompt and itself but no other response."""
    segment = torch.full((rows, length), -1, dtype=torch.long)  # segment number, -1 = padding
    branch = torch.zeros((rows, length), dtype=torch.long)  # 0 = prompt, k + 1 = response k
    for n, (r, start, P, lens) in enumerate(segments):
        segment[r, start:start + P + sum(lens)] = n
        s = start + P
        for k, L in enumerate(lens):
            branch[r, s:s + L] = k + 1
            s += L
    idx = torch.arange(length)
    causal = idx[None, :, None] >= idx[None, None, :]
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0)
    visible_branch = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    mask = causal & same & visible_branch
    # Padding queries attend to themselves only, so attention rows are never empty (no NaN).
    mask |= torch.eye(length, dtype=torch.bool)[None] & (segment < 0)[:, :, None]
    return mask[:, None]


LAYOUTS = ("packed", "padded")


def make_collate(layout: str, pad_id: int, row_tokens: int | None = None):
    """examples -> Batch for a layout name ('packed': prefix-shared and packed; 'padded': plain)."""
    if layout == "packed":
        return lambda examples: collate_packed(examples, pad_id, row_tokens)
    if layout == "padded":
        return lambda examples: collate_padded(examples, pad_id)
    raise UserValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
