"""Exact attention for the prefix-shared layout, computed segment by segment (no dense mask).

In the packed layout an example is one segment `[prompt | r1 | r2 | ...]` and several segments
share a row. Expressed as a dense (T × T) mask, attention costs T² per row however little of it
is visible: for an HH pair (prompt ≈ 300 tokens, responses ≈ 80) the mask hides about half of the
square, and a row of several packed examples hides far more, so packing more examples made steps
*slower*. Here each segment is attended to on its own:

* prompt queries attend to the prompt, causally;
* the queries of response k attend to [prompt keys | their own earlier keys] (an L × (P + L)
  block), never to another response.

That is exactly the visible part of the dense mask, so results equal the masked computation (and
the plain padded one) while attention FLOPs drop to P²/2 + Σ_k (P·L_k + L_k²/2) per example, and
whole micro-batches can live in one unpadded row.

How it plugs in: Hugging Face models that route attention through `AttentionInterface` call the
function registered under the name in `config._attn_implementation`. `segment_attention(model,
segments)` registers ours, points the model's configs at it for the duration of one forward, and
hands the layout to it through a context variable (autograd does not call it again in backward).
Models that don't use the interface, or whose attention is more than softmax(QKᵀ)V over a mask
(sliding windows, logit soft-capping, attention sinks), keep the dense-mask path.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn

NAME = "directpo_segments"

# (row, start, prompt_len, response_lens): one per example, see `directpo.data.collate.Batch.segments`
Segment = tuple[int, int, int, tuple[int, ...]]

_PLAN: contextvars.ContextVar = contextvars.ContextVar("directpo_segment_plan", default=None)

# Config attributes that change attention beyond a mask over softmax(QKᵀ/√d)V: such models keep the
# dense-mask path (exact for them by construction).
_UNSUPPORTED_CONFIG = ("sliding_window", "attn_logit_softcapping", "attention_chunk_size")


class _Plan:
    """The segments of one batch, plus the (L × (P + L)) response masks reused by every layer."""

    def __init__(self, segments: list[Segment]):
        self.segments = segments
        self._pieces = None
        self._masks: dict[tuple[int, int, str], torch.Tensor] = {}

    def row_pieces(self, length: int):
        """Per row: the consecutive pieces covering [0, length) and their sizes; a piece is None
        (padding), ("prompt",) or ("response", index of its prompt's piece, P, L)."""
        if self._pieces is None:
            self._pieces = self._cut(length)
        return self._pieces

    def _cut(self, length: int):
        rows: dict[int, tuple[list, list]] = {}
        for r, start, P, lens in self.segments:
            pieces, sizes = rows.setdefault(r, ([], []))
            end = sum(sizes)
            if start > end:
                pieces.append(None)
                sizes.append(start - end)
            p = len(pieces)
            pieces.append(("prompt",))
            sizes.append(P)
            for L in lens:
                pieces.append(("response", p, P, L))
                sizes.append(L)
        out = []
        for r in range(max(rows) + 1):
            pieces, sizes = rows.get(r, ([], []))
            if sum(sizes) < length:
                pieces.append(None)
                sizes.append(length - sum(sizes))
            out.append((pieces, sizes))
        return out

    def response_mask(self, P: int, L: int, device) -> torch.Tensor:
        key = (P, L, str(device))
        m = self._masks.get(key)
        if m is None:  # query j of the response sees the whole prompt and response keys 0..j
            m = torch.ones(L, P + L, dtype=torch.bool, device=device).tril(P)
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
            raise ValueError(f"{type(module).__name__} passes {k!r} to its attention, which the segment attention "
                             "does not implement; use the padded layout (--layout padded)")
    kw = dict(dropout_p=dropout, scale=scaling)
    if key.shape[1] != query.shape[1]:
        kw["enable_gqa"] = True
    # Cut each row into consecutive pieces once (`split`), never by per-segment slicing: the backward
    # of a slice is a zero tensor of the whole row plus an add, which made the cost grow with
    # segments × row length; the backward of `split` is a single concatenation.
    outs = []
    # (1, heads, len, D) pieces: SDPA's fused CPU kernel wants 4D inputs (3D ones take the slow math path)
    rows = zip(query.split(1), key.split(1), value.split(1), plan.row_pieces(query.shape[2]))
    for q_row, k_row, v_row, (pieces, sizes) in rows:
        qs, ks, vs = (t.split(sizes, dim=2) for t in (q_row, k_row, v_row))
        parts = []
        for n, piece in enumerate(pieces):
            if piece is None:  # padding: zeros (nothing reads them)
                parts.append(qs[n].new_zeros(qs[n].shape))
            elif piece[0] == "prompt":
                parts.append(F.scaled_dot_product_attention(qs[n], ks[n], vs[n], is_causal=True, **kw))
            else:  # ("response", index of its prompt piece, P, L)
                _, p, P, L = piece
                kb, vb = torch.cat([ks[p], ks[n]], dim=2), torch.cat([vs[p], vs[n]], dim=2)
                mask = plan.response_mask(P, L, query.device)
                parts.append(F.scaled_dot_product_attention(qs[n], kb, vb, attn_mask=mask, **kw))
        outs.append(torch.cat(parts, dim=2))
    out = torch.cat(outs)
    return out.transpose(1, 2).contiguous(), None


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


def _unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP / FSDP / PEFT wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        else:
            return model


def _configs(config) -> list:
    """A config and all its sub-configs (composite models keep one per sub-model)."""
    out, todo = [], [config]
    while todo:
        c = todo.pop()
        if c is None or any(c is o for o in out):
            continue
        out.append(c)
        todo.extend(getattr(c, k, None) for k in getattr(c, "sub_configs", {}) or {})
    return out


def supports_segment_attention(model: nn.Module) -> bool:
    """True when `model` computes attention through AttentionInterface as plain masked softmax attention."""
    m = _unwrap(model)
    config = getattr(m, "config", None)
    if config is None or not getattr(type(m), "_supports_attention_backend", False):
        return False
    for c in _configs(config):
        if any(getattr(c, a, None) is not None for a in _UNSUPPORTED_CONFIG):
            return False
        if any(t != "full_attention" for t in (getattr(c, "layer_types", None) or [])):
            return False
    return True


def sliding_window(model: nn.Module) -> int | None:
    """The smallest sliding attention window of `model`'s configs, or None."""
    m = _unwrap(model)
    windows = [getattr(c, "sliding_window", None) for c in _configs(getattr(m, "config", None))]
    windows = [w for w in windows if isinstance(w, int)]
    return min(windows) if windows else None


@contextlib.contextmanager
def segment_attention(model: nn.Module, segments: list[Segment]):
    """Within the block, `model`'s attention layers attend segment by segment (see module doc)."""
    _register()
    configs = _configs(_unwrap(model).config)
    saved = [c._attn_implementation_internal for c in configs]
    token = _PLAN.set(_Plan(segments))
    try:
        for c in configs:
            c._attn_implementation_internal = NAME
        yield
    finally:
        for c, s in zip(configs, saved):
            c._attn_implementation_internal = s
        _PLAN.reset(token)
