"""The sequence-level KL(π‖πref) estimator of `directpo eval`: zero for π = πref, and equal (within
its standard error) to the exact KL computed by enumerating every completion of ≤ 2 tokens."""
import math

import pytest
import torch

from directpo.eval.evaluate import completion_logps, sequence_kl
from directpo.data.prompts import PromptItem, encode_prompt
from directpo.eval.sample import draw_samples
from directpo.models import load_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sharp_pair(tiny_model, tiny_tokenizer, tmp_path_factory):
    """π and πref: the tiny model with its LM head sharpened (random init is near uniform), and a
    perturbed copy, so the KL between them is O(1) nats."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("kl")
    pol = load_model(str(tiny_model))
    w = pol.lm_head.weight.data.clone()
    pol.lm_head.weight.data = 40 * w
    ref = load_model(str(tiny_model))
    ref.lm_head.weight.data = 40 * (w + 0.015 * torch.randn_like(w))
    for model, name in ((pol, "pi"), (ref, "ref")):
        model.save_pretrained(out / name)
        tiny_tokenizer.save_pretrained(out / name)
    return load_model(str(out / "pi")), load_model(str(out / "ref"))


@torch.no_grad()
def _next_token_logprobs(model, prefixes: list[list[int]]) -> torch.Tensor:
    """(len(prefixes), V) log π(· | prefix); prefixes of equal length, no padding needed."""
    ids = torch.tensor(prefixes)
    return torch.log_softmax(model(input_ids=ids).logits[:, -1].double(), -1)


def _exact_kl_two_tokens(pol, ref, prompt: list[int], eos: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """KL over all y of ≤ 2 tokens (y = (eos) or (y1, y2)), and the two models' log π(y1, y2 | x)."""
    p1, q1 = _next_token_logprobs(pol, [prompt])[0], _next_token_logprobs(ref, [prompt])[0]
    V = p1.shape[0]
    prefixes = [prompt + [t] for t in range(V)]
    p2, q2 = _next_token_logprobs(pol, prefixes), _next_token_logprobs(ref, prefixes)  # (V, V)
    kl2 = (p2.exp() * (p2 - q2)).sum(-1)  # KL of the second token given y1
    kl2[eos] = 0.0  # y = (eos): the sequence ends after one token
    kl = (p1.exp() * ((p1 - q1) + kl2)).sum().item()
    return kl, p1[:, None] + p2, q1[:, None] + q2


def test_kl_is_zero_when_policy_is_reference(tiny_model, tiny_tokenizer):
    a, b = load_model(str(tiny_model)), load_model(str(tiny_model))
    items = [PromptItem("Review of Kalo:"), PromptItem("Review of Sa:")]
    s = draw_samples(a, tiny_tokenizer, items, n=8, max_new_tokens=6, seed=0)
    kl = sequence_kl(a, b, s, tiny_tokenizer.pad_token_id)
    assert kl["kl_mean"] == 0.0 and kl["kl_se"] == 0.0 and kl["kl_samples"] == 16
    assert (kl["logps"] < 0).all()


def test_kl_matches_exact_enumeration(sharp_pair, tiny_tokenizer):
    pol, ref = sharp_pair
    eos = tiny_tokenizer.eos_token_id
    prompt = "Review of Kalo:"
    x = encode_prompt(prompt, tiny_tokenizer)
    exact, logp_pol, logp_ref = _exact_kl_two_tokens(pol, ref, x, eos)
    assert 0.3 < exact < 20  # a KL worth estimating

    n = 3000
    s = draw_samples(pol, tiny_tokenizer, [PromptItem(prompt)], n=n, max_new_tokens=2, seed=1, batch_size=500)
    assert all(len(c) == 2 or c == [eos] for c in s.completion_ids)
    # 1. the estimator's per-sample log-probs (directpo.logprobs, padded batches) are the exact ones
    lp = completion_logps(pol, s.prompt_ids[:200], s.completion_ids[:200], tiny_tokenizer.pad_token_id, 64)
    lq = completion_logps(ref, s.prompt_ids[:200], s.completion_ids[:200], tiny_tokenizer.pad_token_id, 64)
    for k, c in enumerate(s.completion_ids[:200]):
        if len(c) == 2:
            assert lp[k].item() == pytest.approx(logp_pol[c[0], c[1]].item(), abs=2e-4)
            assert lq[k].item() == pytest.approx(logp_ref[c[0], c[1]].item(), abs=2e-4)
    # 2. the sampled estimate agrees with the exact KL within a few standard errors
    kl = sequence_kl(pol, ref, s, tiny_tokenizer.pad_token_id, batch_size=500)
    assert kl["kl_se"] > 0
    z = (kl["kl_mean"] - exact) / kl["kl_se"]
    assert abs(z) < 4, (kl["kl_mean"], kl["kl_se"], exact)
    assert kl["kl_se"] < 0.1 * exact  # and the test has power: the standard error is small


def test_samples_follow_the_policy_distribution(tiny_model, tiny_tokenizer):
    """Sampling applies no hidden filter (top-k 50 is transformers' default): the first token's
    empirical frequencies match π(y1|x), including tokens outside the top 50."""
    pol = load_model(str(tiny_model))
    x = encode_prompt("Review of Mi:", tiny_tokenizer)
    p1 = _next_token_logprobs(pol, [x])[0].exp()
    n = 3000
    s = draw_samples(pol, tiny_tokenizer, [PromptItem("Review of Mi:")], n=n, max_new_tokens=1, seed=3, batch_size=1000)
    counts = torch.bincount(torch.tensor([c[0] for c in s.completion_ids]), minlength=p1.shape[0]).double()
    tail = p1.argsort(descending=True)[50:]
    expected_tail = p1[tail].sum().item()
    observed_tail = counts[tail].sum().item() / n
    assert expected_tail > 0.5
    assert observed_tail == pytest.approx(expected_tail, abs=4 * math.sqrt(expected_tail * (1 - expected_tail) / n))
