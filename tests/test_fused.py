"""The lean SwiGLU MLP (directpo.fused): same outputs, same gradients, fewer saved activations."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from directpo.fused import _qualifies, lean_lora, lean_mlp, lean_norms


@pytest.fixture()
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=88, mlp_bias=False)
    return LlamaForCausalLM(cfg)


def _run(model, ids, lean, dtype=None, swap=lean_mlp, swapped=None):
    """Outputs, gradients and the elements autograd saved, with `swap` (lean_mlp: one MLP per layer
    swapped) or without."""
    swapped = model.config.num_hidden_layers if swapped is None else swapped
    model.zero_grad()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            if lean:
                with swap(model) as n:
                    assert n == swapped
                    out = model(input_ids=ids).logits
            else:
                out = model(input_ids=ids).logits
    (out.float().square().mean()).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.detach().float(), grads, sum(saved)


def test_same_outputs_and_gradients_fewer_saved(llama):
    ids = torch.randint(0, 97, (2, 11))
    a, ga, na = _run(llama, ids, lean=False)
    b, gb, nb = _run(llama, ids, lean=True)
    assert torch.equal(a, b)  # the forward runs the same ops in the same order
    for k in ga:  # and the backward autograd's kernels in autograd's order
        assert torch.equal(ga[k], gb[k]), k
    assert nb < na - 2 * 2 * 2 * 11 * 88 + 1  # two (tokens × intermediate) tensors fewer per layer
    assert "forward" not in llama.model.layers[0].mlp.__dict__  # restored


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_down_gradients_are_autograds_bit_for_bit(dtype, bias):
    """`_SwiGLUDown`'s backward makes autograd's own steps for down(silu(gate) · up): the same values
    and gradients bit for bit (rows of a real step's size, so the kernels' vector paths and tails run)."""
    import torch.nn.functional as F

    from directpo.fused import _SwiGLUDown

    g = torch.Generator().manual_seed(3)
    gate, up = (torch.randn(3, 37, 88, generator=g, dtype=dtype) * 3 for _ in range(2))
    w, b = torch.randn(32, 88, generator=g, dtype=dtype), torch.randn(32, generator=g, dtype=dtype) if bias else None
    grad = torch.randn(3, 37, 32, generator=g, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (gate, up, w) + ((b,) if bias else ())]
    ours = _SwiGLUDown.apply(*leaves[:3], leaves[3] if bias else None, None, None, 1.0)
    ours.backward(grad)
    theirs_leaves = [t.clone().requires_grad_() for t in (gate, up, w) + ((b,) if bias else ())]
    theirs = F.linear(F.silu(theirs_leaves[0]) * theirs_leaves[1], theirs_leaves[2], theirs_leaves[3] if bias else None)
    theirs.backward(grad)
    assert torch.equal(ours, theirs)
    for a, t in zip(leaves, theirs_leaves):
        assert torch.equal(a.grad, t.grad)


def test_bias_and_bf16_autocast(llama):
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      intermediate_size=88, mlp_bias=True)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.bias.normal_()
    ids = torch.randint(0, 97, (2, 9))
    _, ga, _ = _run(m, ids, lean=False)
    _, gb, _ = _run(m, ids, lean=True)
    for k in ga:
        assert torch.equal(ga[k], gb[k]), k
    _same_under_bf16(m, ids)


def _same_under_bf16(model, ids):
    """bf16 autocast: the same forward, fp32 gradients within bf16's rounding of op by op's."""
    a, ga, _ = _run(model, ids, lean=False, dtype=torch.bfloat16)
    b, gb, _ = _run(model, ids, lean=True, dtype=torch.bfloat16)
    assert torch.equal(a, b) and ga.keys() == gb.keys()
    for k in ga:
        assert gb[k].dtype == torch.float32
        assert torch.allclose(ga[k], gb[k], atol=2e-2, rtol=2e-2), k


def test_only_plain_swiglu_mlps_qualify(llama):
    mlp = llama.model.layers[0].mlp
    assert _qualifies(mlp)
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(llama, LoraConfig(r=2, target_modules=["down_proj"]))
    assert _qualifies(lora.base_model.model.model.layers[0].mlp)  # a LoRA-wrapped down projection
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    assert not any(_qualifies(m) for m in gpt2.modules())


def test_without_autograd_the_same_outputs_in_place(llama):
    """No autograd (a reference pass, scoring): the MLPs run silu and the product in place, with
    outputs bit-identical to the model's own forward, fp32 and under bf16 autocast."""
    ids = torch.randint(0, 97, (2, 11))
    for dtype in (None, torch.bfloat16):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            plain = llama(input_ids=ids).logits
            with lean_mlp(llama) as n:
                assert n == llama.config.num_hidden_layers
                assert llama.model.layers[0].mlp.forward.__func__.__name__ == "_nograd_forward"
                lean = llama(input_ids=ids).logits
        assert torch.equal(plain, lean)
    assert "forward" not in llama.model.layers[0].mlp.__dict__  # restored


def _run_norms(model, ids, lean, dtype=None):
    return _run(model, ids, lean, dtype, lean_norms, 2 * model.config.num_hidden_layers + 1)  # 2 a layer + final


def test_lean_norms_same_outputs_and_gradients_fewer_saved(llama):
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():  # weights other than ones, so the weight's gradient path is exercised
        for m in llama.modules():
            if type(m).__name__ == "LlamaRMSNorm":
                m.weight.normal_(1.0, 0.2)
    a, ga, na = _run_norms(llama, ids, lean=False)
    b, gb, nb = _run_norms(llama, ids, lean=True)
    assert torch.equal(a, b)  # the forward runs the same ops in the same order
    for k in ga:
        assert torch.allclose(ga[k], gb[k], atol=1e-6, rtol=1e-5), k
    assert nb <= na - 5 * 2 * 11 * 32 + 5 * 2 * 11  # per norm: the normalised input gone, an rsqrt per token kept
    assert all("forward" not in m.__dict__ for m in llama.modules())  # restored
    a, ga, _ = _run_norms(llama, ids, lean=False, dtype=torch.bfloat16)
    b, gb, _ = _run_norms(llama, ids, lean=True, dtype=torch.bfloat16)
    assert torch.equal(a, b)
    for k in ga:
        assert torch.allclose(ga[k], gb[k], atol=2e-2, rtol=2e-2), k


def test_lean_norm_gradcheck_and_which_norms_qualify(llama):
    from directpo.fused import _norm_qualifies, _RMSNorm

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(6, eps=1e-6)  # (its forward casts to fp32, so no fp64 gradcheck: autograd's gradients)
    torch.manual_seed(3)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(3, 5, 6) * 4).requires_grad_()
    g = torch.randn(3, 5, 6)
    want = torch.autograd.grad(norm(x), (x, norm.weight), g)
    got = torch.autograd.grad(_RMSNorm.apply(x, norm.weight, 1e-6), (x, norm.weight), g)
    for a, b in zip(want, got):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert _norm_qualifies(llama.model.norm) and not _norm_qualifies(llama.model.layers[0].mlp)
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    assert not _norm_qualifies(GemmaRMSNorm(8))  # (1 + weight): another formula
    with torch.no_grad(), lean_norms(llama) as n:  # nothing to save without autograd
        assert n == 0


def test_lean_norm_backward_is_the_op_by_op_formula_bit_for_bit():
    """The backward's in-place buffers give the op-by-op formula's gradients exactly, with either
    gradient alone too (frozen norm weights under LoRA)."""
    from directpo.fused import _norm_grads

    torch.manual_seed(4)
    x, w, g = torch.randn(2, 7, 16) * 3, torch.randn(16), torch.randn(2, 7, 16)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    xhat = x * rstd
    want_w = (g * xhat).reshape(-1, 16).sum(0)
    gw = g * w
    want_x = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
    for need_x, need_w in ((True, True), (True, False), (False, True)):
        got_x, got_w = _norm_grads(x, rstd, w, g, need_x, need_w)
        assert (got_x is None) != need_x and (got_w is None) != need_w
        assert not need_x or torch.equal(got_x, want_x)
        assert not need_w or torch.equal(got_w, want_w)


def _lora(llama, seed=2, **kw):
    """All-linear LoRA (PEFT) with B made non-zero, so the adapter's branch counts."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(llama, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **kw))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def test_lora_same_outputs_and_adapter_gradients_fewer_saved(llama):
    """LoRA on every linear (the default): the lean MLP takes the adapted down projection too, with
    the same outputs and the same gradients for every adapter (those of A and B on down_proj come
    from the recomputed product), and keeps two (tokens × intermediate) tensors per layer fewer."""
    model = _lora(llama)
    ids = torch.randint(0, 97, (2, 11))
    a, ga, na = _run(model, ids, lean=False)
    b, gb, nb = _run(model, ids, lean=True)
    assert torch.equal(a, b)
    trained = [k for k, p in model.named_parameters() if p.requires_grad]
    assert any("down_proj.lora_A" in k for k in trained) and any("down_proj.lora_B" in k for k in trained)
    for k in trained:
        assert gb[k].abs().max() > 0, k
        assert torch.allclose(ga[k], gb[k], atol=1e-6, rtol=1e-5), k
    assert nb < na - 2 * 2 * 2 * 11 * 88 + 1
    _same_under_bf16(model, ids)


def test_lora_gradcheck_of_the_adapted_down_projection():
    """fp64 gradcheck of `_SwiGLUDown` with LoRA factors: gate, up, base weight and bias, A, B."""
    from directpo.fused import _SwiGLUDown

    g = torch.Generator().manual_seed(0)
    t = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    gate, up, w, b, la, lb = t(2, 3, 6), t(2, 3, 6), t(5, 6), t(5), t(2, 6), t(5, 2)
    assert torch.autograd.gradcheck(lambda *x: _SwiGLUDown.apply(*x, 0.75), (gate, up, w, b, la, lb))


def test_lora_switched_off_merged_or_unsupported_runs_peft_exactly(llama):
    """Adapters disabled (the reference under LoRA), merged, or a down projection the lean path does
    not know (dropout, DoRA): the same outputs and gradients as PEFT's own forward."""
    ids = torch.randint(0, 97, (2, 9))
    model = _lora(llama)
    emb = model.get_input_embeddings().weight
    with model.disable_adapter():
        emb.requires_grad_(True)  # something to differentiate: the base network is frozen under LoRA
        a, ga, _ = _run(model, ids, lean=False)
        b, gb, _ = _run(model, ids, lean=True)
        emb.requires_grad_(False)
    assert torch.equal(a, b) and len(ga) == 1
    assert all(torch.allclose(ga[k], gb[k], atol=1e-6, rtol=1e-5) for k in ga)
    plain, _, _ = _run(model, ids, lean=False)
    assert not torch.equal(a, plain)  # the adapters do change the output when on
    for kw in ({"lora_dropout": 0.1}, {"use_dora": True}):
        other = _lora(LlamaForCausalLM(llama.config), **kw)
        other.eval()  # dropout off, so that both runs draw nothing
        a, ga, _ = _run(other, ids, lean=False)
        b, gb, _ = _run(other, ids, lean=True)
        assert torch.equal(a, b), kw
        assert all(torch.allclose(ga[k], gb[k], atol=1e-6, rtol=1e-5) for k in ga), kw
    merged = _lora(LlamaForCausalLM(llama.config))
    merged.merge_adapter()  # nothing trains through a merged adapter: a forward with autograd on
    a = merged(input_ids=ids).logits
    with lean_mlp(merged) as n:
        assert n == 2
        b = merged(input_ids=ids).logits
    assert torch.equal(a, b)


def test_lean_lora_linears_same_outputs_and_gradients(llama):
    """`lean_lora`: every PEFT LoRA linear adds B(A(x))·s into its base output in place; the same
    function (to fp32 rounding: one fused addmm instead of PEFT's product, scale and sum), the same
    gradients, no more saved; with adapters off the base layer alone, exactly."""
    model = _lora(llama)
    ids = torch.randint(0, 97, (2, 11))
    a, ga, na = _run(model, ids, lean=False)
    b, gb, nb = _run(model, ids, lean=True, swap=lean_lora, swapped=2 * 7)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert ga.keys() == gb.keys() and len(ga) == 2 * 7 * 2
    for k in ga:
        assert gb[k].abs().max() > 0, k
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-6, msg=k)
    assert nb <= na
    a, ga, _ = _run(model, ids, lean=False, dtype=torch.bfloat16)
    b, gb, _ = _run(model, ids, lean=True, dtype=torch.bfloat16, swap=lean_lora, swapped=14)
    torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)
    for k in ga:
        assert gb[k].dtype == torch.float32
        assert torch.allclose(ga[k], gb[k], atol=2e-2, rtol=2e-2), k
    with torch.no_grad(), model.disable_adapter():  # the LoRA reference: the base network, exactly
        plain = model(input_ids=ids).logits
        with lean_lora(model) as n:
            assert n == 14
            assert torch.equal(model(input_ids=ids).logits, plain)
    for kw in ({"lora_dropout": 0.1}, {"use_dora": True}):  # PEFT's own forward, exactly
        other = _lora(LlamaForCausalLM(llama.config), **kw)
        other.eval()
        a, _, _ = _run(other, ids, lean=False)
        b, _, _ = _run(other, ids, lean=True, swap=lean_lora, swapped=14)
        assert torch.equal(a, b), kw


def _qlora(llama, tmp_path):
    """`llama`'s blocks quantized nf4 by transformers + bitsandbytes (double quantization, fp32
    compute), with all-linear LoRA on top, B made non-zero."""
    from transformers import BitsAndBytesConfig

    llama.save_pretrained(tmp_path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=q, dtype=torch.float32, device_map="cpu")
    return _lora(base)


def test_4bit_base_layers_take_the_lean_paths_exactly(llama, tmp_path, one_thread):
    """QLoRA: the lean MLP and LoRA forwards take bitsandbytes' 4-bit base layers (the weight
    dequantized for the forward's matmul and again in the backward): the log-probs and every
    adapter's gradient equal bitsandbytes + PEFT's own forward within 1e-5, and the MLP keeps two
    (tokens × intermediate) tensors per layer fewer."""
    pytest.importorskip("bitsandbytes")
    from directpo.fused import _is_4bit, _lora_parts

    llama = LlamaForCausalLM(LlamaConfig(**{**llama.config.to_dict(), "attention_bias": True}))  # (as Qwen2's)
    model = _qlora(llama, tmp_path)
    assert model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.bias is not None
    down = model.get_base_model().model.layers[0].mlp.down_proj
    assert _is_4bit(down.base_layer) and _qualifies(model.get_base_model().model.layers[0].mlp)
    assert _lora_parts(down)[0] is down.base_layer.weight  # the packed weight: nothing dense kept
    ids = torch.randint(0, 97, (2, 11))
    a, ga, na = _run(model, ids, lean=False)
    trained = [k for k, p in model.named_parameters() if p.requires_grad]
    assert len(trained) == 2 * 7 * 2 and ga.keys() == set(trained)
    for swap, swapped in ((lean_mlp, 2), (lean_lora, 14)):
        b, gb, nb = _run(model, ids, lean=True, swap=swap, swapped=swapped)
        torch.testing.assert_close(torch.log_softmax(b, -1), torch.log_softmax(a, -1), rtol=0, atol=1e-5)
        assert gb.keys() == ga.keys()
        for k in ga:
            assert gb[k].abs().max() > 0, k
            torch.testing.assert_close(gb[k], ga[k], rtol=1e-5, atol=1e-5, msg=k)
        if swap is lean_mlp:
            assert torch.equal(a, b)  # the same ops on the same dequantized weight, in PEFT's order
            assert nb < na - 2 * 2 * 2 * 11 * 88 + 1
        else:
            assert nb <= na
    with torch.no_grad(), model.disable_adapter():  # the reference: the quantized base alone, exactly
        plain = model(input_ids=ids).logits
        with lean_mlp(model), lean_lora(model):
            assert torch.equal(model(input_ids=ids).logits, plain)
