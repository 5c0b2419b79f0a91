"""Exact attention for the prefix-shared layout, computed segment by segment (no dense mask).

In the packed layout an example is one segment `[prompt | r1 | r2 | ...]` and several segments
share a row. Expressed as a dense (T × T) mask, attention costs T² per row however little of it
is visible: for an HH pair (prompt ≈ 300 tokens, responses ≈ 80) the mask hides about half of the
square, and a row of several packed examples hides far more, so packing more examples made steps
*slower*. Here each segment is attended to on its own:

* the prompt and the first response are one causal sequence: one call without a mask (the kernel
  skips the blocks above the diagonal);
* the queries of the other responses attend to the segment's keys with a ((ΣL − L1) × (P + ΣL))
  additive mask: the prompt, and their own response up to themselves, never another response.

That is the visible part of the dense mask, so results equal the masked computation (and the plain
padded one), while attention costs (P + L1)²/2 + (ΣL − L1)·(P + ΣL) per example instead of T² per
row (the masked blocks of the first response's keys are the only waste, and no key is stored
twice for autograd), and whole micro-batches can live in one unpadded row. (Before, the prompt's
queries made one causal call and all responses' one masked call: 8 HH-like pairs' attention, forward
and backward, 31.6 → 26.7 ms a layer in isolation, ~1-2 % of a `small` step.) In the last layer,
where only each prompt's last query is read (`prompt_tail_only`), that query makes a call of its own
and all responses share the masked one.

How it plugs in: Hugging Face models that route attention through `AttentionInterface` call the
function registered under the name in `config._attn_implementation`. `segment_attention(model,
segments)` registers ours, points the model's configs at it for the duration of one forward, and
hands the layout to it through a context variable (autograd does not call it again in backward).
Models that don't use the interface, or whose attention is more than softmax(QKᵀ)V over a mask
(sliding windows, logit soft-capping, attention sinks), keep the dense-mask path.

Two kernels compute the same thing. On the CPU, per-segment SDPA calls (two per pair, above).
On CUDA, one FlexAttention call per layer over the whole micro-batch with a block mask built from
the layout (same segment, causal, a key of the prompt or of the query's own response): the GPU
runs one varlen-style kernel that skips the masked blocks, instead of a launch per segment.
`DIRECTPO_SEGMENT_KERNEL=sdpa|flex` overrides the choice (FlexAttention runs forward-only on the
CPU, slowly: the tests compare the two kernels there).
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserValueError
from .models import unwrap_peft

NAME = "directpo_segments"

# (row, start, prompt_len, response_lens): one per example, see `directpo.data.collate.Batch.segments`
Segment = tuple[int, int, int, tuple[int, ...]]

_PLAN: contextvars.ContextVar = contextvars.ContextVar("directpo_segment_plan", default=None)
# The attention module whose prompt queries are cut to the prompt's last token (`prompt_tail_only`).
_TAIL: contextvars.ContextVar = contextvars.ContextVar("directpo_prompt_tail", default=None)

# Config attributes that change attention beyond a mask over softmax(QKᵀ/√d)V: such models keep the
# dense-mask path (exact for them by construction).
_UNSUPPORTED_CONFIG = ("sliding_window", "attn_logit_softcapping", "attention_chunk_size")


class _Plan:
    """The segments of one batch cut into pieces, plus the response masks, reused by every layer."""

    def __init__(self, segments: list[Segment]):
        self.segments = segments
        self._rows: dict[bool, list] = {}
        self._masks: dict[tuple, torch.Tensor] = {}

    def rows(self, length: int, tail: bool = False):
        """Per row: (q_sizes, kv_sizes, items). Queries are cut into pieces: [prompt + first response,
        the other responses] (with `tail`: [prompt, responses]); keys and values into whole segments
        (padding gaps are pieces too); items are (q piece index, kv piece index, P, response lens)."""
        if tail not in self._rows:
            by_row: dict[int, list] = {}
            for r, start, P, lens in sorted(self.segments):
                by_row.setdefault(r, []).append((start, P, lens))
            rows = []
            for r in range(max(by_row) + 1):
                q_sizes, kv_sizes, items, end = [], [], [], 0
                for start, P, lens in by_row.get(r, []):
                    if start > end:  # padding before this segment
                        q_sizes.append(start - end)
                        kv_sizes.append(start - end)
                    items.append((len(q_sizes), len(kv_sizes), P, lens))
                    q_sizes += [P, sum(lens)] if tail else [P + lens[0]] + ([sum(lens[1:])] if len(lens) > 1 else [])
                    kv_sizes.append(P + sum(lens))
                    end = start + P + sum(lens)
                if end < length:
                    q_sizes.append(length - end)
                    kv_sizes.append(length - end)
                rows.append((q_sizes, kv_sizes, items))
            self._rows[tail] = rows
        return self._rows[tail]

    def token_layout(self, rows: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(segment, part), each (rows, length) int32: a token's segment index (−1: padding) and its
        part of the segment (0 the prompt, i the i-th response; −1 padding)."""
        seg = torch.full((rows, length), -1, dtype=torch.int32)
        part = torch.full((rows, length), -1, dtype=torch.int32)
        for n, (r, start, P, lens) in enumerate(self.segments):
            seg[r, start:start + P + sum(lens)] = n
            part[r, start:start + P] = 0
            s = start + P
            for i, L in enumerate(lens, 1):
                part[r, s:s + L] = i
                s += L
        return seg.to(device), part.to(device)

    def block_mask(self, rows: int, length: int, device):
        """FlexAttention's block mask of the layout (cached: every layer uses the same one)."""
        key = ("flex", rows, length, str(device))
        if key not in self._masks:
            from torch.nn.attention.flex_attention import create_block_mask

            seg, part = self.token_layout(rows, length, device)

            def visible(b, h, q, k):
                # same segment (padding sees padding only: no empty rows), causal, and a key of the
                # prompt or of the query's own response
                return (seg[b, q] == seg[b, k]) & (k <= q) & ((part[b, k] == 0) | (part[b, k] == part[b, q]))

            self._masks[key] = create_block_mask(visible, rows, None, length, length, device=device)
        return self._masks[key]

    def response_mask(self, P: int, lens: tuple[int, ...], dtype: torch.dtype, device, skip: int = 0) -> torch.Tensor:
        """((ΣL − L_skip) × (P + ΣL)) mask of the queries of responses `skip`.. against the segment's
        keys: every response token sees the whole prompt and the tokens of its own response up to
        itself, never another response. Additive (0 / −inf) in `dtype`: SDPA would convert a boolean
        mask anew at every call, and its CPU kernel reads either kind alike."""
        key = (P, lens, skip, dtype, str(device))
        m = self._masks.get(key)
        if m is None:
            n, s0 = sum(lens), sum(lens[:skip])
            seen = torch.zeros(n - s0, P + n, dtype=torch.bool)
            seen[:, :P] = True
            s = s0
            for L in lens[skip:]:
                seen[s - s0:s - s0 + L, P + s:P + s + L] = torch.ones(L, L, dtype=torch.bool).tril()
                s += L
            m = torch.zeros(seen.shape, dtype=dtype).masked_fill_(~seen, float("-inf")).to(device)
            self._masks[key] = m
        return m


def _segment_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """AttentionInterface function: (B, H, T, D) query/key/value -> ((B, T, H, D) output, None)."""
    plan = _PLAN.get()
    if plan is None:
        raise RuntimeError(f"the {NAME!r} attention runs only inside directpo.attention.segment_attention()")
    for k in ("sliding_window", "softcap", "s_aux", "position_bias"):
        if kwargs.get(k) is not None:
            raise UserValueError(f"{type(module).__name__} passes {k!r} to its attention, which the segment attention "
                                 "does not implement; use the padded layout (--layout padded)")
    if _use_flex(query, dropout):
        out = _flex()(query, key, value, block_mask=plan.block_mask(query.shape[0], query.shape[2], query.device),
                      scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
        return out.transpose(1, 2).contiguous(), None
    kw = dict(dropout_p=dropout, scale=scaling)
    tail = _TAIL.get() is module
    if key.shape[1] != query.shape[1]:
        kw["enable_gqa"] = True
    # Rows are cut into pieces with `split` (never by per-segment slicing: a slice's backward is a
    # zero tensor the size of the whole row plus an add, so cost grew with segments × row length;
    # a split's backward is one concatenation). Pieces stay 4D, (1, heads, len, D): SDPA's fused CPU
    # kernel wants 4D inputs. Keys/values are one piece per segment, used as they are by both calls,
    # so autograd keeps no copies of the prompt's keys.
    outs = []
    for q_row, k_row, v_row, (q_sizes, kv_sizes, items) in zip(query.split(1), key.split(1), value.split(1),
                                                                 plan.rows(query.shape[2], tail)):
        qs, ks, vs = q_row.split(q_sizes, dim=2), k_row.split(kv_sizes, dim=2), v_row.split(kv_sizes, dim=2)
        parts = [None] * len(qs)
        for qi, kvi, P, lens in items:
            k, v = ks[kvi], vs[kvi]
            if tail:  # only the last prompt token's row is read (it sees the whole prompt); zeros above it
                last = F.scaled_dot_product_attention(qs[qi][:, :, -1:], k[:, :, :P], v[:, :, :P], **kw)
                parts[qi] = (qs[qi].new_zeros((*qs[qi].shape[:2], P - 1, qs[qi].shape[3])), last)
                parts[qi + 1] = F.scaled_dot_product_attention(
                    qs[qi + 1], k, v, attn_mask=plan.response_mask(P, lens, query.dtype, query.device), **kw)
                continue
            # The prompt and the first response are one causal sequence: one maskless call (the
            # kernel skips the blocks above the diagonal); the other responses see the prompt and
            # themselves through a mask.
            first = P + lens[0]
            k1, v1 = (k, v) if len(lens) == 1 else (k.split([first, k.shape[2] - first], dim=2)[0],
                                                    v.split([first, v.shape[2] - first], dim=2)[0])
            parts[qi] = F.scaled_dot_product_attention(qs[qi], k1, v1, is_causal=True, **kw)
            if len(lens) > 1:
                parts[qi + 1] = F.scaled_dot_product_attention(
                    qs[qi + 1], k, v, attn_mask=plan.response_mask(P, lens, query.dtype, query.device, skip=1), **kw)
        for n, part in enumerate(parts):
            if part is None:  # padding: zeros (nothing reads them)
                parts[n] = qs[n].new_zeros(qs[n].shape)
        outs.append(torch.cat([t for part in parts for t in (part if isinstance(part, tuple) else (part,))], dim=2))
    out = torch.cat(outs)
    return out.transpose(1, 2).contiguous(), None


def _use_flex(query: torch.Tensor, dropout: float) -> bool:
    """FlexAttention on CUDA (no dropout: it has none), per-segment SDPA elsewhere; overridable."""
    choice = os.environ.get("DIRECTPO_SEGMENT_KERNEL", "auto")
    if choice not in ("auto", "flex", "sdpa"):
        raise UserValueError(f"DIRECTPO_SEGMENT_KERNEL must be auto, flex or sdpa; got {choice!r}")
    if choice == "sdpa" or dropout:
        return False
    return choice == "flex" or (query.is_cuda and _flex() is not None)


_FLEX: list = []


def _flex():
    """flex_attention, compiled on CUDA (its fused kernel; eager it materialises the scores), or None
    where this torch has none."""
    if not _FLEX:
        try:
            from torch.nn.attention.flex_attention import flex_attention
        except ImportError:
            flex_attention = None
        if flex_attention is not None and torch.cuda.is_available():
            flex_attention = torch.compile(flex_attention, dynamic=True)
        _FLEX.append(flex_attention)
    return _FLEX[0]


def _no_mask(*args, **kwargs):
    """Mask builder for our attention name: the layout travels in the plan, not in a mask tensor."""
    return None


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, _segment_attention)
    AttentionMaskInterface.register(NAME, _no_mask)
    _registered = True


def all_configs(config) -> list:
    """A config and all its sub-configs (composite models keep one per sub-model)."""
    out, todo = [], [config]
    while todo:
        c = todo.pop()
        if c is None or any(c is o for o in out):
            continue
        out.append(c)
        todo.extend(getattr(c, k, None) for k in getattr(c, "sub_configs", {}) or {})
    return out


def language_configs(config) -> list:
    """The configs of the language model: a text model's own (and its sub-configs); a vision-language
    model's text config alone, so that its vision tower keeps its own attention (an image's patches
    attend to each other, not as a segment of the text)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return all_configs(text)


def activation_checkpointing(model: nn.Module) -> bool:
    """True when `model` recomputes layer forwards during backward (outside any context we set)."""
    m = unwrap_peft(model)
    flag = getattr(m, "is_activation_checkpointing", None)
    return bool(flag if flag is not None else getattr(m, "is_gradient_checkpointing", False))


def supports_segment_attention(model: nn.Module) -> bool:
    """True when `model` computes attention through AttentionInterface as plain masked softmax attention
    (and does not recompute layers in backward, where the segment layout would be gone)."""
    m = unwrap_peft(model)
    config = getattr(m, "config", None)
    if config is None or not getattr(type(m), "_supports_attention_backend", False):
        return False
    if activation_checkpointing(m):
        return False
    for c in language_configs(config):
        if any(getattr(c, a, None) is not None for a in _UNSUPPORTED_CONFIG):
            return False
        if any(t != "full_attention" for t in (getattr(c, "layer_types", None) or [])):
            return False
    return True


def sliding_window(model: nn.Module) -> int | None:
    """The smallest sliding attention window of `model`'s configs, or None."""
    m = unwrap_peft(model)
    config = getattr(m, "config", None)
    windows = [getattr(c, "sliding_window", None) for c in (language_configs(config) if config is not None else [])]
    windows = [w for w in windows if isinstance(w, int)]
    return min(windows) if windows else None


@contextlib.contextmanager
def attention_implementation(model: nn.Module, name: str):
    """Within the block `model`'s language model (every sub-model of a composite one, a
    vision-language model's vision tower excepted) attends with the attention function registered
    under `name` in transformers' `AttentionInterface`; as before after it."""
    configs = language_configs(unwrap_peft(model).config)
    saved = [c._attn_implementation_internal for c in configs]
    try:
        for c in configs:
            c._attn_implementation_internal = name
        yield
    finally:
        for c, before in zip(configs, saved):
            c._attn_implementation_internal = before


@contextlib.contextmanager
def prompt_tail_only(module: nn.Module, batch):
    """Within the block, the segment attention of `module` (one attention layer) computes, of each
    prompt's queries, the last token's only: for the last layer, whose other prompt rows nothing reads
    (`directpo.narrow`). Only where `batch` is a segment layout whose label positions include no
    earlier prompt token (else nothing changes)."""
    token = _TAIL.set(module if _only_prompt_tails(batch) else None)
    try:
        yield
    finally:
        _TAIL.reset(token)


def _only_prompt_tails(batch) -> bool:
    """True when no label position of a segment batch is a prompt token other than the prompt's last."""
    if batch.segments is None:
        return False
    rows, length = batch.input_ids.shape
    early = torch.zeros(rows * length, dtype=torch.bool)
    for r, start, P, _ in batch.segments:
        early[r * length + start:r * length + start + P - 1] = True
    return not bool(early[batch.label_pos.cpu()].any())


@contextlib.contextmanager
def segment_attention(model: nn.Module, segments: list[Segment]):
    """Within the block, `model`'s attention layers attend segment by segment (see module doc)."""
    _register()
    token = _PLAN.set(_Plan(segments))
    try:
        with attention_implementation(model, NAME):
            yield
    finally:
        _PLAN.reset(token)
