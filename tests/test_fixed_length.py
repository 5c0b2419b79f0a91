"""A suppressed token (`--fixed-length`, #31 item 4): every reader of the model's logits sees π', π
renormalised over the vocabulary without that token — the fused LM head (values and gradients), the
model's own logits, PPO's log-probs and entropy, and the sampler, which never draws it."""
import dataclasses

import pytest
import torch
from torch import nn

from directpo.data import Example, collate_padded, tokenize_example
from directpo.eval.sampling import generate_completions
from directpo.logprobs import sequence_logps
from directpo.models import load_model, suppress_token, suppressed_token
from directpo.rlhf.ppo import policy_forward


def renormalised_sequence_logps(model, batch, banned: int) -> torch.Tensor:
    """The textbook π': full logits, log π − log(1 − π(banned)) at every label, summed per row."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()[:, :-1]
    logp = torch.log_softmax(logits, dim=-1)
    logp = logp - torch.log1p(-logp[..., banned].exp())[..., None]
    tok = logp.gather(2, batch.input_ids[:, 1:, None]).squeeze(-1)
    T = batch.input_ids.shape[1]
    mask = torch.zeros_like(tok, dtype=torch.bool)
    mask.view(-1)[batch.label_pos - batch.label_pos // T] = True
    return (tok * mask).sum(1)


@pytest.fixture
def banned_setup(tiny_model, tiny_tokenizer):
    """A batch whose responses carry no EOS (as fixed-length completions do), the model, EOS's id."""
    exs = [Example("Review of Kalo:", [" It was great, warm and fresh.", " It was dull."], "t", 0),
           Example("Hi", [" ok", " no thanks, it was messy and weak and flat."], "t", 1)]
    eos = tiny_tokenizer.eos_token_id
    tok = [tokenize_example(e, tiny_tokenizer) for e in exs]
    tok = [dataclasses.replace(t, response_ids=[r[:-1] if r[-1] == eos else r for r in t.response_ids]) for t in tok]
    assert all(eos not in r for t in tok for r in t.response_ids)
    torch.manual_seed(0)
    model = load_model(str(tiny_model))
    return collate_padded(tok, tiny_tokenizer.pad_token_id), model, eos


def test_suppressed_log_probs_are_the_renormalised_ones_values_and_gradients(banned_setup):
    batch, model, eos = banned_setup
    plain = sequence_logps(model, batch).detach()
    suppress_token(model, eos)
    assert suppressed_token(model) == eos == suppressed_token(model.get_output_embeddings())
    w = torch.linspace(-1, 1, 4)

    def grads(fn):
        model.zero_grad()
        out = fn()
        (out * w).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (want, g_want) = grads(lambda: renormalised_sequence_logps(model, batch, eos))
    for fused in (True, False):
        got, g_got = grads(lambda: sequence_logps(model, batch, fused=fused))
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-6), (fused, got, want)
        for name in g_want:
            assert torch.allclose(g_got[name], g_want[name], atol=1e-5, rtol=1e-4), (fused, name)
    # π' gives every kept token more probability than π did: each sequence's log-prob rises
    assert (want > plain).all()
    # the mark is the run's, not the model's: not in the weights, and it can be cleared
    assert not any("suppress" in k for k in model.state_dict())
    suppress_token(model, None)
    assert suppressed_token(model) is None
    assert torch.allclose(sequence_logps(model, batch).detach(), plain, atol=1e-6)


def test_ppo_log_probs_and_entropy_are_the_renormalised_distributions(banned_setup):
    batch, model, eos = banned_setup
    suppress_token(model, eos)
    value_head = nn.Linear(model.config.hidden_size, 1)
    with torch.no_grad():
        logp, _, ent = policy_forward(model, value_head, batch, entropy=True)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        rows = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.label_pos)
        rows[:, eos] = -float("inf")
        want = torch.log_softmax(rows, -1)
        p = want.exp()
        want_ent = -(p * want.masked_fill(p == 0, 0)).sum(-1)
    assert torch.allclose(logp, want.gather(1, batch.label_ids[:, None]).squeeze(1), atol=1e-5)
    assert torch.isfinite(ent).all() and torch.allclose(ent, want_ent, atol=1e-4)


def test_the_sampler_never_draws_the_suppressed_token(tiny_model, tiny_tokenizer):
    model = load_model(str(tiny_model))
    eos = tiny_tokenizer.eos_token_id
    prompts = [tiny_tokenizer("Review of Kalo:")["input_ids"], tiny_tokenizer("Hi")["input_ids"]] * 8
    # Make EOS the likeliest token everywhere: unsuppressed, most rows stop at once
    head = model.get_output_embeddings()
    head.bias = nn.Parameter(torch.zeros(head.out_features))
    with torch.no_grad():
        head.bias[eos] = 20.0
    free = generate_completions(model, tiny_tokenizer, prompts, max_new_tokens=12, seed=1)
    assert sum(len(c) < 12 for c in free) >= 8 and any(eos in c for c in free)
    suppress_token(model, eos)
    for temperature in (0.0, 1.0):
        fixed = generate_completions(model, tiny_tokenizer, prompts, max_new_tokens=12, seed=1,
                                     temperature=temperature)
        assert all(len(c) == 12 and eos not in c for c in fixed)
