"""KTO and BCO (pairs) against each paper's formula, written out here independently of the library:
plain-float `math` per example in fp64, gradients by central finite differences of that formula;
KTO's reference point z0 clamped at 0 and detached; BCO's δ an argument, its running mean the trainer's."""
import math

import pytest
import torch

from directpo import losses as L
from directpo.losses import LOSSES, LossInputs, LossParams, combine_losses, get_loss
from directpo.metrics import mean_metrics
from directpo.training.loop import RunningMean

B = 9


def sig(z):
    return 1 / (1 + math.exp(-z))


def logsig(z):
    return -math.log1p(math.exp(-z))


def _fd(f, args, k, h=1e-5):
    up, down = list(args), list(args)
    up[k] += h
    down[k] -= h
    return (f(*up) - f(*down)) / (2 * h)


# ---- KTO (Ethayarajh et al. 2024, eq. 7): L = λ_y − v(x, y) ------------------------------------

def kto_formula(beta, lam_d, lam_u):
    """(policy log-prob, reference log-prob, desirable?, z0) -> the example's loss."""
    def f(pol, ref, desirable, z0):
        r = pol - ref
        if desirable:
            return lam_d - lam_d * sig(beta * (r - z0))
        return lam_u - lam_u * sig(beta * (z0 - r))
    return f


def z0_formula(pol_kl, ref_kl):
    """max(0, mean of the mismatched log-ratios)."""
    return max(0.0, sum(p - r for p, r in zip(pol_kl, ref_kl)) / len(pol_kl))


def _kto_inputs(seed: int, kl_shift: float):
    """(B, 2) summed log-probs [own, mismatched] of policy and reference, labels mixed; `kl_shift`
    moves the mismatched log-ratios so that their mean is positive or negative."""
    g = torch.Generator().manual_seed(seed)
    pol = -1 - 20 * torch.rand(B, 2, generator=g, dtype=torch.float64)
    ref = pol + 4 * torch.randn(B, 2, generator=g, dtype=torch.float64)
    ref[:, 1] = pol[:, 1] - kl_shift + 0.2 * torch.randn(B, generator=g, dtype=torch.float64)
    labels = torch.tensor([True, False, True, True, False, False, True, False, True])
    return pol, ref, labels


@pytest.mark.parametrize("beta,lam_d,lam_u,kl_shift", [(0.1, 1.0, 1.0, 3.0), (0.5, 1.0, 1.33, 3.0),
                                                       (0.3, 2.0, 0.7, -3.0), (1.0, 1.0, 1.0, -0.5)])
def test_kto_value_and_gradient_match_the_papers_formula(beta, lam_d, lam_u, kl_shift):
    pol, ref, labels = _kto_inputs(int(10 * beta) + int(kl_shift), kl_shift)
    spec = LOSSES["kto"]
    assert spec.unpaired and not spec.pairwise and spec.needs_reference and spec.help
    x = pol.clone().requires_grad_()
    p = LossParams(beta=beta, kto_desirable_weight=lam_d, kto_undesirable_weight=lam_u)
    out = spec.fn(LossInputs(x, ref, torch.ones_like(pol), labels=labels), p)
    out.losses.sum().backward()
    z0 = z0_formula(pol[:, 1].tolist(), ref[:, 1].tolist())
    assert (z0 > 0) is (kl_shift > 0)  # both sides of the clamp are exercised
    f = kto_formula(beta, lam_d, lam_u)
    for i in range(B):
        args = (pol[i, 0].item(), ref[i, 0].item(), bool(labels[i]), z0)
        assert out.losses[i].item() == pytest.approx(f(*args), rel=1e-12, abs=1e-14), i
        # ∂L/∂ log πθ(y|x) with z0 held fixed: z0 is detached
        assert x.grad[i, 0].item() == pytest.approx(_fd(f, args, 0), rel=1e-6, abs=1e-10), i
    assert torch.equal(x.grad[:, 1], torch.zeros(B, dtype=torch.float64))  # no gradient through z0
    assert out.rewards is None and out.losses.shape == (B,)
    stats = {k: float(v) for k, v in out.stats.items()}
    assert stats["kl"] == pytest.approx(z0 * B, rel=1e-12, abs=1e-14)
    r = [beta * (a - b) for a, b in zip(pol[:, 0].tolist(), ref[:, 0].tolist())]
    good = labels.tolist()
    means = mean_metrics(stats, B)
    assert means["kl"] == pytest.approx(z0, abs=1e-14)
    assert means["rewards/desirable"] == pytest.approx(sum(v for v, d in zip(r, good) if d) / sum(good), rel=1e-12)
    assert means["rewards/undesirable"] == pytest.approx(
        sum(v for v, d in zip(r, good) if not d) / (B - sum(good)), rel=1e-12)


def test_kto_reference_point_is_clamped_at_zero_and_detached():
    pol_kl = torch.tensor([-3.0, -5.0, -2.0], dtype=torch.float64, requires_grad=True)
    above = L.kto_reference_point(pol_kl, torch.tensor([-4.0, -6.0, -2.5], dtype=torch.float64))
    assert above.item() == pytest.approx((1 + 1 + 0.5) / 3, rel=1e-15) and not above.requires_grad
    below = L.kto_reference_point(pol_kl, torch.tensor([-1.0, -4.0, -2.0], dtype=torch.float64))
    assert below.item() == 0.0 and not below.requires_grad  # mean −1: clamped


def test_kto_takes_the_trainers_batch_reference_point():
    """The trainer passes z0 of the whole batch (`kto_kl`); then this call's mismatched column is
    ignored (it may be absent: the grad pass runs the own completions alone), and a negative value
    is clamped at 0."""
    pol, ref, labels = _kto_inputs(2, 3.0)
    f = kto_formula(0.2, 1.0, 1.0)
    for given, used in ((0.37, 0.37), (-2.0, 0.0)):
        own = LossInputs(pol[:, :1], ref[:, :1], torch.ones(B, 1, dtype=torch.float64), labels=labels)
        out = LOSSES["kto"].fn(own, LossParams(beta=0.2, kto_kl=given))
        expected = [f(pol[i, 0].item(), ref[i, 0].item(), bool(labels[i]), used) for i in range(B)]
        assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
        assert float(out.stats["kl"]) == pytest.approx(used * B)


def test_kto_direct_function_equals_the_registry_and_cites_its_paper():
    pol, ref, labels = _kto_inputs(3, 1.0)
    z0 = L.kto_reference_point(pol[:, 1], ref[:, 1])
    losses, rewards = L.kto_loss(pol[:, 0], ref[:, 0], labels, z0, beta=0.4, desirable_weight=1.2,
                                 undesirable_weight=0.9)
    reg = LOSSES["kto"].fn(LossInputs(pol, ref, torch.ones_like(pol), labels=labels),
                           LossParams(beta=0.4, kto_desirable_weight=1.2, kto_undesirable_weight=0.9))
    assert torch.equal(losses, reg.losses)
    assert torch.allclose(rewards, 0.4 * (pol[:, 0] - ref[:, 0]), rtol=1e-15, atol=0) and not rewards.requires_grad
    assert "2024" in L.kto_loss.__doc__ and "mismatched" in L.kto_reference_point.__doc__


def test_kto_at_the_reference_is_half_its_weights():
    """πθ = πref: every r = 0 and z0 = 0, so each loss is λ·(1 − σ(0)) = λ/2."""
    pol, _, labels = _kto_inputs(4, 0.0)
    out = LOSSES["kto"].fn(LossInputs(pol, pol.clone(), torch.ones_like(pol), labels=labels),
                           LossParams(kto_desirable_weight=2.0, kto_undesirable_weight=0.5))
    assert out.losses.tolist() == pytest.approx([1.0 if d else 0.25 for d in labels.tolist()], abs=1e-15)


def test_kto_refuses_pairs_and_combinations():
    pol, ref, _ = _kto_inputs(5, 1.0)
    with pytest.raises(ValueError, match="unpaired"):
        LOSSES["kto"].fn(LossInputs(pol, ref, torch.ones_like(pol)), LossParams())
    with pytest.raises(ValueError, match="cannot be summed"):
        get_loss("kto,sft")
    assert get_loss("kto", "2").unpaired  # a one-component sum is still the unpaired loss, scaled


# ---- BCO on pairs (Jung et al. 2024) -------------------------------------------------------------

def bco_formula(beta, delta):
    def f(pc, pr, rc, rr):
        return -logsig(beta * (pc - rc) - delta) - logsig(-(beta * (pr - rr) - delta))
    return f


def _pair_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    pol = -1 - 20 * torch.rand(B, 2, generator=g, dtype=torch.float64)
    return pol, pol + 3 * torch.randn(B, 2, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("beta,delta", [(0.1, 0.0), (0.1, 0.25), (0.5, -0.4), (2.0, 1.3)])
def test_bco_pair_value_and_gradient_match_the_papers_formula(beta, delta):
    pol, ref = _pair_inputs(int(10 * beta))
    spec = LOSSES["bco_pair"]
    assert spec.pairwise and spec.needs_reference and spec.running_mean and not spec.unpaired and spec.help
    x = pol.clone().requires_grad_()
    out = spec.fn(LossInputs(x, ref, torch.ones_like(pol)), LossParams(beta=beta, bco_delta=delta))
    out.losses.sum().backward()
    f = bco_formula(beta, delta)
    for i in range(B):
        args = (*pol[i].tolist(), *ref[i].tolist())
        assert out.losses[i].item() == pytest.approx(f(*args), rel=1e-12, abs=1e-14), i
        for k in (0, 1):
            assert x.grad[i, k].item() == pytest.approx(_fd(f, args, k), rel=1e-6, abs=1e-10), (i, k)
    assert torch.allclose(out.rewards, beta * (pol - ref), rtol=1e-15, atol=0) and not out.rewards.requires_grad
    rw, rl = beta * (pol[:, 0] - ref[:, 0]), beta * (pol[:, 1] - ref[:, 1])
    means = mean_metrics({k: float(v) for k, v in out.stats.items()}, B)
    # the batch mean over chosen and rejected (TRL: torch.cat((chosen, rejected)).mean()) and the δ used
    assert means["bco/batch_reward"] == pytest.approx(torch.cat([rw, rl]).mean().item(), rel=1e-12)
    assert means["bco/delta"] == pytest.approx(delta, abs=1e-15)


def test_bco_pair_direct_function_and_its_value_at_the_reference():
    pol, ref = _pair_inputs(7)
    direct = L.bco_pair_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=0.3, delta=0.2)
    reg = LOSSES["bco_pair"].fn(LossInputs(pol, ref, torch.ones_like(pol)), LossParams(beta=0.3, bco_delta=0.2))
    assert torch.equal(direct.losses, reg.losses) and "2024" in L.bco_pair_loss.__doc__
    assert L.get_pairwise_loss("bco_pair") is L.bco_pair_loss
    at_ref = LOSSES["bco_pair"].fn(LossInputs(pol, pol.clone(), torch.ones_like(pol)), LossParams())
    assert torch.allclose(at_ref.losses, torch.full((B,), 2 * math.log(2), dtype=torch.float64), atol=1e-15)


def test_bco_pair_combines_and_keeps_its_running_mean_flag():
    pol, ref = _pair_inputs(8)
    spec = combine_losses(["dpo", "bco_pair"], [1.0, 0.5])
    assert spec.running_mean and spec.pairwise and not spec.unpaired
    p = LossParams(beta=0.2, bco_delta=0.1)
    x = LossInputs(pol, ref, torch.ones_like(pol))
    out = spec.fn(x, p)
    assert torch.allclose(out.losses, LOSSES["dpo"].fn(x, p).losses + 0.5 * LOSSES["bco_pair"].fn(x, p).losses,
                          rtol=1e-12)
    assert set(out.stats) == {"bco/delta", "bco/batch_reward"}


def test_running_mean_is_the_plain_mean_of_every_batch_seen():
    """TRL's RunningMoments: a count-weighted mean of all batches, not an exponential moving average."""
    values = [0.5, -1.25, 3.0, 0.125, 2.0]
    m = RunningMean()
    for k, v in enumerate(values, 1):
        m.update(v)
        assert m.count == k and m.mean == pytest.approx(sum(values[:k]) / k, rel=1e-15)
