"""The DPO loss against hand-computed values, the paper's appendix-B code, and the gradient of A.4."""
import math

import pytest
import torch
import torch.nn.functional as F

from directpo.losses import dpo_loss, get_pairwise_loss, implicit_reward


def paper_appendix_b_dpo_loss(pi_logps, ref_logps, yw_idxs, yl_idxs, beta):
    """Verbatim logic of the paper's appendix-B snippet (the reference we must agree with)."""
    pi_yw_logps, pi_yl_logps = pi_logps[yw_idxs], pi_logps[yl_idxs]
    ref_yw_logps, ref_yl_logps = ref_logps[yw_idxs], ref_logps[yl_idxs]
    pi_logratios = pi_yw_logps - pi_yl_logps
    ref_logratios = ref_yw_logps - ref_yl_logps
    losses = -F.logsigmoid(beta * (pi_logratios - ref_logratios))
    rewards = beta * (pi_logps - ref_logps).detach()
    return losses, rewards


def test_hand_computed_values():
    # h = (−1 − (−2)) − (−1.5 − (−1.5)) = 1;  loss = −log σ(0.1·1) = log(1 + e^{−0.1})
    out = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), beta=0.1)
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-0.1)), abs=1e-7)
    assert out.chosen_rewards.item() == pytest.approx(0.05, abs=1e-7)
    assert out.rejected_rewards.item() == pytest.approx(-0.05, abs=1e-7)
    # A pair ordered wrongly by the policy relative to the reference costs more than log 2.
    bad = dpo_loss(torch.tensor([-3.0]), torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    assert bad.losses.item() == pytest.approx(math.log(1 + math.exp(1.0)), abs=1e-6)
    # policy = reference: every pair costs exactly log 2
    same = dpo_loss(torch.tensor([-4.0, -7.0]), torch.tensor([-5.0, -1.0]), torch.tensor([-4.0, -7.0]),
                    torch.tensor([-5.0, -1.0]), beta=0.3)
    assert torch.allclose(same.losses, torch.full((2,), math.log(2.0)))


def test_matches_paper_appendix_b_snippet():
    g = torch.Generator().manual_seed(0)
    T = 16
    pi = -20 * torch.rand(2 * T, generator=g, dtype=torch.float64)
    ref = -20 * torch.rand(2 * T, generator=g, dtype=torch.float64)
    perm = torch.randperm(2 * T, generator=g)
    yw, yl = perm[:T], perm[T:]
    for beta in (0.05, 0.1, 0.5, 1.0):
        losses, rewards = paper_appendix_b_dpo_loss(pi, ref, yw, yl, beta)
        out = dpo_loss(pi[yw], pi[yl], ref[yw], ref[yl], beta=beta)
        assert torch.allclose(out.losses, losses, atol=1e-12)
        assert torch.allclose(out.chosen_rewards, rewards[yw], atol=1e-12)
        assert torch.allclose(out.rejected_rewards, rewards[yl], atol=1e-12)


def test_gradient_matches_appendix_a4():
    """∂L/∂log π(yw) = −β·σ(r̂(yl) − r̂(yw)),  ∂L/∂log π(yl) = +β·σ(r̂(yl) − r̂(yw)).

    (The notes' A.4 writes the weight as σ(r̂(yw) − r̂(yl)), a sign typo: the paper weights a pair by
    how wrongly the implicit reward orders it.)
    """
    g = torch.Generator().manual_seed(1)
    beta = 0.2
    pc = (-10 * torch.rand(8, generator=g, dtype=torch.float64)).requires_grad_()
    pr = (-10 * torch.rand(8, generator=g, dtype=torch.float64)).requires_grad_()
    rc = -10 * torch.rand(8, generator=g, dtype=torch.float64)
    rr = -10 * torch.rand(8, generator=g, dtype=torch.float64)
    dpo_loss(pc, pr, rc, rr, beta=beta).losses.sum().backward()
    weight = torch.sigmoid(implicit_reward(pr, rr, beta) - implicit_reward(pc, rc, beta)).detach()
    assert torch.allclose(pc.grad, -beta * weight)
    assert torch.allclose(pr.grad, beta * weight)


def test_label_smoothing_is_conservative_dpo():
    args = (torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]), torch.tensor([-1.2, -2.0]),
            torch.tensor([-1.8, -2.0]))
    plain = dpo_loss(*args, beta=0.1)
    assert torch.equal(dpo_loss(*args, beta=0.1, label_smoothing=0.0).losses, plain.losses)
    eps = 0.2
    h = (args[0] - args[1]) - (args[2] - args[3])
    expected = -(1 - eps) * F.logsigmoid(0.1 * h) - eps * F.logsigmoid(-0.1 * h)
    assert torch.allclose(dpo_loss(*args, beta=0.1, label_smoothing=eps).losses, expected)


def test_registry():
    assert get_pairwise_loss("dpo") is dpo_loss
    with pytest.raises(ValueError, match="unknown loss"):
        get_pairwise_loss("nope")
