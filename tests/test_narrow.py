"""directpo.narrow: the last decoder layer computes only the rows the LM head reads — the same log-probs
and gradients as the whole layer, in every layout, with fewer rows through its MLP and attention."""
import pytest
import torch

from directpo import attention, narrow
from directpo.data import Example, collate_packed, collate_padded, parse_row, tokenize_example
from directpo.logprobs import example_logps
from directpo.losses import dpo_loss
from directpo.models import load_model

from conftest import hh_rows


@pytest.fixture(scope="module")
def model(tiny_model):
    torch.manual_seed(0)
    return load_model(str(tiny_model))


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    exs = [Example("Review of Kalo:", [" It was great, warm and fresh.", " It was dull."], "t", 0),
           Example("Review of a film with a rather long title, and then some:", [" fine", " bad"], "t", 1)]
    exs += [parse_row(r, "hh", 10 + i) for i, r in enumerate(hh_rows(3))]
    return [tokenize_example(e, tiny_tokenizer) for e in exs]


def _batches(tok, pad):
    return {"packed": collate_packed(tok, pad, None), "padded": collate_padded(tok, pad),
            "rows of 64": collate_packed(tok, pad, 64)}


def _grads(model, batch, segmented=True):
    model.zero_grad()
    lp = example_logps(model, batch, segmented=segmented)
    ref = lp.detach() + torch.linspace(-1, 1, lp.numel()).view_as(lp)
    dpo_loss(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], beta=0.1).losses.sum().backward()
    return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("segmented", [True, False])
@pytest.mark.parametrize("layout", ["packed", "padded", "rows of 64"])
def test_narrowed_last_layer_gives_the_whole_layers_logps_and_gradients(model, tok, tiny_tokenizer, monkeypatch,
                                                                         layout, segmented):
    batch = _batches(tok, tiny_tokenizer.pad_token_id)[layout]
    lp, g = _grads(model, batch, segmented)
    monkeypatch.setattr(narrow, "WORTH", 0.0)  # nothing is narrow enough: the whole layer
    lp_whole, g_whole = _grads(model, batch, segmented)
    assert torch.allclose(lp, lp_whole, atol=1e-5, rtol=1e-6), (lp - lp_whole).abs().max()
    assert g.keys() == g_whole.keys()
    for n in g:
        assert torch.allclose(g[n], g_whole[n], atol=1e-6, rtol=1e-4), n


def test_the_last_layer_sees_the_label_rows_only(model, tok, tiny_tokenizer, monkeypatch):
    batch = _batches(tok, tiny_tokenizer.pad_token_id)["packed"]
    layer = narrow.last_decoder_layer(model.base_model)
    seen, queries = [], []
    h = layer.mlp.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[:-1].numel()))  # (as forward got it)
    flash = attention._flash

    def recording(q, *a, **kw):
        queries.append(q.shape[2])
        return flash(q, *a, **kw)

    monkeypatch.setattr(attention, "_flash", recording)
    try:
        example_logps(model, batch)
    finally:
        h.remove()
    kept = torch.unique(batch.label_pos).numel()
    assert seen == [kept] and kept < 0.7 * batch.input_ids.numel()  # HH prompts: most rows are the prompt's
    # two calls per pair and layer: the prompt with the chosen response (causal), the rejected response
    assert len(queries) == 2 * len(tok) * len(model.base_model.layers)
    first, last = queries[:2 * len(tok)], queries[-2 * len(tok):]
    pairs = sorted((len(t.prompt_ids) + len(t.response_ids[0]), len(t.response_ids[1])) for t in tok)
    assert sorted(zip(first[0::2], first[1::2])) == pairs  # (the packed rows order examples their own way)
    # in the last layer a prompt's queries are its last token alone (then all the responses' in one call)
    assert last[0::2] == [1] * len(tok)
    assert sorted(last[1::2]) == sorted(sum(len(r) for r in t.response_ids) for t in tok)
    assert attention._TAIL.get() is None  # and the switch is off again
    assert not layer.mlp._forward_pre_hooks and not layer.self_attn.q_proj._forward_hooks


def test_a_label_on_an_early_prompt_token_keeps_the_prompts_attention_whole(model, tok, tiny_tokenizer, monkeypatch):
    batch = _batches(tok, tiny_tokenizer.pad_token_id)["packed"]
    r, start, P, _ = batch.segments[2]
    extra = r * batch.input_ids.shape[1] + start + P // 2  # a prompt token in the middle predicts its successor
    batch.label_pos = torch.cat([batch.label_pos, torch.tensor([extra])])
    batch.label_ids = torch.cat([batch.label_ids, batch.input_ids.view(-1)[extra + 1:extra + 2]])
    batch.label_seq = torch.cat([batch.label_seq, torch.tensor([0])])
    assert not attention._only_prompt_tails(batch)
    from directpo.logprobs import token_logps

    got = token_logps(model, batch)
    monkeypatch.setattr(narrow, "WORTH", 0.0)
    assert torch.allclose(got, token_logps(model, batch), atol=1e-5, rtol=1e-6)


def test_lora_layers_are_narrowed_with_the_same_results(tiny_model, tok, tiny_tokenizer, monkeypatch):
    from directpo.training.lora import apply_lora

    torch.manual_seed(0)
    model = apply_lora(load_model(str(tiny_model)), r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)  # adapters that change the outputs
    batch = _batches(tok, tiny_tokenizer.pad_token_id)["packed"]
    lp, g = _grads(model, batch)
    monkeypatch.setattr(narrow, "WORTH", 0.0)
    lp_whole, g_whole = _grads(model, batch)
    assert torch.allclose(lp, lp_whole, atol=1e-5, rtol=1e-6)
    assert g.keys() == g_whole.keys() and any("lora" in n for n in g)
    for n in g:
        assert torch.allclose(g[n], g_whole[n], atol=1e-6, rtol=1e-4), n


def test_activation_checkpointing_runs_the_whole_layer(model, tok, tiny_tokenizer, monkeypatch):
    calls = []
    monkeypatch.setattr(narrow, "_rows_only", lambda *a: calls.append(1) or [])
    batch = _batches(tok, tiny_tokenizer.pad_token_id)["padded"]
    model.gradient_checkpointing_enable()
    try:
        model.train()
        _grads(model, batch)
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    assert calls == []
    example_logps(model, batch)
    assert calls  # and without it, the layer is narrowed


def test_reward_model_and_ppo_forwards_read_the_same_numbers(tiny_model, tok, tiny_tokenizer, monkeypatch):
    from directpo.eval.reward_model import load_reward_backbone, pair_rewards
    from directpo.rlhf.ppo import policy_forward

    torch.manual_seed(0)
    rm = load_reward_backbone(str(tiny_model), tiny_tokenizer.pad_token_id)
    policy = load_model(str(tiny_model))
    value_head = torch.nn.Linear(policy.config.hidden_size, 1)
    batch = collate_padded(tok, tiny_tokenizer.pad_token_id)
    seen = []
    rm_layer = narrow.last_decoder_layer(rm.base_model)
    h = rm_layer.mlp.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[:-1].numel()))
    narrowed = pair_rewards(rm, batch), policy_forward(policy, value_head, batch, entropy=True)
    h.remove()
    assert seen == [batch.input_ids.shape[0]]  # the reward model's last layer: one row per sequence
    monkeypatch.setattr(narrow, "WORTH", 0.0)
    whole = pair_rewards(rm, batch), policy_forward(policy, value_head, batch, entropy=True)
    assert torch.allclose(narrowed[0], whole[0], atol=1e-5, equal_nan=True)
    for a, b in zip(narrowed[1], whole[1]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-6)


def test_a_mixture_of_experts_mlp_runs_on_every_row(model):
    from torch import nn

    layer = narrow.last_decoder_layer(model.base_model)
    assert narrow.narrowed_parts(layer) == [layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp]

    class Experts(nn.Module):  # the shape of a sparse MoE block: a router ("gate") and experts
        def __init__(self):
            super().__init__()
            self.gate, self.experts = nn.Linear(4, 2), nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    moe = nn.Module()
    moe.self_attn, moe.mlp = layer.self_attn, Experts()
    assert narrow.narrowed_parts(moe) == [layer.self_attn.q_proj, layer.self_attn.o_proj]
