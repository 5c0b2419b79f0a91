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

Two kernels compute the same thing. On the CPU, per-segment calls of SDPA's fused kernel (two per
pair, above), all made by one autograd node (`_SegmentFlash`) that calls the kernel and its backward
directly and writes each call's output and gradients into their rows: no pieces concatenated, no
zero-filled gradients summed, no transposed copy of the output (one layer's attention for 8 HH
micro-batches of 8 pairs, forward + backward, alternating in one process: 187 → 168 ms; the values
and gradients bit for bit SDPA's). With dropout, and on CUDA where FlexAttention is not used, the
same calls go through `F.scaled_dot_product_attention` with autograd.
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
# One kernel call: query rows [q0, q1) of a batch row against its key rows [k0, k1), causal, or through
# the response mask of (P, lens, skip) (`_Plan.response_mask`), or neither: (q0, q1, k0, k1, causal, mask)
Call = tuple[int, int, int, int, bool, tuple | None]

_PLAN: contextvars.ContextVar = contextvars.ContextVar("directpo_segment_plan", default=None)
# The attention module whose prompt queries are cut to the prompt's last token (`prompt_tail_only`).
_TAIL: contextvars.ContextVar = contextvars.ContextVar("directpo_prompt_tail", default=None)

# Config attributes that change attention beyond a mask over softmax(QKᵀ/√d)V: such models keep the
# dense-mask path (exact for them by construction).
_UNSUPPORTED_CONFIG = ("sliding_window", "attn_logit_softcapping", "attention_chunk_size")


class _Plan:
    """The segments of one batch as kernel calls (`calls`), plus the response masks, reused by every layer."""

    def __init__(self, segments: list[Segment]):
        self.segments = segments
        self._calls: dict[bool, list] = {}
        self._masks: dict[tuple, torch.Tensor] = {}

    def calls(self, length: int, tail: bool = False) -> list:
        """Per row: (segments, q_gaps, kv_gaps). A segment is its list of kernel calls `Call`, the one
        that reads all the segment's keys last: [prompt + first response (causal), the other responses
        (masked)]; with `tail`: [the prompt's last query, all responses (masked)], the prompt's other
        queries then being a gap. Gaps: (start, end) ranges of query or key rows no call covers
        (padding; in the output zeros, which nothing reads)."""
        if tail not in self._calls:
            by_row: dict[int, list] = {}
            for r, start, P, lens in sorted(self.segments):
                by_row.setdefault(r, []).append((start, P, lens))
            rows = []
            for r in range(max(by_row) + 1):
                segments, q_gaps, kv_gaps, end = [], [], [], 0
                for s, P, lens in by_row.get(r, []):
                    if s > end:
                        q_gaps.append((end, s))
                        kv_gaps.append((end, s))
                    e = s + P + sum(lens)
                    if tail:  # the last prompt token's query sees the whole prompt; the rows above it are unread
                        calls = [(s + P - 1, s + P, s, s + P, False, None), (s + P, e, s, e, False, (P, lens, 0))]
                        q_gaps.append((s, s + P - 1))
                    else:
                        f = s + P + lens[0]
                        calls = [(s, f, s, f, True, None), (f, e, s, e, False, (P, lens, 1))]
                    segments.append([c for c in calls if c[1] > c[0]])  # (an empty response makes no call)
                    end = e
                if end < length:
                    q_gaps.append((end, length))
                    kv_gaps.append((end, length))
                rows.append((segments, [g for g in q_gaps if g[1] > g[0]], kv_gaps))
            self._calls[tail] = rows
        return self._calls[tail]

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
    rows = plan.calls(query.shape[2], _TAIL.get() is module)
    if dropout or query.device.type != "cpu":
        return _attend_through_sdpa(query, key, value, rows, plan, dropout, scaling), None
    if torch.is_autocast_enabled("cpu"):  # as SDPA under autocast: the kernel in autocast's dtype
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = (t.to(dtype) if t.is_floating_point() else t for t in (query, key, value))
    masks = {m: plan.response_mask(m[0], m[1], query.dtype, query.device, m[2]) for row in rows
             for calls in row[0] for *_, m in calls if m is not None}
    return _SegmentFlash.apply(query, key, value, rows, masks, scaling), None


def _flash(*args, **kwargs):  # (one place to reach the CPU kernel: tests count the calls)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*args, **kwargs)


def _flash_backward(*args, **kwargs):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(*args, **kwargs)


class _SegmentFlash(torch.autograd.Function):
    """The calls of `_Plan.calls` through SDPA's fused CPU kernel, forward and backward, in one autograd
    node: each call's output (and gradient) is written into its rows of one (rows, T, heads, D)
    tensor, the layout the kernel writes itself and the o projection reads, so no piece is concatenated,
    no gradient is zero-filled then summed, and the output needs no transposed copy. The same kernel
    calls as `F.scaled_dot_product_attention` makes (same values and gradients); the gradients of a
    segment's keys are the whole-segment call's plus the first call's, added in place."""

    @staticmethod
    def forward(ctx, query, key, value, rows, masks, scale):
        R, H, T, D = query.shape
        out, lses = query.new_empty((R, T, H, D)), []
        for r, (segments, q_gaps, _) in enumerate(rows):
            q, k, v, o = (t.narrow(0, r, 1) for t in (query, key, value, out))
            for calls in segments:
                for q0, q1, k0, k1, causal, m in calls:
                    piece, lse = _flash(q.narrow(2, q0, q1 - q0), k.narrow(2, k0, k1 - k0), v.narrow(2, k0, k1 - k0),
                                        0.0, causal, attn_mask=masks.get(m), scale=scale)
                    o.narrow(1, q0, q1 - q0).copy_(piece.transpose(1, 2))
                    lses.append(lse)
            for a, b in q_gaps:
                o.narrow(1, a, b - a).zero_()
        ctx.rows, ctx.masks, ctx.scale = rows, masks, scale
        ctx.save_for_backward(query, key, value, out, *lses)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, out, *lses = ctx.saved_tensors
        dq = torch.empty_like(out)
        dk, dv = (t.new_empty((t.shape[0], t.shape[2], t.shape[1], t.shape[3])) for t in (key, value))
        n = 0
        for r, (segments, q_gaps, kv_gaps) in enumerate(ctx.rows):
            q, k, v, o, g, gq, gk, gv = (t.narrow(0, r, 1) for t in (query, key, value, out, grad, dq, dk, dv))
            o, g = o.transpose(1, 2), g.transpose(1, 2)  # (1, heads, T, D), as the kernel handed out
            for calls in segments:
                # the call over all the segment's keys first: its key gradients are copied, the other's added
                for j in reversed(range(len(calls))):
                    q0, q1, k0, k1, causal, m = calls[j]
                    nq, nk = q1 - q0, k1 - k0
                    dqi, dki, dvi = _flash_backward(
                        g.narrow(2, q0, nq), q.narrow(2, q0, nq), k.narrow(2, k0, nk), v.narrow(2, k0, nk),
                        o.narrow(2, q0, nq), lses[n + j], 0.0, causal, attn_mask=ctx.masks.get(m), scale=ctx.scale)
                    gq.narrow(1, q0, nq).copy_(dqi.transpose(1, 2))
                    if j == len(calls) - 1:
                        gk.narrow(1, k0, nk).copy_(dki.transpose(1, 2))
                        gv.narrow(1, k0, nk).copy_(dvi.transpose(1, 2))
                    else:
                        gk.narrow(1, k0, nk).add_(dki.transpose(1, 2))
                        gv.narrow(1, k0, nk).add_(dvi.transpose(1, 2))
                n += len(calls)
            for t, gaps in ((gq, q_gaps), (gk, kv_gaps), (gv, kv_gaps)):
                for a, b in gaps:
                    t.narrow(1, a, b - a).zero_()
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None, None, None


def _attend_through_sdpa(query, key, value, rows, plan: _Plan, dropout: float, scale) -> torch.Tensor:
    """The calls of `_Plan.calls` through `F.scaled_dot_product_attention` with autograd: with dropout,
    and off the CPU when FlexAttention is not used."""
    kw = dict(dropout_p=dropout, scale=scale, enable_gqa=key.shape[1] != query.shape[1])
    outs = []
    for r, (segments, q_gaps, _) in enumerate(rows):
        pieces = [(a, query[r:r + 1, :, a:b].new_zeros((1, query.shape[1], b - a, query.shape[3]))) for a, b in q_gaps]
        for q0, q1, k0, k1, causal, m in (c for calls in segments for c in calls):
            mask = None if m is None else plan.response_mask(m[0], m[1], query.dtype, query.device, m[2])
            pieces.append((q0, F.scaled_dot_product_attention(query[r:r + 1, :, q0:q1], key[r:r + 1, :, k0:k1],
                                                              value[r:r + 1, :, k0:k1], attn_mask=mask,
                                                              is_causal=causal, **kw)))
        outs.append(torch.cat([p for _, p in sorted(pieces, key=lambda x: x[0])], dim=2))
    return torch.cat(outs).transpose(1, 2).contiguous()


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
