"""Model shapes, the model-FLOP count of a training step, and the measured matmul peak.

Model FLOPs (forward + backward, useful work only: no padding, no recomputation)
    F = 6·N·T + 6·h·V·Lab + 12·layers·d_attn·A
    N: parameters outside the input embedding and the LM head; h: hidden size; V: vocabulary;
    d_attn = heads × head_dim; T: tokens run through the backbone; Lab: label (response) tokens that
    reach the LM head; A: query–key pairs attended (causal: len²/2 for a sequence of len tokens).
    directpo (prefix-shared): T = P + ΣL_k, A = P²/2 + Σ_k (P·L_k + L_k²/2).
    TRL (one row per prompt + response; its fused LM head also scores label tokens only):
    T = Σ_k (P + L_k), A = Σ_k (P + L_k)²/2, counted from the tensors TRL actually received.
    A live reference model adds its forward pass, F/3. Precomputed reference log-probs are computed
    before the timed steps and not counted.
    LoRA (`frozen`: the backbone's and head's weights take no gradient, both systems alike): the
    backward computes input gradients only, so 4·N·T + 4·h·V·Lab (the adapters' r-wide matmuls are
    left out: r ≪ h), and a live reference (the adapters off) adds half of that.
    GFLOP/s is F over the timed steps / their time; "% of peak" divides by the matmul peak
    measured here (large square matmuls, same thread count) in the run's precision.
"""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class ModelDims:
    params: int  # all parameters
    nonemb_params: int  # N: without the input embedding and the LM head
    hidden: int
    vocab: int
    layers: int
    attn_dim: int  # heads × head_dim
    frozen: bool = False  # LoRA: the weights counted in N and the head take no gradient

    @property
    def weight_passes(self) -> int:
        """Matmul passes per weight and token: forward, input gradient, weight gradient (not frozen)."""
        return 4 if self.frozen else 6


def model_dims(model_name: str) -> ModelDims:
    """Shapes of a model from its config alone (built on the meta device: no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return dims_of(model)


def dims_of(model) -> ModelDims:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    excluded = emb.numel()
    if head is not None and head.weight is not emb:
        excluded += head.weight.numel()
    hidden = int(cfg.hidden_size)
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if heads else hidden)
    return ModelDims(params=total, nonemb_params=total - excluded, hidden=hidden, vocab=int(emb.shape[0]),
                     layers=int(cfg.num_hidden_layers), attn_dim=int(heads * head_dim) if heads else hidden)


def train_flops(d: ModelDims, tokens: float, labels: float, attn_pairs: float) -> float:
    """Forward + backward FLOPs: 6·N·T + 6·h·V·Lab + 12·layers·d_attn·A (LoRA: 4·N·T + 4·h·V·Lab + ...)."""
    k = float(d.weight_passes)
    return (k * d.nonemb_params * tokens + k * d.hidden * d.vocab * labels
            + 12.0 * d.layers * d.attn_dim * attn_pairs)


def live_reference_factor(d: ModelDims) -> float:
    """F with a live reference's forward pass (2 of the weight passes) over F without it."""
    return (d.weight_passes + 2) / d.weight_passes


def prefix_shared_counts(prompt_len: int, response_lens: list[int]) -> tuple[int, int, float]:
    """(tokens, labels, attended pairs) when the prompt is computed once for all its responses."""
    P = prompt_len
    return P + sum(response_lens), sum(response_lens), P * P / 2 + sum(P * L + L * L / 2 for L in response_lens)


def padded_counts(prompt_len: int, response_lens: list[int]) -> tuple[int, int, float]:
    """(tokens, labels, attended pairs) with one sequence per prompt + response (TRL)."""
    P = prompt_len
    return sum(P + L for L in response_lens), sum(response_lens), sum((P + L) ** 2 / 2 for L in response_lens)


def directpo_example_flops(d: ModelDims, prompt_len: int, response_lens: list[int]) -> float:
    return train_flops(d, *prefix_shared_counts(prompt_len, response_lens))


def padded_example_flops(d: ModelDims, prompt_len: int, response_lens: list[int]) -> float:
    return train_flops(d, *padded_counts(prompt_len, response_lens))


# ------------------------------------------------------------------------------------------------
# Matmul peak


def _matmul_seconds(n: int, dtype, device, sync, reps: int = 1) -> float:
    """Best time of `reps` (n × n) @ (n × n) matmuls, after one warm-up."""
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=c)  # warm-up
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b, out=c)
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_gflops(dtype, device, budget_s: float = 0.5, max_n: int | None = None) -> float:
    """Best GFLOP/s of square matmuls of `dtype` on `device`, grown until one takes ~budget/10."""
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    max_n = max_n or (8192 if cuda else 4096)

    _matmul_seconds(64, dtype, device, sync)
    n = 128
    while n < max_n and _matmul_seconds(n, dtype, device, sync) < budget_s / 10:
        n *= 2
    deadline = time.perf_counter() + budget_s
    best = 0.0
    reps = 0
    while reps < 2 or time.perf_counter() < deadline:
        best = max(best, 2.0 * n ** 3 / _matmul_seconds(n, dtype, device, sync) / 1e9)
        reps += 1
        if reps >= 50:
            break
    return best


def probe_peaks(device, budget_s: float = 0.5) -> dict:
    import torch

    out = {"fp32": matmul_gflops(torch.float32, device, budget_s)}
    if torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
        out["bf16"] = 0.0
    else:
        try:
            out["bf16"] = matmul_gflops(torch.bfloat16, device, budget_s)
        except RuntimeError:  # no bf16 matmul on this device
            out["bf16"] = 0.0
    return out


def bf16_decision(peaks: dict) -> tuple[bool, str]:
    """Run bf16 configurations only where a bf16 matmul is at least as fast as an fp32 one."""
    f, b = peaks.get("fp32", 0.0), peaks.get("bf16", 0.0)
    if b <= 0:
        return False, "bf16 skipped: no bf16 matmul on this device"
    if b >= f:
        return True, f"bf16 included: bf16 matmul {b:.1f} GFLOP/s ≥ fp32 {f:.1f} GFLOP/s"
    return False, (f"bf16 skipped: bf16 matmul {b:.3g} GFLOP/s is {f / b:.0f}× slower than fp32 {f:.3g} GFLOP/s "
                   "on this machine (no native bf16 matmul)")
