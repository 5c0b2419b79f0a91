"""The prefix-shared, packed layout gives the plain padded computation's log-probs, loss and gradients."""
import pytest
import torch

from directpo.data import Example, collate_packed, collate_padded, tokenize_example
from directpo.data.collate import pack_rows
from directpo.logprobs import example_logps
from directpo.losses import dpo_loss
from directpo.models import load_model

from conftest import hh_rows


@pytest.fixture(scope="module")
def model(tiny_model):
    torch.manual_seed(0)
    return load_model(str(tiny_model))


def _examples(tok, max_prompt_length=None, max_length=None):
    exs = [Example("Review of Kalo:", [" It was great, warm and fresh.", " It was dull."], "t", 0),
           Example("Hi", [" ok", " no thanks, it was messy and weak and flat.", " maybe", " sure!"], "t", 1),
           Example("Review of a film with a rather long title, and then some:", [" fine", " bad"], "t", 2)]
    from directpo.data import parse_row
    exs += [parse_row(r, "hh", 10 + i) for i, r in enumerate(hh_rows(3))]
    return [tokenize_example(e, tok, max_length=max_length, max_prompt_length=max_prompt_length) for e in exs]


def _close(a, b, atol=1e-5):
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b))
    assert torch.allclose(a[~nan], b[~nan], atol=atol, rtol=1e-6), (a - b).abs().nan_to_num().max()


# segmented: attention segment by segment (directpo.attention); False: the dense 4D mask path
@pytest.mark.parametrize("segmented", [True, False])
@pytest.mark.parametrize("row_tokens", [None, 64, 4096])
@pytest.mark.parametrize("trunc", [dict(), dict(max_prompt_length=12, max_length=40)])
def test_packed_logps_equal_padded(model, tiny_tokenizer, row_tokens, trunc, segmented):
    tok = _examples(tiny_tokenizer, **trunc)
    if trunc:
        assert any(t.prompt_truncated for t in tok) and any(t.responses_truncated for t in tok)
    padded = example_logps(model, collate_padded(tok, tiny_tokenizer.pad_token_id))
    batch = collate_packed(tok, tiny_tokenizer.pad_token_id, row_tokens)
    assert (batch.input_ids.shape[0] == 1) == (row_tokens == 4096)
    _close(example_logps(model, batch, segmented=segmented), padded)
    for i in range(len(tok)):  # a micro-batch of a single example
        one = example_logps(model, collate_packed([tok[i]], tiny_tokenizer.pad_token_id), segmented=segmented)
        _close(one[0, :len(tok[i].response_ids)], padded[i, :len(tok[i].response_ids)])


@pytest.mark.parametrize("segmented", [True, False])
def test_packed_loss_and_gradients_equal_padded(model, tiny_tokenizer, segmented):
    tok = [t for t in _examples(tiny_tokenizer) if len(t.response_ids) == 2]

    def run(collate):
        model.zero_grad()
        lp = example_logps(model, collate(tok, tiny_tokenizer.pad_token_id), segmented=segmented)
        ref = lp.detach() + torch.linspace(-1, 1, lp.numel()).view_as(lp)
        loss = dpo_loss(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], beta=0.1).losses
        loss.sum().backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (la, ga), (lb, gb) = run(collate_padded), run(lambda t, p: collate_packed(t, p, 4096))
    _close(la, lb, atol=1e-6)
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-4), n


def test_packed_bf16_within_tolerance(model, tiny_tokenizer):
    """bf16 autocast: per-pair log-probs within 1 % of fp32 (stated tolerance for the bf16 path)."""
    tok = _examples(tiny_tokenizer)
    fp32 = example_logps(model, collate_padded(tok, tiny_tokenizer.pad_token_id))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = example_logps(model, collate_packed(tok, tiny_tokenizer.pad_token_id))
    ok = ~torch.isnan(fp32)
    rel = ((bf16 - fp32).abs() / fp32.abs())[ok]
    assert rel.max() < 0.01, rel.max()


def test_eager_attention_takes_an_additive_mask(tiny_model, tiny_tokenizer):
    from transformers import AutoModelForCausalLM
    eager = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager")
    tok = _examples(tiny_tokenizer)
    _close(example_logps(eager, collate_packed(tok, tiny_tokenizer.pad_token_id, 4096), segmented=False),
           example_logps(eager, collate_padded(tok, tiny_tokenizer.pad_token_id)))


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows([5, 3, 8, 2, 6], capacity=8)
    assert sorted(sum(rows, [])) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 8, 2, 6][i] for i in r) <= 8 for r in rows)
    assert len(rows) == 3  # 8 | 6+2 | 5+3


def test_packed_mask_structure(tiny_tokenizer):
    tok = _examples(tiny_tokenizer)[:2]
    b = collate_packed(tok, tiny_tokenizer.pad_token_id, 4096)
    assert b.input_ids.shape[0] == 1  # both examples share one row
    assert b.attention_mask is None and len(b.segments) == 2
    m = b.dense_mask()[0, 0]
    ids = b.input_ids[0].tolist()
    P, c = len(tok[0].prompt_ids), len(tok[0].response_ids[0])
    start = next(s for s in range(len(ids)) if ids[s:s + P] == tok[0].prompt_ids)
    rej = start + P + c  # first token of example 0's rejected response
    assert m[rej, start:start + P].all()  # rejected sees the prompt
    assert not m[rej, start + P:rej].any()  # ... but not the chosen response
    assert m[rej, rej] and not m[rej, rej + 1]  # causal
    assert b.position_ids[0, rej].item() == P  # positions restart after the prompt
    other = [t for t in range(len(ids)) if t < start or t >= start + tok[0].num_tokens - P]
    assert not m[start:start + P][:, other].any()  # block-diagonal: no attention across examples
    assert b.num_tokens == sum(len(t.prompt_ids) + sum(map(len, t.response_ids)) for t in tok)
