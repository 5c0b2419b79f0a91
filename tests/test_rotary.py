"""Rotary embeddings in fewer passes (directpo.rotary): the modelling code's numbers, bit for bit."""
import sys
import types

import pytest
import torch
import transformers.models.llama.modeling_llama as llama

from directpo import rotary
from directpo.logprobs import example_logps
from directpo.models import load_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotation_equals_transformers_bit_for_bit(dtype):
    torch.manual_seed(0)
    q = torch.randn(2, 37, 4, 64, dtype=dtype).transpose(1, 2).requires_grad_()  # the model's layout
    k = torch.randn(2, 37, 2, 64, dtype=dtype).transpose(1, 2).requires_grad_()
    cos, sin = torch.randn(2, 37, 64, dtype=dtype), torch.randn(2, 37, 64, dtype=dtype)
    want, got = llama.apply_rotary_pos_emb(q, k, cos, sin), rotary.apply_rotary_pos_emb(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    g = [torch.randn_like(x) for x in want]
    for a, b in zip(torch.autograd.grad(got, (q, k), g), torch.autograd.grad(want, (q, k), g)):
        assert torch.equal(a, b)


def test_mixed_dtypes_take_the_reference_formula():
    """bf16 q with fp32 cos (autocast): autograd rounds each gradient term to bf16 before the sum, so
    the fused backward would not be the same numbers; the reference formula runs, and is equal."""
    torch.manual_seed(0)
    q, k = (torch.randn(1, 2, 9, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    cos, sin = torch.randn(1, 9, 8), torch.randn(1, 9, 8)
    want, got = llama.apply_rotary_pos_emb(q, k, cos, sin), rotary.apply_rotary_pos_emb(q, k, cos, sin)
    assert got[0].grad_fn.name() != "_RotaryBackward" and all(torch.equal(a, b) for a, b in zip(got, want))
    g = [torch.randn_like(x) for x in want]
    for a, b in zip(torch.autograd.grad(got, (q, k), g), torch.autograd.grad(want, (q, k), g)):
        assert torch.equal(a, b)


def test_only_modules_with_llamas_functions_qualify(monkeypatch):
    assert rotary._is_standard(llama.__name__)
    assert not rotary._is_standard(torch.nn.modules.linear.__name__)  # (no rotary at all)
    # a module whose rotation differs (here: rotate_half the other way round) keeps its own
    source = ("import torch\n"
              "def rotate_half(x):\n    x1 = x[..., : x.shape[-1] // 2]\n    x2 = x[..., x.shape[-1] // 2 :]\n"
              "    return torch.cat((x2, -x1), dim=-1)\n"
              "def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):\n"
              "    cos = cos.unsqueeze(unsqueeze_dim)\n    sin = sin.unsqueeze(unsqueeze_dim)\n"
              "    q_embed = (q * cos) + (rotate_half(q) * sin)\n    k_embed = (k * cos) + (rotate_half(k) * sin)\n"
              "    return q_embed, k_embed\n")
    for name, text in (("directpo_test_other_rotary", source),
                       ("directpo_test_same_rotary", source.replace("(x2, -x1)", "(-x2, x1)"))):
        mod = types.ModuleType(name)
        exec(text, mod.__dict__)
        monkeypatch.setitem(sys.modules, name, mod)
        real = rotary.inspect.getsource
        monkeypatch.setattr(rotary.inspect, "getsource", lambda m, mod=mod, text=text, real=real:
                            text if m is mod else real(m))
    assert not rotary._is_standard("directpo_test_other_rotary")
    assert rotary._is_standard("directpo_test_same_rotary")  # (the check is on the code, not on a name)


def test_a_forward_under_the_swap_gives_the_same_logps_and_gradients(tiny_model, tiny_tokenizer, monkeypatch):
    import contextlib

    import directpo.logprobs as logprobs
    from directpo.data import Example, collate_packed, tokenize_example
    from directpo.logprobs import ONE_ROW

    model = load_model(str(tiny_model))
    exs = [Example("Review of Kalo:", [" It was great, warm and fresh.", " It was dull."], "t", 0),
           Example("Hi", [" ok", " no thanks, it was messy.", " maybe"], "t", 1)]
    batch = collate_packed([tokenize_example(e, tiny_tokenizer) for e in exs], tiny_tokenizer.pad_token_id, ONE_ROW)
    calls, apply = [], rotary._Rotary.apply
    monkeypatch.setattr(rotary._Rotary, "apply", lambda *a: calls.append(1) or apply(*a))
    lp = example_logps(model, batch)
    grads = torch.autograd.grad(lp.nansum(), list(model.parameters()))  # (NaN: the pair has no third response)
    assert len(calls) == 2 * model.config.num_hidden_layers  # q and k of every layer went through it
    assert llama.apply_rotary_pos_emb is not rotary.apply_rotary_pos_emb  # (and the module's own is back)
    monkeypatch.setattr(logprobs, "fused_rotary", lambda model: contextlib.nullcontext())
    lp_ref = example_logps(model, batch)
    grads_ref = torch.autograd.grad(lp_ref.nansum(), list(model.parameters()))
    assert torch.equal(lp.isnan(), lp_ref.isnan()) and torch.equal(lp.nan_to_num(), lp_ref.nan_to_num())
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref))
