"""Sequence log-probabilities log π(y|x) = Σ_t log π(y_t | x, y_<t), without full-vocabulary logits.

A causal LM's forward normally returns logits of shape (rows, length, vocab): for a batch of 16
sequences of 512 tokens and a 32k vocabulary that is 1 GiB in fp32, and autograd keeps it (and its
log_softmax) alive until backward. DPO only needs the log-prob of each *label* token of each
*response*, so we:

1. run the model's backbone to hidden states (rows, length, hidden);
2. gather only the positions whose next token is a response label (prompt and padding never reach
   the LM head — for HH-RLHF that skips ~70 % of the head's work);
3. push those through the LM head in chunks, keeping per chunk only the label logit and the
   logsumexp; the backward pass recomputes each chunk's logits instead of storing them (all but the
   last chunk's: its buffer stays for the backward, which needs one such buffer anyway).

Peak memory of the head is then O(chunk × vocab), independent of batch size and length.

Any batch layout (padded, packed, prefix-shared) reduces to the same three index vectors, see
`directpo.data.collate.Batch`: ``label_pos`` (which hidden state predicts the label), ``label_ids``
and ``label_seq`` (which response sequence the label belongs to).
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .attention import segment_attention, sliding_window, supports_segment_attention
from .data.image_features import forward_inputs
from .errors import UserValueError
from .fused import lean_lora, lean_mlp, lean_norms
from .models import mask_suppressed_, suppressed_token, unwrap_peft
from .narrow import narrow_last_layer
from .rotary import fused_rotary

# Config attributes that make an LM head more than `hidden @ W.T (+ b)`: models carrying any of them
# take the plain path (the model's own logits), so results stay exact for every architecture.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier",
                     "lm_head_multiplier", "logits_scaling")

_CHUNK_ELEMENTS = 1 << 23  # ≈ 32 MiB of fp32 logits per chunk


def chunk_rows(vocab: int) -> int:
    """Rows of hidden states per LM-head chunk: ~32 MiB of fp32 logits, at least 16 rows."""
    return max(16, _CHUNK_ELEMENTS // max(vocab, 1))


class _LabelLogProbs(torch.autograd.Function):
    """log softmax(h @ W.T + b)[label] for each row of h, computed and differentiated in chunks;
    with `banned` (a suppressed token: `models.suppress_token`) its column is masked first, so the
    softmax is over the rest of the vocabulary."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk, keep=False, banned=None):
        n = hidden.shape[0]
        acc = _acc_dtype(hidden)
        out = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        w = weight.to(hidden.dtype)
        b = None if bias is None else bias.to(hidden.dtype)
        ctx.kept = None
        for s in range(0, n, chunk):
            h = hidden[s:s + chunk]
            logits = mask_suppressed_(_logits(h, w, b, _buffer(weight, h, w, min(n, chunk))), banned)
            if logits.device.type == "cpu":  # (the in-place softmax is checked on the CPU's kernel)
                _softmax_logprobs_(logits, out[s:s + chunk], labels[s:s + chunk], lse[s:s + chunk],
                                   lambda rows: mask_suppressed_(_logits(h[rows], w, b), banned))
                sums = None
            else:
                sums = _exp_shifted_(logits, out[s:s + chunk], labels[s:s + chunk], lse[s:s + chunk])
                out[s:s + chunk] -= lse[s:s + chunk]
            if keep and s + chunk >= n:
                # The last chunk's buffer now holds the softmax (on the CPU) or exp(l − max) per row
                # (its softmax is that over the row's sum), so the backward starts from it instead of
                # recomputing the chunk's logits (one (chunk × hidden × vocab) matmul and two passes over
                # the chunk fewer). It adds nothing to the peak: the backward needs one such buffer
                # anyway, and the backbone's activations are already at their largest here.
                ctx.kept = (logits, sums)
            del logits  # before the next chunk's logits exist
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk, ctx.banned = chunk, banned
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        chunk = ctx.chunk
        kept, ctx.kept = ctx.kept, None  # consumed in place: a second backward (retain_graph) recomputes
        w = weight.to(hidden.dtype)
        b = None if bias is None else bias.to(hidden.dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = _acc_dtype(hidden)
        grad_w = None  # the first chunk's product, then accumulated (no zero-filled start)
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        starts = list(range(0, hidden.shape[0], chunk))
        if kept is not None:  # the kept (last) chunk first, so that it is freed before another exists
            starts = starts[-1:] + starts[:-1]
        for s in starts:
            h = hidden[s:s + chunk]
            g = grad_out[s:s + chunk, None].to(acc)
            # d logp[label] / d logits = onehot(label) − softmax(logits), built in place in the
            # chunk's logits: one (chunk × vocab) buffer instead of four (logits, shifted, probs,
            # their product)
            if kept is not None:  # (the first chunk of the loop: the one kept)
                dlogits, sums = kept
                kept = None
                # softmax · (−g), or exp(l − max) · (−g / Σ exp(l − max))
                dlogits.mul_(g.neg() if sums is None else g.neg().div_(sums[:, None]))
            else:
                dlogits = mask_suppressed_(_logits(h, w, b, _buffer(weight, h, w, chunk)), ctx.banned)
                dlogits.sub_(lse[s:s + chunk, None]).exp_().mul_(-g)  # exp(l − lse) · (−g)
            dlogits.scatter_add_(1, labels[s:s + chunk, None], g)
            dl = dlogits.to(hidden.dtype)
            if need_h:
                grad_h[s:s + chunk] = dl @ w
            if need_w:
                if grad_w is None:
                    grad_w = (dl.t() @ h).to(acc)
                elif dl.dtype == acc:  # accumulate inside the matmul: no (vocab × hidden) temporary
                    grad_w.addmm_(dl.t(), h)
                else:
                    grad_w += (dl.t() @ h).to(acc)
            if need_b:
                grad_b += dlogits.sum(0)
            del dlogits, dl  # before the next chunk's logits exist
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def _exp_shifted_(logits: torch.Tensor, label_out: torch.Tensor, labels: torch.Tensor,
                  lse_out: torch.Tensor) -> torch.Tensor:
    """Each row's logsumexp into `lse_out`, consuming `logits` in place, after copying each row's
    label logit into `label_out`; returns Σ exp(l − max) per row, and leaves exp(l − max) in
    `logits`. `torch.logsumexp` would allocate a second (chunk × vocab) buffer for exp(logits − max),
    doubling the head's forward peak (32 → 64 MiB per chunk in fp32)."""
    label_out.copy_(logits.gather(1, labels[:, None]).squeeze(1))
    top = logits.amax(dim=-1, keepdim=True)
    # a row of −inf (or +inf) logits would give inf − inf = NaN; torch.logsumexp shifts by 0 there
    top.masked_fill_(~torch.isfinite(top), 0)
    sums = logits.sub_(top).exp_().sum(dim=-1)
    torch.log(sums, out=lse_out).add_(top.squeeze(1))
    return sums


# Below this probability a label's softmax value may have been rounded through subnormal numbers
# (exp(l − max) and 1/Σ are both normal above it): such rows are recomputed exactly.
_P_FLOOR = 2.0 ** -100


def _softmax_logprobs_(logits: torch.Tensor, label_out: torch.Tensor, labels: torch.Tensor,
                       lse_out: torch.Tensor, row_logits) -> None:
    """Each row's label log-prob into `label_out` and logsumexp into `lse_out`, leaving the softmax in
    `logits`, in place: one row-by-row pass of ATen's fused softmax (each row's max, exp and sum
    while the row is in cache) instead of four passes over the whole chunk (max, shift, exp, sum):
    800 × 8,192 fp32 logits, 7.5–8.2 → 5.0–5.4 ms. log p is as accurate as l − logsumexp(l) (fp64-checked);
    where p < 2^-100 (a log-prob below −69) the row's logits are recomputed (`row_logits(rows)`) and
    its log-prob taken as l − logsumexp(l), so no log-prob loses digits to underflow."""
    label_logit = logits.gather(1, labels[:, None]).squeeze(1)
    torch.softmax(logits, -1, out=logits)
    p = logits.gather(1, labels[:, None]).squeeze(1)
    torch.log(p, out=label_out)
    torch.sub(label_logit, label_out, out=lse_out)  # log Σ exp(l) = l_label − log p_label
    low = (p < _P_FLOOR).nonzero().squeeze(1)
    if low.numel():
        exact = row_logits(low).to(logits.dtype)
        row_lse = torch.logsumexp(exact, dim=-1)
        label_out[low] = exact.gather(1, labels[low, None]).squeeze(1) - row_lse
        lse_out[low] = row_lse


def _acc_dtype(hidden: torch.Tensor) -> torch.dtype:
    """Softmax statistics and results in fp32 at least (fp64 stays fp64, for gradcheck)."""
    return torch.promote_types(hidden.dtype, torch.float32)


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    if out is not None:  # (h already in the accumulation dtype: `_buffer`)
        torch.mm(h, w.t(), out=out)
        return out if b is None else out.add_(b)
    logits = h @ w.t()
    if b is not None:
        logits = logits + b
    return logits.to(_acc_dtype(h))


class _Reused:
    """The LM head's (chunk × vocab) logits buffer on the CPU, reused from chunk to chunk and step to
    step. A fresh one per chunk is the largest allocation of a step (32 MiB), and glibc hands it out
    as new pages whenever its heap was trimmed, or always when the block is over its 32 MiB mmap
    ceiling (a full chunk is): 7,500–8,500 page faults, ~15 ms, on such a chunk of a `small` step.
    Reused, its pages stay mapped. One view of it is out at a time: while the last one handed out is
    alive (a kept chunk awaiting its backward, another graph's), `take` gives None and the caller
    allocates, as before. Its cost: the largest chunk seen stays resident while the head's weight
    lives (≤ 32 MiB; the `small` bench's peak RSS 693 → 706 MiB, means of four runs)."""

    def __init__(self):
        self.buf: torch.Tensor | None = None
        self.out = None  # weak reference to the view handed out last

    def take(self, rows: int, cols: int, dtype: torch.dtype, capacity: int) -> torch.Tensor | None:
        if self.out is not None and self.out() is not None:
            return None
        if self.buf is None or self.buf.dtype != dtype or self.buf.numel() < rows * cols:
            self.buf = None  # (freed before its successor exists)
            self.buf = torch.empty(max(capacity, rows) * cols, dtype=dtype)
        view = self.buf[:rows * cols].view(rows, cols)
        self.out = weakref.ref(view)
        return view


_REUSED = WeakIdKeyDictionary()  # an LM head's weight -> its _Reused buffer (freed with the weight)


def _buffer(weight: torch.Tensor, h: torch.Tensor, w: torch.Tensor, capacity: int) -> torch.Tensor | None:
    """A reused buffer for the logits h @ w.T (`capacity` rows), or None: off the CPU (CUDA's caching
    allocator already reuses its blocks) and where the logits are cast to another dtype."""
    if h.device.type != "cpu" or h.dtype != _acc_dtype(h) or w.dtype != h.dtype:
        return None
    reused = _REUSED.get(weight)
    if reused is None:
        reused = _REUSED[weight] = _Reused()
    return reused.take(h.shape[0], w.shape[0], h.dtype, capacity)


def label_logprobs(hidden: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor,
                   chunk: int | None = None) -> torch.Tensor:
    """Per-row log-prob of `labels` under the LM head, fp32, without (rows × vocab) kept for backward."""
    chunk = chunk or chunk_rows(lm_head.weight.shape[0])
    # Under autocast, matmuls inside a custom Function would be recast behind our back; we pick the
    # dtype ourselves (the hidden states' dtype for the matmul, fp32 for logsumexp and the result).
    # Under bf16 autocast the hidden states arrive in fp32 (the residual stream stays fp32), so the
    # head stays fp32 too: a bf16 head put the tiny test model's per-sequence log-probs ~5× further
    # from fp32's (7e-3 against 1.5e-3), for 5-17 % of a step's matmul FLOPs (bench `base`, `small`).
    keep = torch.is_grad_enabled() and (hidden.requires_grad or lm_head.weight.requires_grad)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return _LabelLogProbs.apply(hidden, lm_head.weight, lm_head.bias, labels, chunk, keep,
                                    suppressed_token(lm_head))


def head_logprobs(head: nn.Linear, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`label_logprobs` through the head module's own call, so that hooks on the head run as for
    its ordinary forward: FSDP2 gathers a sharded head's weight for the call (and again for its
    backward, then reduce-scatters its gradient), accelerate's offload hooks bring it to the device.
    The module's forward is swapped for the call only (an instance attribute shadows the class's)."""
    if "forward" in head.__dict__:  # someone else's swap: do not stack ours on it
        return label_logprobs(hidden, head, labels)
    head.forward = lambda h, lab: label_logprobs(h, head, lab)
    try:
        return head(hidden, labels)
    finally:
        del head.forward


def _backbone_and_head(model: nn.Module):
    """The decoder stack and the LM head when the head is a plain linear map; else None."""
    model = unwrap_peft(model)
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text_config, a, None) not in (None, 1, 1.0) for a in _LOGIT_TRANSFORMS):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, "base_model", None)
    if not isinstance(head, nn.Linear) or backbone is None or backbone is model:
        return None
    return backbone, head


def _attention_mask(model: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """A boolean 4D mask (True = attend) as the model's attention implementation wants it."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config  # the language model's
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    if impl == "sdpa":
        return mask
    if impl == "eager":  # eager attention adds the mask to the scores
        dtype = next(model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise UserValueError(f"the packed layout needs 'sdpa' or 'eager' attention, this model uses {impl!r}; "
                         "use the padded layout (--layout padded)")


ONE_ROW = 1 << 40  # a row capacity no micro-batch reaches: everything in one row


def packed_row_tokens(row_tokens: int | None, *models: nn.Module | None) -> int | None:
    """Row capacity for the packed layout: `row_tokens` when set; else the whole micro-batch in one
    unpadded row when every model that will read the batches attends segment by segment, or rows as
    long as the longest example when one needs a dense mask (its cost grows with the row squared)."""
    if row_tokens:
        return row_tokens
    return ONE_ROW if all(supports_segment_attention(m) for m in models if m is not None) else None


def token_logps(model: nn.Module, batch, fused: bool = True, segmented: bool = True) -> torch.Tensor:
    """Log-prob of every label token of `batch` (shape (N,), fp32), in `batch.label_pos` order.

    A packed batch is attended segment by segment (`directpo.attention`) when the model allows it
    and `segmented`; otherwise through the dense mask its segments describe.
    """
    parts = _backbone_and_head(model) if fused else None
    kwargs = dict(input_ids=batch.input_ids, use_cache=False)
    if batch.position_ids is not None:
        kwargs["position_ids"] = batch.position_ids
    images = forward_inputs(model, batch)  # images: their pixels (the VLM runs its tower) or cached features
    if images:
        kwargs.update(images)
    attend = contextlib.nullcontext()
    if batch.segments is None:
        kwargs["attention_mask"] = batch.attention_mask
    elif segmented and supports_segment_attention(model):
        attend = segment_attention(model, batch.segments)
    else:
        window = sliding_window(model)
        longest = max(P + sum(lens) for _, _, P, lens in batch.segments)
        if window is not None and longest > window:
            # A prepared 4D mask replaces the model's own masking, window included.
            raise UserValueError(f"this model attends within a sliding window of {window} tokens and an example here "
                                 f"is {longest} tokens long: the packed layout cannot express the window; use "
                                 "--layout padded")
        kwargs["attention_mask"] = _attention_mask(model, batch.dense_mask())
    with attend, lean_mlp(model), lean_norms(model), lean_lora(model), fused_rotary(model):
        if parts is not None:
            backbone, head = parts
            # the last layer's rows the head does not read are not computed (directpo.narrow)
            with narrow_last_layer(backbone, model, batch.input_ids, batch.label_pos, batch):
                hidden = backbone(**kwargs).last_hidden_state
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.label_pos)
            return head_logprobs(head, hidden, batch.label_ids)
        # Plain path: the model's own logits (exact for heads with softcapping or scaling).
        logits = model(**kwargs).logits
    logits = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.label_pos).float()
    mask_suppressed_(logits, suppressed_token(model))
    return logits.gather(1, batch.label_ids[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def sum_per_sequence(values: torch.Tensor, batch) -> torch.Tensor:
    """Σ of per-token values per response sequence, accumulated in fp64 (fp32 where a device has
    no fp64): a summed log-prob of −3000 has fp32 steps of 2.4e-4, and token-by-token fp32
    accumulation drifts by several of them."""
    acc = torch.float32 if values.device.type == "mps" else torch.float64
    out = torch.zeros(batch.num_seqs, dtype=acc, device=values.device).index_add(0, batch.label_seq, values.to(acc))
    return out.to(values.dtype)


def sequence_logps(model: nn.Module, batch, fused: bool = True, segmented: bool = True) -> torch.Tensor:
    """Σ of label-token log-probs per response sequence: shape (batch.num_seqs,), fp32."""
    return sum_per_sequence(token_logps(model, batch, fused=fused, segmented=segmented), batch)


def per_example(batch, seq_values: torch.Tensor) -> torch.Tensor:
    """(num_seqs,) -> (B, K): response k of example i at [i, k]; NaN where example i has fewer."""
    idx = batch.seq_index
    return seq_values[idx.clamp(min=0)].masked_fill(idx < 0, float("nan"))


def example_logps(model: nn.Module, batch, fused: bool = True, unlikelihood: bool = False,
                  segmented: bool = True):
    """(B, K) summed response log-probs; with `unlikelihood=True` also (B, K) Σ_t −log(1 − p_t)."""
    tok = token_logps(model, batch, fused=fused, segmented=segmented)
    seq = sum_per_sequence(tok, batch)
    if not unlikelihood:
        return per_example(batch, seq)
    from .losses import unlikelihood_terms

    return per_example(batch, seq), per_example(batch, sum_per_sequence(unlikelihood_terms(tok), batch))


@torch.no_grad()
def dataset_logps(model: nn.Module, examples, collate, batch_size: int = 8, device="cpu",
                  autocast_dtype: torch.dtype | None = None, progress: str | None = None) -> torch.Tensor:
    """(len(examples), K) response log-probs of a fixed model over a dataset, in input order.

    `collate` maps a list of examples to a Batch (`directpo.data.make_collate`). Batches are formed
    from length-sorted examples (less padding); results go back to input order.
    """
    was_training = model.training
    model.eval()
    K = max(len(ex.response_ids) for ex in examples)
    out = torch.full((len(examples), K), float("nan"))
    order = sorted(range(len(examples)), key=lambda i: examples[i].num_tokens)
    chunks = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    it = chunks
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(chunks, desc=progress, unit="batch", mininterval=1.0)
    for idx in it:
        batch = collate([examples[i] for i in idx]).to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            lp = example_logps(model, batch)
        out[idx, :lp.shape[1]] = lp.float().cpu()
    model.train(was_training)
    return out
