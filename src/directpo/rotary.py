"""Rotary position embeddings in fewer passes: the same numbers as the modelling code's, bit for bit.

Llama-style models rotate queries and keys with `apply_rotary_pos_emb`: q·cos + rotate_half(q)·sin,
where rotate_half(q) = cat(−q₂, q₁) of q's two halves. Op by op that is seven element-wise passes
over (tokens × heads × head_dim) per tensor (a product, two slices, a negation, a concatenation,
a product, a sum) and as many in backward, including the slices' zero-filled gradients; on a `small`
CPU step ~3 % of the time. `_Rotary` computes out = q·cos, then subtracts q₂·sin₁ from its first half
and adds q₁·sin₂ to its second: every element sees the same two rounded products and the same
rounded sum as before ((−a)·b = −(a·b) and x + (−y) = x − y exactly), so the values are identical,
and its backward is the transposed rotation, the gradients identical too (each a sum of the same
two rounded terms). Measured in cpu-headroom.md (seventh pass).

`fused_rotary(model)` swaps it in for one forward: the modelling module of each attention layer of
`model` whose `apply_rotary_pos_emb` and `rotate_half` are exactly Llama's (their code compared as
parsed: Llama, Mistral, Qwen2/3, Gemma ... copy them) reads ours for the block; the module's own
function comes back after it. Only on the CPU: elsewhere a model may have been kernelized with a hub
kernel for these functions, which the swap would bypass.
"""
from __future__ import annotations

import ast
import contextlib
import inspect
import sys

import torch
from torch import nn


class _Rotary(torch.autograd.Function):
    """x·cos + rotate_half(x)·sin for x (..., head_dim), cos and sin broadcast against it."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        h = x.shape[-1] // 2
        out = x * cos
        out[..., :h] -= x[..., h:] * sin[..., :h]
        out[..., h:] += x[..., :h] * sin[..., h:]
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        h = grad.shape[-1] // 2
        dx = grad * cos  # d/dx of x·cos, plus the rotation's transpose: dx₁ += g₂·sin₂, dx₂ −= g₁·sin₁
        dx[..., :h] += grad[..., h:] * sin[..., h:]
        dx[..., h:] -= grad[..., :h] * sin[..., :h]
        return dx, None, None


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Llama's `apply_rotary_pos_emb` through `_Rotary`. Where dtypes mix (under autocast q is bf16,
    cos fp32) autograd would round each gradient term to q's dtype before summing them, and cos and
    sin never need a gradient but could: the reference formula runs then."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    if cos.requires_grad or sin.requires_grad or not q.dtype == k.dtype == cos.dtype == sin.dtype:
        return tuple(x * cos + torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), dim=-1) * sin
                     for x in (q, k))
    return _Rotary.apply(q, cos, sin), _Rotary.apply(k, cos, sin)


# The reference: Llama's two functions as transformers writes them (docstrings and decorators aside).
_REFERENCE = """
def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)

def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed
"""


def _functions(source: str) -> dict[str, str]:
    """Top-level function name -> its arguments and body as parsed (docstring and decorators left out)."""
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                body = body[1:]
            out[node.name] = ast.dump(node.args) + "".join(ast.dump(stmt) for stmt in body)
    return out


_WANTED = _functions(_REFERENCE)
_standard: dict[str, bool] = {}


def _is_standard(module_name: str) -> bool:
    """True when the module's `rotate_half` and `apply_rotary_pos_emb` are Llama's, as parsed code."""
    if module_name not in _standard:
        mod = sys.modules.get(module_name)
        try:
            found = _functions(inspect.getsource(mod)) if hasattr(mod, "apply_rotary_pos_emb") else {}
        except (OSError, TypeError, SyntaxError):
            found = {}
        _standard[module_name] = all(found.get(name) == code for name, code in _WANTED.items())
    return _standard[module_name]


@contextlib.contextmanager
def fused_rotary(model: nn.Module):
    """Within the block, the attention layers of `model` whose modelling module has Llama's rotary
    functions rotate with `_Rotary` (see module doc); on the CPU only. Yields how many modules."""
    names = set()
    if next(model.parameters()).device.type == "cpu":
        names = {n for n in {type(m).__module__ for m in model.modules()} if _is_standard(n)}
    saved = {n: sys.modules[n].apply_rotary_pos_emb for n in names}
    try:
        for n in names:
            sys.modules[n].apply_rotary_pos_emb = apply_rotary_pos_emb
        yield len(names)
    finally:
        for n, fn in saved.items():
            sys.modules[n].apply_rotary_pos_emb = fn
