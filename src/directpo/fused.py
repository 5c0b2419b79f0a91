"""A leaner SwiGLU MLP for training: the same numbers, half the MLP activations kept for backward.

A Llama-style MLP computes `down(silu(gate(x)) * up(x))`. Run op by op, autograd keeps four
(tokens × intermediate) tensors per layer until backward: gate(x) for silu, silu(gate(x)) and
up(x) for the product, and the product for `down`. With intermediate ≈ 2.7 × hidden those are the
largest activations of the whole model (42 % of what a DPO step on the `base` fixture keeps).

`_SwiGLUDown` keeps gate(x) and up(x) only and recomputes silu and the product in backward (two
element-wise passes; the matmul is not recomputed). The forward runs the same operations in the
same order, so outputs are bit-identical; so are the gradients (autograd's own kernels, in its order).

Without autograd (the reference pass, scoring, evaluation) nothing is kept, but op by op the
forward holds three (tokens × intermediate) tensors at once (gate, silu(gate), up, then the
product); `_nograd_forward` computes silu and the product in place in gate's buffer: two at once,
the same values (measured: a `base` no-grad forward of 1536 tokens peaks 8 MiB lower, one such tensor).

`lean_mlp(model)` swaps this in, for the duration of a forward, on every MLP module whose forward is
exactly that expression (checked on its source, so any architecture written that way qualifies:
Llama, Mistral, Qwen2/3, OLMo 2, ...) with a SiLU activation and a down projection that is a plain
`nn.Linear` or PEFT's LoRA-wrapped one (gate and up are called as they are, LoRA or not). Under
LoRA the down projection is base(h) + B(A(h))·s: `_SwiGLUDown` computes the adapter's branch too,
in PEFT's order, and its backward gives A and B their gradients from the recomputed product, so a
LoRA run keeps two (tokens × intermediate) tensors per layer fewer as well. Anything else on the
down projection (dropout, DoRA and other variants, several active adapters, an adapter bias) runs
the module's own forward.

`lean_lora(model)` swaps a leaner forward into every PEFT LoRA-wrapped linear layer (vanilla
adapter, as above): base(x) + B(A(x))·s with the adapter's product added into the base output in
place (one addmm_), where PEFT's forward makes three (tokens × out) temporaries per layer (B's
output, its scaled copy, the sum). The saved tensors are the same; what changes is the churn of
short-lived buffers, which glibc's heap keeps: `small` with LoRA r 16, micro-batch 8, peaked 815 →
676 MiB, `base` 1881–1929 → 1411–1432 MiB (docs/results/bench/cpu-headroom.md). Not bit-identical
to PEFT (one fused product and sum): equal within fp32 rounding.

Both take bitsandbytes' 4-bit base layers (nf4/fp4, QLoRA) too: `_SwiGLUDown` dequantizes the
down projection's packed weight for the forward's matmul and again in the backward, with
bitsandbytes' own kernel (`_dense`), so no dense copy is kept; the lean LoRA forward runs the 4-bit
base layer itself and adds the adapter's product to its output without PEFT's defensive clone. The
same log-probs and adapter gradients as bitsandbytes + PEFT within 1e-5 (fp32); LLM.int8 layers
run their own forward.

`lean_norms(model)` does the same for RMSNorm (`weight * (x · rsqrt(mean(x²) + ε))`): run op by op,
autograd keeps the input and the normalised input, two (tokens × hidden) tensors per norm;
`_RMSNorm` keeps the input and the per-token rsqrt only and recomputes the normalised input in
backward (one multiply). Two norms per layer: 2·hidden of the ~35·hidden floats a `base` layer
keeps per token. Same forward (bit-identical), gradients by the closed form
dx = r · (g − x̂ · mean(g · x̂)), g = dy · w, x̂ = x · r.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from .attention import activation_checkpointing

_SWIGLU_SOURCE = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"
# Llama's RMSNorm forward (Mistral, Qwen2/3, OLMo 2 ... copy it); Gemma's (1 + weight) does not match
_RMSNORM_SOURCE = ("input_dtype = hidden_states.dtype", "hidden_states = hidden_states.to(torch.float32)",
                   "variance = hidden_states.pow(2).mean(-1, keepdim=True)",
                   "hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)",
                   "return self.weight * hidden_states.to(input_dtype)")
_sources: dict[type, str] = {}


class _SwiGLUDown(torch.autograd.Function):
    """down(silu(gate) * up) with only gate and up saved; with LoRA factors (lora_a: r × i, lora_b:
    o × r) the down projection is base(h) + B(A(h))·scaling, PEFT's vanilla adapter."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, lora_a=None, lora_b=None, scaling=1.0):
        h = F.silu(gate) * up
        out = F.linear(h, _dense(weight), bias)
        if lora_a is not None:  # PEFT's expression and order: result + lora_B(lora_A(x)) * scaling
            out = out + F.linear(F.linear(h, lora_a), lora_b) * scaling
        # a 4-bit weight is kept as the packed parameter itself (its quant_state is an attribute of it)
        ctx.packed = weight if hasattr(weight, "quant_state") else None
        ctx.save_for_backward(gate, up, None if ctx.packed is not None else weight, lora_a, lora_b)
        ctx.has_bias, ctx.scaling = bias is not None, scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, weight, lora_a, lora_b = ctx.saved_tensors
        weight = ctx.packed if ctx.packed is not None else weight
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        # Under autocast the forward ran in a lower precision than the fp32 weights; backward runs
        # outside autocast, so cast as autograd's own cast nodes would.
        grad_h = grad_out @ _dense(weight).to(grad_out.dtype)  # d out / d (silu · up)
        if lora_a is not None:
            g_lora = g2 * ctx.scaling  # d out / d B(A(h)), for both factors' gradients
            grad_a = g_lora @ lora_b.to(grad_out.dtype)  # d out / d A(h), (tokens × r)
            grad_h.add_((grad_a @ lora_a.to(grad_out.dtype)).view_as(grad_h))
        grad_h = grad_h.to(gate.dtype)
        silu = F.silu(gate)  # the forward's values
        grad_up = grad_h * silu
        # autograd's own steps for silu(gate) · up, bit for bit: d/d silu = grad_h · up (in grad_h's
        # buffer), then silu's backward kernel, one pass, written over it: five (tokens ×
        # intermediate) passes in all, where building silu' = σ·(1 + g·(1 − σ)) op by op took eleven
        grad_gate = torch.ops.aten.silu_backward.grad_input(grad_h.mul_(up), gate, grad_input=grad_h)
        grad_w = grad_b = grad_la = grad_lb = None
        need_w, need_la, need_lb = (ctx.needs_input_grad[i] for i in (2, 4, 5))
        if need_w or need_la or need_lb:
            h = silu.mul_(up).to(grad_out.dtype)  # the forward's product, in silu's buffer
            h2 = h.reshape(-1, h.shape[-1])
            if need_w:
                grad_w = (g2.t() @ h2).to(weight.dtype)
            if need_la:
                grad_la = (grad_a.t() @ h2).to(lora_a.dtype)
            if need_lb:
                grad_lb = (g_lora.t() @ (h2 @ lora_a.to(h2.dtype).t())).to(lora_b.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = g2.sum(0).to(weight.dtype)
        return grad_gate, grad_up, grad_w, grad_b, grad_la, grad_lb, None


_LORA_PARTS = ("base_layer", "lora_A", "lora_B", "lora_dropout", "scaling", "active_adapters")


def _is_4bit(layer: nn.Module) -> bool:
    """bitsandbytes' 4-bit linear layer (nf4/fp4, QLoRA's base), recognised without importing it."""
    return type(layer).__module__.startswith("bitsandbytes") and type(layer).__name__ in \
        ("Linear4bit", "LinearNF4", "LinearFP4") and hasattr(getattr(layer, "weight", None), "quant_state")


def _dense(weight: torch.Tensor) -> torch.Tensor:
    """A plain weight as it is; a bitsandbytes 4-bit one dequantized, exactly as its own matmul does
    it (the same kernel, into the dtype it was quantized from), for one matmul: `_SwiGLUDown` keeps
    the packed 4-bit weight for its backward and dequantizes it again there, so no layer's dense
    weight outlives its matmul (bitsandbytes' own autograd function does the same)."""
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(weight.data, state)


def _is_lora_linear(module: nn.Module) -> bool:
    """PEFT's LoRA-wrapped nn.Linear or bitsandbytes 4-bit linear, recognised by its parts (no import
    of peft here)."""
    return all(hasattr(module, n) for n in _LORA_PARTS) and \
        (type(module.base_layer) is nn.Linear or _is_4bit(module.base_layer))


def _lora_parts(layer: nn.Module) -> tuple | None:
    """What a lean computation needs of a plain or PEFT LoRA-wrapped linear layer at this forward:
    (weight, bias, lora_a, lora_b, scaling), lora_a None where the adapter does not run (plain,
    disabled, merged: PEFT runs the base layer alone then), or None where it must run its own
    forward (dropout, DoRA and other variants, several active adapters, adapter biases)."""
    if type(layer) is nn.Linear or _is_4bit(layer):
        layer, base = None, layer
    else:
        base = layer.base_layer
    # bitsandbytes repacks a 4-bit weight for its CPU inference kernel (AVX512-BF16, eval mode): a
    # layout `_dense` does not read; the layer's own forward then
    if getattr(getattr(base.weight, "quant_state", None), "packing_format_for_cpu", False):
        return None
    if layer is None:
        return base.weight, base.bias, None, None, 1.0
    if layer.disable_adapters or layer.merged:  # merged: the base weight holds B·A·s
        return base.weight, base.bias, None, None, 1.0
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if not active:
        return base.weight, base.bias, None, None, 1.0
    if len(active) > 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    a = active[0]
    la, lb = layer.lora_A[a], layer.lora_B[a]
    if not (type(layer.lora_dropout[a]) is nn.Identity and type(la) is nn.Linear and type(lb) is nn.Linear
            and la.bias is None and lb.bias is None):
        return None
    return base.weight, base.bias, la.weight, lb.weight, layer.scaling[a]


def _lean_forward(self, x):
    parts = _lora_parts(self.down_proj)
    if parts is None:
        return type(self).forward(self, x)
    return _SwiGLUDown.apply(self.gate_proj(x), self.up_proj(x), *parts)


def _forward_source(cls: type) -> str:
    """The source of a module class's forward ("" where it cannot be read), read once per class."""
    if cls not in _sources:
        try:
            _sources[cls] = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            _sources[cls] = ""
    return _sources[cls]


def _qualifies(module: nn.Module) -> bool:
    if _SWIGLU_SOURCE not in _forward_source(type(module)):
        return False
    projections = all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj"))
    down = getattr(module, "down_proj", None)
    down_ok = isinstance(down, nn.Module) and (type(down) is nn.Linear or _is_4bit(down) or _is_lora_linear(down))
    act = getattr(module, "act_fn", None)
    return projections and down_ok and (type(act) is nn.SiLU or type(act).__name__ == "SiLUActivation")


def _nograd_forward(self, x):
    """Without autograd: silu and the product in place in gate(x)'s buffer, so two (tokens ×
    intermediate) tensors exist at once instead of three (the same values: the same functions on
    the same inputs; a reference pass, scoring, evaluation)."""
    return self.down_proj(F.silu(self.gate_proj(x), inplace=True).mul_(self.up_proj(x)))


@contextlib.contextmanager
def _swap_forwards(model: nn.Module, qualifies, forward, nograd_forward=None):
    """Within the block, every module of `model` that `qualifies` runs `forward` (without autograd:
    `nograd_forward`, or its own forward when None: nothing is kept then); yields how many. With
    activation checkpointing the layers run again in backward, after this block has put the
    original forward back: nothing is swapped then."""
    swapped = []
    if not torch.is_grad_enabled():
        forward = nograd_forward
    elif activation_checkpointing(model):
        forward = None
    if forward is not None:
        for m in model.modules():
            if "forward" not in m.__dict__ and qualifies(m):
                m.forward = forward.__get__(m)
                swapped.append(m)
    try:
        yield len(swapped)
    finally:
        for m in swapped:
            del m.forward


def _lean_lora_forward(self, x, *args, **kwargs):
    """PEFT's vanilla LoRA linear, base(x) + B(A(x))·s, with the adapter's product added into the
    base output in place (one addmm_) instead of three (tokens × out) temporaries: the lora_B
    output, its scaled copy and the sum. Same autograd graph otherwise (A(x) kept for B's gradient,
    x for A's, the frozen base weight for x's)."""
    parts = None if args or kwargs else _lora_parts(self)
    if parts is None:
        return type(self).forward(self, x, *args, **kwargs)
    weight, bias, la, lb, scaling = parts
    # a 4-bit base through bitsandbytes' own forward (its autograd function keeps the packed weight
    # only), and PEFT's clone of that output skipped: nothing saves it
    out = self.base_layer(x) if _is_4bit(self.base_layer) else F.linear(x, weight, bias)
    if la is not None:
        # PEFT casts x to the adapter's dtype (under autocast the matmul casts it anyway)
        low = F.linear(x if torch.is_autocast_enabled(x.device.type) else x.to(la.dtype), la)
        flat = out.view(-1, out.shape[-1])
        # addmm_ is outside autocast's lists: cast its operands to the output's precision, as
        # autocast would have cast the out-of-place product
        args = (low.reshape(-1, low.shape[-1]).to(out.dtype), lb.to(out.dtype).t())
        if out._base is None:
            flat.addmm_(*args, alpha=scaling)
        else:  # bitsandbytes' output with a bias is a view made inside its autograd function, which
            # autograd refuses to change in place: one new (tokens × out) tensor then (PEFT: three)
            out = torch.addmm(flat, *args, alpha=scaling).view_as(out)
    return out


def lean_lora(model: nn.Module):
    """Within the block, PEFT LoRA-wrapped linear layers of `model` add their adapter's product in
    place (`_lean_lora_forward`), with or without autograd."""
    return _swap_forwards(model, _is_lora_linear, _lean_lora_forward, _lean_lora_forward)


def lean_mlp(model: nn.Module):
    """Within the block, qualifying MLPs of `model` run `_SwiGLUDown` (see module doc), or without
    autograd `_nograd_forward`."""
    return _swap_forwards(model, _qualifies, _lean_forward, _nograd_forward)


class _RMSNorm(torch.autograd.Function):
    """weight · (x · rsqrt(mean(x²) + ε)) with only x and the rsqrt saved."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.to(torch.float32)  # the same ops as the module's forward, in the same order
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        out = weight * (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, rstd, weight = ctx.saved_tensors
        return (*_norm_grads(x, rstd, weight, grad_out, ctx.needs_input_grad[0], ctx.needs_input_grad[1]), None)


def _norm_grads(x, rstd, weight, grad_out, need_x: bool, need_w: bool):
    """`_RMSNorm`'s gradients, dx = r · (g − x̂ · mean(g · x̂)) with g = dy · w, x̂ = x · r (fp32), and
    dw = Σ dy · x̂, in three buffers: x̂, dy · x̂ (reused for g · x̂ where it is fp32) and g, each
    operation in place where its input is a buffer of ours. Every product, mean and difference is
    rounded as op by op (tested equal bit for bit). A `small` HH micro-batch has 9 norms over
    (~2,000 × 256): one backward 4.4–5.0 → 3.5–4.0 ms against six buffers, caches flushed before
    each (two runs of 40 alternating repeats)."""
    xhat = x.to(torch.float32) * rstd
    t = grad_out * xhat.to(x.dtype) if need_w else None
    grad_w = t.reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype) if need_w else None
    grad_x = None
    if need_x:
        g = (grad_out * weight).to(torch.float32)
        gx = torch.mul(g, xhat, out=t) if t is not None and t.dtype == torch.float32 else g * xhat
        m = gx.mean(-1, keepdim=True)
        grad_x = g.sub_(xhat.mul_(m)).mul_(rstd).to(x.dtype)
    return grad_x, grad_w


def _lean_norm_forward(self, hidden_states):
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _norm_qualifies(module: nn.Module) -> bool:
    src = _forward_source(type(module))  # exactly Llama's lines (and nothing more than a signature)
    if not all(line in src for line in _RMSNORM_SOURCE) or src.count("\n") > len(_RMSNORM_SOURCE) + 2:
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() == 1 and \
        isinstance(getattr(module, "variance_epsilon", None), float)


def lean_norms(model: nn.Module):
    """Within the block, qualifying RMSNorms of `model` run `_RMSNorm` (see module doc)."""
    return _swap_forwards(model, _norm_qualifies, _lean_norm_forward)
