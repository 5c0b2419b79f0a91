"""Segment-by-segment attention for the packed layout (directpo.attention)."""
import pytest
import torch

from directpo.attention import NAME, segment_attention, supports_segment_attention
from directpo.data import Example, collate_packed, collate_padded, tokenize_example
from directpo.logprobs import example_logps, packed_row_tokens, ONE_ROW
from directpo.models import load_model


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_model(str(tiny_model))


def _tok(tok):
    exs = [Example("Review of Kalo:", [" It was great, warm and fresh.", " It was dull."], "t", 0),
           Example("Hi", [" ok", " no thanks, it was messy and weak and flat.", " maybe", " sure!"], "t", 1)]
    return [tokenize_example(e, tok) for e in exs]


def test_segments_describe_the_rows(tiny_tokenizer):
    tok = _tok(tiny_tokenizer)
    b = collate_packed(tok, tiny_tokenizer.pad_token_id, ONE_ROW)
    assert b.input_ids.shape == (1, sum(len(t.prompt_ids) + sum(map(len, t.response_ids)) for t in tok))  # no padding
    (r0, s0, p0, l0), (r1, s1, p1, l1) = sorted(b.segments, key=lambda s: s[1])
    assert r0 == r1 == 0 and s0 == 0 and s1 == p0 + sum(l0)
    assert {(p0, l0), (p1, l1)} == {(len(t.prompt_ids), tuple(map(len, t.response_ids))) for t in tok}


def test_config_restored_and_function_needs_the_context(model, tiny_tokenizer):
    before = model.config._attn_implementation
    b = collate_packed(_tok(tiny_tokenizer), tiny_tokenizer.pad_token_id, ONE_ROW)
    with segment_attention(model, b.segments):
        assert model.config._attn_implementation == NAME
    assert model.config._attn_implementation == before
    from transformers import AttentionInterface

    fn = AttentionInterface()[NAME]
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="only inside"):
        fn(model.model.layers[0].self_attn, q, q, q, None)
    with segment_attention(model, [(0, 0, 1, (2,))]):  # an attention it does not implement: refused, named
        with pytest.raises(ValueError, match="'sliding_window'.*--layout padded"):
            fn(model.model.layers[0].self_attn, q, q, q, None, sliding_window=2)


def test_one_row_equals_padded_with_gradients_and_grouped_kv(tmp_path, tiny_tokenizer):
    """GQA (2 query heads per key/value head): segment attention == padded, values and gradients."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64)
    m = LlamaForCausalLM(cfg)
    tok = _tok(tiny_tokenizer)

    def run(batch):
        m.zero_grad()
        lp = example_logps(m, batch)
        lp.nan_to_num().sum().backward()
        return lp.detach(), [p.grad.clone() for p in m.parameters()]

    a, ga = run(collate_padded(tok, tiny_tokenizer.pad_token_id))
    b, gb = run(collate_packed(tok, tiny_tokenizer.pad_token_id, ONE_ROW))
    ok = ~torch.isnan(a)
    assert torch.equal(ok, ~torch.isnan(b))
    assert torch.allclose(a[ok], b[ok], atol=1e-5)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-4)


def test_sliding_window_models_keep_the_dense_mask(tiny_tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=2, intermediate_size=64, sliding_window=4096)
    m = MistralForCausalLM(cfg)
    assert not supports_segment_attention(m)
    assert packed_row_tokens(None, m) is None  # rows of the longest example, not one row
    tok = _tok(tiny_tokenizer)
    a = example_logps(m, collate_padded(tok, tiny_tokenizer.pad_token_id))
    ok = ~torch.isnan(a)
    b = example_logps(m, collate_packed(tok, tiny_tokenizer.pad_token_id))  # window longer than every example
    assert torch.allclose(a[ok], b[ok], atol=1e-5)
    cfg.sliding_window = 8  # shorter than the examples: the dense mask can't express it, so refuse
    with pytest.raises(ValueError, match="sliding window of 8 tokens"):
        example_logps(m, collate_packed(tok, tiny_tokenizer.pad_token_id))
    cfg.sliding_window = None
    assert supports_segment_attention(m)
    a = example_logps(m, collate_padded(tok, tiny_tokenizer.pad_token_id))
    b = example_logps(m, collate_packed(tok, tiny_tokenizer.pad_token_id, ONE_ROW))
    ok = ~torch.isnan(a)
    assert torch.allclose(a[ok], b[ok], atol=1e-5)


def test_row_tokens_choice(model):
    assert packed_row_tokens(None, model) == ONE_ROW
    assert packed_row_tokens(100, model) == 100
    assert packed_row_tokens(None, model, torch.nn.Linear(2, 2)) is None  # a model without the interface


def test_activation_checkpointing_keeps_the_dense_path(tiny_model, tiny_tokenizer):
    """Checkpointed layers run again in backward, outside our context: the model must not depend on it."""
    m = load_model(str(tiny_model))
    m.train()
    tok = _tok(tiny_tokenizer)

    def grads(model):
        model.zero_grad()
        batch = collate_packed(tok, tiny_tokenizer.pad_token_id, packed_row_tokens(None, model))
        example_logps(model, batch).nan_to_num().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads(m)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not supports_segment_attention(m)
    for a, b in zip(plain, grads(m)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::UserWarning")  # flex_attention warns that eager mode is for debugging
@pytest.mark.parametrize("row_tokens", [ONE_ROW, 24])
def test_flex_block_mask_equals_the_per_segment_kernel(tiny_tokenizer, monkeypatch, row_tokens):
    """FlexAttention (the CUDA kernel) with the layout's block mask gives the per-segment SDPA
    kernel's log-probs: several segments per row, padding, rankings, grouped keys/values. (Forward
    only: FlexAttention has no backward on the CPU; on CUDA its gradients are torch's.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    from directpo import attention

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64)
    m = LlamaForCausalLM(cfg).eval()
    exs = [Example("Q", [" a b", " c"], "t", 2), Example("Review of Kalo:", [" It was great.", " dull"], "t", 3)]
    tok = _tok(tiny_tokenizer) + [tokenize_example(e, tiny_tokenizer) for e in exs]
    batch = collate_packed(tok, tiny_tokenizer.pad_token_id, row_tokens)
    if row_tokens != ONE_ROW:
        assert batch.input_ids.shape[0] > 1 and (batch.input_ids == tiny_tokenizer.pad_token_id).any()
    with torch.no_grad():
        monkeypatch.setenv("DIRECTPO_SEGMENT_KERNEL", "sdpa")
        want = example_logps(m, batch)
        calls = []
        real = attention._flex

        def counted():
            calls.append(1)
            return real()
        monkeypatch.setattr(attention, "_flex", counted)
        monkeypatch.setenv("DIRECTPO_SEGMENT_KERNEL", "flex")
        got = example_logps(m, batch)
    assert len(calls) == cfg.num_hidden_layers  # the flex kernel ran, once per layer
    assert torch.equal(want.isnan(), got.isnan())
    assert torch.allclose(want.nan_to_num(), got.nan_to_num(), atol=1e-5)
    monkeypatch.setenv("DIRECTPO_SEGMENT_KERNEL", "fast")
    with pytest.raises(ValueError, match="DIRECTPO_SEGMENT_KERNEL must be auto, flex or sdpa"):
        example_logps(m, batch)


def test_the_kernel_choice():
    from directpo.attention import _use_flex

    q = torch.zeros(1)
    assert not _use_flex(q, 0.0)  # CPU: per-segment SDPA
    assert not _use_flex(q, 0.1)


def _dense_visible(segments, length):
    """(length × length) boolean: query i sees key j (the definition the segment kernel must equal)."""
    seen = torch.zeros(length, length, dtype=torch.bool)
    for _, start, P, lens in segments:
        end = start + P + sum(lens)
        seen[start:end, start:start + P] = True
        s = start + P
        for L in lens:
            seen[s:s + L, s:s + L] = torch.ones(L, L, dtype=torch.bool).tril()
            s += L
        seen[start:start + P, start:start + P] &= torch.ones(P, P, dtype=torch.bool).tril()
    seen |= ~seen.any(1, keepdim=True) & torch.eye(length, dtype=torch.bool)  # padding sees itself (unread)
    return seen


@pytest.mark.parametrize("layout", [
    [(0, 0, 5, (3, 4))],                     # a pair
    [(0, 0, 4, (6,))],                       # one response (SFT): a single causal call
    [(0, 1, 3, (2, 4, 1, 3))],               # a ranking of four, padding before it
    [(0, 0, 2, (3, 1)), (0, 7, 3, (2, 1))],  # two pairs in one row, padding between and after
    [(0, 0, 3, (4, 0))],                     # an empty second response
    [(0, 0, 3, (2, 2)), (1, 0, 5, (1, 3))],  # two rows
])
@pytest.mark.parametrize("kernel", ["flash", "sdpa"])
def test_segment_kernel_equals_the_dense_mask_with_gradients(layout, kernel):
    """Every piece of a row through `_segment_attention` equals SDPA over the dense mask of the layout,
    values and gradients of q, k and v (the rows' padding excepted: nothing reads it); both kernels:
    the CPU's one-node flash calls and the SDPA calls with autograd (dropout, off the CPU)."""
    from directpo.attention import _PLAN, _Plan, _attend_through_sdpa, _segment_attention

    torch.manual_seed(0)
    rows, length = max(r for r, *_ in layout) + 1, 14
    q, k, v = (torch.randn(rows, 4, length, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    used = torch.zeros(rows, length, dtype=torch.bool)
    for r, start, P, lens in layout:
        used[r, start:start + P + sum(lens)] = True
    plan = _Plan(layout)
    token = _PLAN.set(plan)
    try:
        got = _segment_attention(torch.nn.Module(), q, k, v, None)[0] if kernel == "flash" else \
            _attend_through_sdpa(q, k, v, plan.calls(length), plan, 0.0, None)
    finally:
        _PLAN.reset(token)
    masks = torch.stack([_dense_visible([s for s in layout if s[0] == r], length) for r in range(rows)])
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=masks[:, None]).transpose(1, 2)
    assert torch.allclose(got[used], want[used], atol=1e-12)
    g = torch.randn_like(want) * used[:, :, None, None]
    ga = torch.autograd.grad(got, (q, k, v), g)
    gb = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, atol=1e-12)


def test_flash_node_equals_sdpa_calls_bit_for_bit_and_follows_autocast():
    """The one-node flash path gives exactly the values and gradients of SDPA's own calls (fp32, GQA,
    a pair, a ranking, a prompt-tail layer), and under CPU autocast computes in autocast's dtype as
    SDPA would (bf16 out)."""
    from directpo.attention import _PLAN, _TAIL, _Plan, _attend_through_sdpa, _segment_attention

    torch.manual_seed(0)
    layout = [(0, 0, 5, (3, 4)), (0, 12, 4, (2, 1, 3)), (0, 22, 3, (4,))]
    length, module = 31, torch.nn.Module()  # (padding after the last segment)
    for tail in (False, True):
        q = torch.randn(1, length, 4, 16).transpose(1, 2).requires_grad_()  # the model's layout
        k, v = (torch.randn(1, length, 2, 16).transpose(1, 2).requires_grad_() for _ in range(2))
        plan = _Plan(layout)
        token, tail_token = _PLAN.set(plan), _TAIL.set(module if tail else None)
        try:
            got = _segment_attention(module, q, k, v, None, scaling=0.25)[0]
            want = _attend_through_sdpa(q, k, v, plan.calls(length, tail), plan, 0.0, 0.25)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = _segment_attention(module, q, k, v, None, scaling=0.25)[0]
                low_want = _attend_through_sdpa(q, k, v, plan.calls(length, tail), plan, 0.0, 0.25)
        finally:
            _PLAN.reset(token)
            _TAIL.reset(tail_token)
        assert torch.equal(got, want) and got.is_contiguous()
        g = torch.randn_like(got)
        for a, b in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
            assert torch.equal(a, b)
        assert low.dtype == torch.bfloat16 and torch.equal(low, low_want.to(low.dtype))  # (its padding zeros: fp32)
