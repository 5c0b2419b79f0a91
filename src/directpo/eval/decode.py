"""A lean decode step for Llama-shaped causal LMs (issue #32): one new token per row through the
model's own weights, the same operations in the same order as transformers' Llama forward, without
its module machinery (the keyword plumbing, the per-layer wrappers, the mask builders). On `small`
(4 layers of width 256) that machinery is ~15 % of a decode step on this project's CPU, where a
step of 16 rows is a few small matmuls.

Used only where it is the same computation (`lean_decoder`): a Llama, Qwen2 or Mistral model in
fp32 whose every projection is a plain `nn.Linear` (no adapter, no quantized layer), SiLU MLPs,
full attention through SDPA (transformers' default). Anything else decodes through the model's own forward.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

LEAN_TYPES = ("llama", "qwen2", "mistral")
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def lean_decoder(model: nn.Module):
    """`step(tokens (B,), positions (B,), cache, mask (B, L) or None, attend) -> logits (B, V)` for
    `model`, or None where the lean step would not be transformers' computation."""
    config = getattr(model, "config", None)
    base, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if config is None or getattr(config, "model_type", None) not in LEAN_TYPES or head is None \
            or not hasattr(base, "layers") or hasattr(model, "peft_config"):  # (a PEFT model: its adapters' forward)
        return None
    if getattr(config, "hidden_act", None) != "silu" or getattr(config, "use_sliding_window", False):
        return None
    if getattr(config, "_attn_implementation", None) != "sdpa":  # (the lean step attends as SDPA does)
        return None
    if config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        return None
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return None
    if any(p.dtype != torch.float32 for p in model.parameters()) or type(head) is not nn.Linear:
        return None
    for layer in base.layers:
        mods = [getattr(layer.self_attn, n, None) for n in _PROJECTIONS] + [getattr(layer.mlp, n, None) for n in _MLP]
        if any(type(m) is not nn.Linear for m in mods) or hasattr(layer.self_attn, "q_norm"):
            return None
    return functools.partial(_step, model)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


@torch.no_grad()
def _step(model, tokens: torch.Tensor, positions: torch.Tensor, cache, mask: torch.Tensor | None, attend=None):
    """The logits of the next token of each row. `mask` (B, L): the rows' attended columns (left
    padding 0) for plain attention; `attend`: an attention function of transformers' interface
    (the shared-prompt one), which then reads its padding from its own context."""
    base = model.model
    B = tokens.shape[0]
    x = base.embed_tokens(tokens[:, None])
    cos, sin = base.rotary_emb(x, positions[:, None])
    cos, sin = cos[:, None], sin[:, None]
    pad = None
    if mask is not None and attend is None:
        pad = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(mask == 0, float("-inf"))
        pad = pad[:, None, None, :]
    for i, layer in enumerate(base.layers):
        a = layer.self_attn
        h = _norm(x, layer.input_layernorm)
        q = F.linear(h, a.q_proj.weight, a.q_proj.bias).view(B, 1, -1, a.head_dim).transpose(1, 2)
        k = F.linear(h, a.k_proj.weight, a.k_proj.bias).view(B, 1, -1, a.head_dim).transpose(1, 2)
        v = F.linear(h, a.v_proj.weight, a.v_proj.bias).view(B, 1, -1, a.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = cache.update(k, v, i)
        if attend is not None:
            o = attend(a, q, k, v, None, scaling=a.scaling)[0]
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=pad, scale=a.scaling,
                                               enable_gqa=k.shape[1] != q.shape[1]).transpose(1, 2)
        x = x + F.linear(o.reshape(B, 1, -1), a.o_proj.weight, a.o_proj.bias)
        h = _norm(x, layer.post_attention_layernorm)
        m = layer.mlp
        up = F.silu(F.linear(h, m.gate_proj.weight, m.gate_proj.bias)) * F.linear(h, m.up_proj.weight, m.up_proj.bias)
        x = x + F.linear(up, m.down_proj.weight, m.down_proj.bias)
    return F.linear(_norm(x, base.norm)[:, -1], model.lm_head.weight, model.lm_head.bias)
