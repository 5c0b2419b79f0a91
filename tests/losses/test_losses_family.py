"""Plackett–Luce, IPO, cDPO, hinge, SFT and Unlikelihood against closed forms and hand values."""
import itertools
import math

import pytest
import torch

from directpo.losses import (LOSSES, LossInputs, LossParams, cdpo_loss, dpo_loss, hinge_loss, ipo_avg_loss,
                             ipo_loss, plackett_luce_loss, unlikelihood_loss, unlikelihood_terms)
from directpo.metrics import ranking_metrics

NAN = float("nan")


def _rand(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return -30 * torch.rand(shape, generator=g, dtype=torch.float64)


def test_plackett_luce_with_k2_is_dpo():
    pol, ref = _rand((16, 2), 0), _rand((16, 2), 1)
    for beta in (0.1, 0.5, 2.0):
        pl, rewards = plackett_luce_loss(pol, ref, beta)
        d = dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta)
        assert torch.allclose(pl, d.losses, atol=1e-12)
        assert torch.allclose(rewards[:, 0], d.chosen_rewards) and torch.allclose(rewards[:, 1], d.rejected_rewards)


def _pl_closed_form(r):
    """−log Π_k exp(r_k)/Σ_{j≥k} exp(r_j), written out term by term."""
    K = len(r)
    return -sum(r[k] - torch.logsumexp(r[k:], 0) for k in range(K))


def test_plackett_luce_matches_product_of_softmaxes_and_ragged_k():
    pol, ref = _rand((3, 4), 2), _rand((3, 4), 3)
    pol[1, 3] = ref[1, 3] = NAN  # K = 3 in row 1
    pol[2, 2:] = ref[2, 2:] = NAN  # K = 2 in row 2
    losses, _ = plackett_luce_loss(pol, ref, 0.3)
    for i, K in enumerate((4, 3, 2)):
        expected = _pl_closed_form(0.3 * (pol[i, :K] - ref[i, :K]))
        assert losses[i].item() == pytest.approx(expected.item(), abs=1e-10)
    # probability of the ranking, summed over all K! orders, is 1 (it is a distribution)
    r = 0.3 * (pol[0] - ref[0])
    total = sum(math.exp(-_pl_closed_form(r[list(p)]).item()) for p in itertools.permutations(range(4)))
    assert total == pytest.approx(1.0, abs=1e-9)


def test_plackett_luce_gradient_matches_closed_form():
    """∂L/∂r_k = −1 + Σ_{m ≤ k} softmax(r_{m:})_k  (the gradient of the product of softmaxes)."""
    r = _rand((5,), 4).requires_grad_()
    losses, _ = plackett_luce_loss(r[None], torch.zeros(1, 5, dtype=torch.float64), beta=1.0)
    losses.sum().backward()
    with torch.no_grad():
        expected = torch.full((5,), -1.0, dtype=torch.float64)
        for m in range(5):
            expected[m:] += torch.softmax(r[m:], 0)
    assert torch.allclose(r.grad, expected, atol=1e-12)


def test_lemma1_invariance_to_a_per_prompt_shift():
    """Rewards r and r + f(x) induce the same preferences: PL and DPO losses are unchanged when
    every response of a prompt gets the same log-prob offset."""
    pol, ref = _rand((6, 4), 5), _rand((6, 4), 6)
    f = 100 * torch.randn(6, 1, dtype=torch.float64)
    a, _ = plackett_luce_loss(pol, ref, 0.2)
    b, _ = plackett_luce_loss(pol + f, ref, 0.2)
    assert torch.allclose(a, b, atol=1e-9)
    d1 = dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], 0.2).losses
    d2 = dpo_loss(pol[:, 0] + f[:, 0], pol[:, 1] + f[:, 0], ref[:, 0], ref[:, 1], 0.2).losses
    assert torch.allclose(d1, d2, atol=1e-9)


def test_ipo_cdpo_hinge_hand_values():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.5))  # h = 1
    assert ipo_loss(pc, pr, rc, rr, beta=0.1).losses.item() == pytest.approx((1 - 5.0) ** 2)
    assert ipo_loss(pc, pr, rc, rr, beta=0.5).losses.item() == pytest.approx(0.0)
    assert hinge_loss(pc, pr, rc, rr, beta=0.1).losses.item() == pytest.approx(0.9)
    assert hinge_loss(pc, pr, rc, rr, beta=2.0).losses.item() == 0.0
    expected = -(0.9 * math.log(1 / (1 + math.exp(-0.1))) + 0.1 * math.log(1 / (1 + math.exp(0.1))))
    assert cdpo_loss(pc, pr, rc, rr, beta=0.1).losses.item() == pytest.approx(expected, abs=1e-6)


def test_ipo_avg_matches_per_token_average_by_hand():
    """TRL's IPO: every log-prob divided by its response's length, then (h − 1/(2β))²."""
    g = torch.Generator().manual_seed(11)
    tokens = {k: torch.log(torch.rand(n, generator=g, dtype=torch.float64)) for k, n in
              (("pc", 3), ("pr", 7), ("rc", 3), ("rr", 7))}  # per-token log-probs: |yw| = 3, |yl| = 7
    avg = {k: sum(v.tolist()) / len(v) for k, v in tokens.items()}
    beta = 0.3
    h = (avg["pc"] - avg["rc"]) - (avg["pr"] - avg["rr"])
    s = {k: v.sum()[None] for k, v in tokens.items()}
    out = ipo_avg_loss(s["pc"], s["pr"], s["rc"], s["rr"], torch.tensor([3.0]), torch.tensor([7.0]), beta=beta)
    assert out.losses.item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(beta * (avg["pc"] - avg["rc"]), rel=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(beta * (avg["pr"] - avg["rr"]), rel=1e-12)
    # through the registry, which reads the lengths from LossInputs
    x = LossInputs(torch.cat([s["pc"], s["pr"]])[None], torch.cat([s["rc"], s["rr"]])[None],
                   torch.tensor([[3.0, 7.0]], dtype=torch.float64))
    got = LOSSES["ipo_avg"].fn(x, LossParams(beta=beta))
    assert got.losses.item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-12)
    # with different lengths the summed and the averaged forms differ
    assert LOSSES["ipo"].fn(x, LossParams(beta=beta)).losses.item() != pytest.approx(got.losses.item())


def test_ipo_and_ipo_avg_agree_on_one_token_responses():
    pol, ref = _rand((16, 2), 20), _rand((16, 2), 21)
    x = LossInputs(pol, ref, torch.ones(16, 2, dtype=torch.float64))
    for beta in (0.05, 0.5, 2.0):
        a, b = LOSSES["ipo"].fn(x, LossParams(beta=beta)), LOSSES["ipo_avg"].fn(x, LossParams(beta=beta))
        assert torch.equal(a.losses, b.losses) and torch.equal(a.rewards, b.rewards)


def test_reference_free_is_a_constant_sequence_reference_not_a_per_token_uniform_one():
    """reference_free = DPO with log πref(y|x) = c for every y (any constant); a per-token uniform
    reference, log πref(y|x) = −|y|·log V, is that only when the lengths are equal."""
    pol = _rand((8, 2), 22)
    lengths = torch.tensor([[3.0, 9.0]] * 8, dtype=torch.float64)
    free = LOSSES["reference_free"].fn(LossInputs(pol, None, lengths), LossParams(beta=0.2)).losses
    const = dpo_loss(pol[:, 0], pol[:, 1], torch.full((8,), -7.0, dtype=torch.float64),
                     torch.full((8,), -7.0, dtype=torch.float64), beta=0.2).losses
    assert torch.allclose(free, const, atol=1e-12)
    uniform = -lengths * math.log(600)
    per_token = dpo_loss(pol[:, 0], pol[:, 1], uniform[:, 0], uniform[:, 1], beta=0.2).losses
    assert not torch.allclose(free, per_token)


def test_unlikelihood_matches_token_level_computation():
    g = torch.Generator().manual_seed(7)
    chosen_tok = torch.log(torch.rand(5, generator=g, dtype=torch.float64))
    rejected_tok = torch.log(torch.rand(7, generator=g, dtype=torch.float64))
    direct = -chosen_tok.sum().item() / 5 + 0.5 * sum(-math.log(1 - math.exp(t)) for t in rejected_tok.tolist()) / 7
    got = unlikelihood_loss(chosen_tok.sum()[None], torch.tensor([5.0]), unlikelihood_terms(rejected_tok).sum()[None],
                            torch.tensor([7.0]), weight=0.5)
    assert got.item() == pytest.approx(direct, rel=1e-9)
    # stable when a rejected token is nearly certain
    assert torch.isfinite(unlikelihood_terms(torch.tensor([0.0, -1e-12]))).all()


def test_registry_runs_every_loss_on_the_same_inputs():
    pol = _rand((4, 3), 8)
    pol[0, 2] = NAN
    ref = _rand((4, 3), 9)
    ref[0, 2] = NAN
    x = LossInputs(pol, ref, torch.full((4, 3), 5.0), unlikelihood=torch.rand(4, 3, dtype=torch.float64))
    labels = torch.tensor([True, False, True, False])
    for name, spec in LOSSES.items():
        two = spec.pairwise or spec.unpaired  # unpaired (kto): [own, mismatched] completions and a label each
        xi = x if not two else LossInputs(pol[:, :2], ref[:, :2], x.lengths[:, :2], x.unlikelihood[:, :2],
                                          labels if spec.unpaired else None)
        out = spec.fn(xi, LossParams())
        assert out.losses.shape == (4,) and torch.isfinite(out.losses).all(), name
        assert (out.rewards is None) == (name in ("sft", "unlikelihood", "kto")), name


def test_ranking_metrics():
    r = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0], [2.0, 3.0, 1.0, NAN], [1.0, 1.0, NAN, NAN]])
    m = ranking_metrics(r)
    assert m["kendall_tau"].tolist() == [1.0, -1.0, pytest.approx(1 / 3), 0.0]
    assert m["top1"].tolist() == [1.0, 0.0, 0.0, 0.0]  # row 3: a tie at the top is wrong
    assert m["accuracy"].tolist() == [1.0, 0.0, pytest.approx(2 / 3), 0.0]
