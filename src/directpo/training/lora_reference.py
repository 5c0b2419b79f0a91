"""TR-DPO's moving reference for a LoRA policy: the shared frozen base plus a reference adapter of
its own, so a LoRA run still holds one copy of the base.

The policy's weights are W0 + s·B·A in every adapted linear layer (s = α_LoRA / r). The full
fine-tuning update πref ← α·πθ + (1−α)·πref mixes effective weights: W_ref ← α·(W0 + s·B·A) +
(1−α)·W_ref. With the base shared and frozen, W_ref = W0 + Δref and the update is

    Δref ← α·s·B·A + (1−α)·Δref

Mixing the factors instead (B_ref ← α·B + (1−α)·B_ref, A_ref likewise) would not give this: the
product of mixed factors is not the mix of products. So Δref is kept as a low-rank product whose
rank grows with each soft update: b_ref = [α·s·B | (1−α)·b_ref], a_ref = [A ; a_ref], i.e.
Δref = b_ref·a_ref exactly. A hard update (α = 1) replaces it by (s·B, A), rank r again. Once
the factors (k·(in + out) numbers) would be as large as the layer's dense delta (in·out), that
layer keeps Δref dense instead: after about in·out / (r·(in + out)) soft syncs (hidden 4096, r 16:
128), never more memory than one dense delta per adapted layer.

The reference pass runs the policy network with its adapters disabled and a forward hook on every
adapted layer adding x·Δrefᵀ. The reference adapter lives here rather than as a second PEFT
adapter because its rank changes at every soft update; it is saved in every checkpoint
(`state_dict`) and is never part of the saved policy.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserValueError


def lora_layers(policy) -> dict[str, nn.Module]:
    """{name: PEFT LoRA layer} of the adapted linear layers of `policy`, for its active adapter;
    refuses what this reference cannot mix exactly (DoRA and other variants, LoRA on embeddings,
    trainable weights outside the adapters)."""
    adapter = policy.active_adapter
    layers = {}
    for name, module in policy.named_modules():
        if adapter not in getattr(module, "lora_A", {}):
            continue
        if adapter in getattr(module, "lora_variant", {}) or type(module.lora_A[adapter]) is not nn.Linear:
            raise UserValueError(f"--ref-sync-every with LoRA: {name} is not a plain LoRA linear layer (DoRA or "
                                 "another variant); its reference cannot be mixed exactly")
        layers[name] = module
    extra = [n for n, p in policy.named_parameters() if p.requires_grad and ".lora_A." not in n
             and ".lora_B." not in n]
    if extra or not layers:
        raise UserValueError("--ref-sync-every with LoRA needs adapters on linear layers only (trainable: "
                             f"{(extra or ['nothing'])[0]} ...); adapt linear modules (--lora-target-modules)")
    return layers


class LoraReference:
    """πref = W0 + Δref in every adapted layer of a LoRA policy; starts as the policy's own adapters
    (zero delta for fresh ones, whose B is 0)."""

    def __init__(self, policy):
        self.policy = policy
        self.layers = lora_layers(policy)
        self.delta: dict[str, dict[str, torch.Tensor]] = {}
        for name, layer in self.layers.items():  # start empty (Δref = 0), then take the policy's adapters
            a = layer.lora_A[policy.active_adapter].weight
            b = layer.lora_B[policy.active_adapter].weight
            self.delta[name] = {"a": a.new_zeros((0, a.shape[1])), "b": b.new_zeros((b.shape[0], 0))}
        self.sync(1.0)

    @torch.no_grad()
    def sync(self, mix: float) -> None:
        """Δref ← α·s·B·A + (1−α)·Δref in every adapted layer (α = `mix`)."""
        adapter = self.policy.active_adapter
        for name, layer in self.layers.items():
            a = layer.lora_A[adapter].weight.detach()
            b = layer.lora_B[adapter].weight.detach() * (layer.scaling[adapter] * mix)
            old = self.delta[name]
            if mix >= 1:  # hard update: exactly the policy's delta
                new = {"a": a.clone(), "b": b}
            elif "dense" in old:
                new = {"dense": old["dense"].mul_(1 - mix).addmm_(b, a)}
            else:
                new = {"a": torch.cat([a, old["a"]]), "b": torch.cat([b, old["b"] * (1 - mix)], dim=1)}
                out_f, in_f = new["b"].shape[0], new["a"].shape[1]
                if new["a"].shape[0] * (in_f + out_f) >= in_f * out_f:  # as large as a dense delta
                    new = {"dense": new["b"] @ new["a"]}
            if "b" in new and not new["b"].any():  # B still 0 (a fresh adapter): Δref = 0, rank 0
                new = {"a": a[:0].clone(), "b": b[:, :0].clone()}
            self.delta[name] = new

    def state_dict(self) -> dict:
        return {name: {k: v.detach().cpu().clone() for k, v in d.items()} for name, d in self.delta.items()}

    def load_state_dict(self, state: dict) -> None:
        device = next(iter(self.layers.values())).lora_A[self.policy.active_adapter].weight.device
        self.delta = {name: {k: v.to(device) for k, v in state[name].items()} for name in self.layers}

    def rank(self) -> int:
        """The largest factor rank over the layers (a dense layer counts its full rank bound)."""
        return max(d["a"].shape[0] if "a" in d else min(d["dense"].shape) for d in self.delta.values())

    @contextlib.contextmanager
    def active(self):
        """Within the block the policy computes πref: adapters disabled, Δref added by hooks."""
        hooks = [layer.register_forward_hook(self._hook(name)) for name, layer in self.layers.items()]
        try:
            with self.policy.disable_adapter():
                yield
        finally:
            for h in hooks:
                h.remove()

    def _hook(self, name: str):
        def add_delta(module, args, out):
            d, x = self.delta[name], args[0]
            if "dense" in d:
                w = d["dense"]
                return out + F.linear(x if torch.is_autocast_enabled(x.device.type) else x.to(w.dtype), w).to(out.dtype)
            if not d["a"].shape[0]:
                return out
            a = d["a"]
            low = F.linear(x if torch.is_autocast_enabled(x.device.type) else x.to(a.dtype), a)
            return out + F.linear(low, d["b"]).to(out.dtype)
        return add_delta
