"""The last decoder layer computes only the rows the LM head reads.

A position's output of the last layer reaches the loss only through the head, and the head reads
the label positions alone (`Batch.label_pos`: the last prompt token and the response tokens). Every
other position of the last layer matters only through its keys and values — which the layer's
*own* queries read, and no later layer does. So in the last layer, for the positions the head does
not read (in an HH pair about half the tokens: the prompt's), the query projection, the attention,
the output projection and the MLP are wasted work; only the norm and the key/value projections are
needed, and those for the kept rows.

`narrow_last_layer(model, batch)` arranges that for one forward: the last layer's `q_proj`,
`o_proj` and `mlp` run on the kept rows only (a forward pre-hook gathers them, a forward hook puts
the result back into a zero tensor of the full shape: the other rows are never read), and in the
segment attention (`directpo.attention`) a prompt's queries are cut to its last token, the only
prompt row the head reads. Hooks act on whatever module is there (PEFT's LoRA layers, 4-bit
layers, the lean MLP), so the rest of the model is unchanged. The kept rows equal the full
computation within fp32 rounding (a matmul of fewer rows may sum in another order); gradients of the
parameters are the same sums over the rows that reach the loss.

Measured (2-core AVX2 EPYC): see docs/results/bench/cpu-headroom.md, "Fourth pass".

Not applied (the full layer runs) where a forward is recomputed in backward (activation
checkpointing: the recomputation would run without the hooks), where the model has no plain
decoder stack `layers` with `self_attn` and `mlp`, or when the rows kept would be most of them; a
mixture-of-experts MLP runs on every row (`narrowed_parts`).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .attention import activation_checkpointing, prompt_tail_only

WORTH = 0.9  # narrow only when the kept rows are at most this share of all rows


def last_decoder_layer(backbone: nn.Module) -> nn.Module | None:
    """The last layer of a decoder stack (`layers`, or a vision-language model's language model's),
    when it has the Llama-style parts (`self_attn`, `mlp`); else None."""
    for owner in (backbone, getattr(backbone, "language_model", None), getattr(backbone, "model", None)):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            layer = layers[-1]
            return layer if hasattr(layer, "self_attn") and isinstance(getattr(layer, "mlp", None), nn.Module) else None
    return None


def narrowed_parts(layer: nn.Module) -> list[nn.Module]:
    """The modules of `layer` that run on the kept rows: the query and output projections, and the MLP
    unless it routes tokens to experts (a mixture of experts may return its router's logits too, and
    its load balance is a statistic over all the rows)."""
    attn, mlp = layer.self_attn, layer.mlp
    parts = [getattr(attn, "q_proj", None), getattr(attn, "o_proj", None)]
    if not any(hasattr(mlp, a) for a in ("experts", "router", "gate")) or hasattr(mlp, "gate_proj"):
        parts.append(mlp)
    return [m for m in parts if isinstance(m, nn.Module)]


def _rows_only(module: nn.Module, keep: torch.Tensor) -> list:
    """Hooks making `module` compute rows `keep` of its (..., features) input only; the output keeps
    the input's leading shape, zeros in the other rows."""
    shape: list = []

    def gather(_, args):
        x = args[0]
        shape[:] = [x.shape[:-1]]
        return (x.reshape(-1, x.shape[-1]).index_select(0, keep).unsqueeze(0), *args[1:])

    def scatter(_, args, out):
        y = out.reshape(-1, out.shape[-1])
        full = y.new_zeros((shape[0].numel(), y.shape[-1])).index_copy(0, keep, y)
        return full.view(*shape[0], y.shape[-1])

    return [module.register_forward_pre_hook(gather), module.register_forward_hook(scatter)]


@contextlib.contextmanager
def narrow_last_layer(backbone: nn.Module, model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                      batch=None):
    """Within the block, `backbone`'s last layer computes only the rows at `positions` (flat indices
    into `input_ids`' (rows × length) tokens; repeats allowed) — see the module doc; nothing changes
    where it does not apply. With `batch`, a segment layout, its prompts' queries are cut too."""
    layer = last_decoder_layer(backbone)
    keep = torch.unique(positions) if layer is not None else None  # sorted
    if layer is None or activation_checkpointing(model) or keep.numel() > WORTH * input_ids.numel():
        yield
        return
    attn = layer.self_attn
    hooks = []
    try:
        for m in narrowed_parts(layer):
            hooks += _rows_only(m, keep)
        with prompt_tail_only(attn, batch) if batch is not None else contextlib.nullcontext():
            yield
    finally:
        for h in hooks:
            h.remove()
