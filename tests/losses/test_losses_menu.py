"""The preference-optimization menu (SimPO, ORPO, LN-DPO, robust DPO, APO, EXO, NCA, weighted sums)
against each paper's formula, written out here independently of the library: plain-float `math`
per example in fp64, the gradient by central finite differences of that same formula."""
import math

import pytest
import torch

from directpo import losses as L
from directpo.losses import LOSSES, LossInputs, LossParams, combine_losses, get_loss

B = 7


def _inputs(seed: int):
    """Summed log-probs of policy and reference for B pairs of unequal lengths (1–15 tokens): per-token
    means in (−3, −0.05), so every odds, sigmoid and log stays in range for the plain formulas."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 16, (B, 2), generator=g).to(torch.float64)
    lengths[0] = torch.tensor([2.0, 13.0])  # at least one pair far from equal lengths, both ways
    lengths[1] = torch.tensor([11.0, 1.0])
    mean_pol = -0.05 - 2.95 * torch.rand(B, 2, generator=g, dtype=torch.float64)
    mean_ref = -0.05 - 2.95 * torch.rand(B, 2, generator=g, dtype=torch.float64)
    return mean_pol * lengths, mean_ref * lengths, lengths


# ---- the papers' formulas, per example, on floats: (pc, pr, rc, rr, nc, nr) -> loss ----------

def sig(z):
    return 1 / (1 + math.exp(-z))


def logsig(z):
    return -math.log1p(math.exp(-z))


def simpo(beta, gamma):  # Meng et al. 2024
    return lambda pc, pr, rc, rr, nc, nr: -logsig(beta * pc / nc - beta * pr / nr - gamma)


def orpo(lam):  # Hong et al. 2024: odds(y) = P/(1 − P), P = exp(mean token log-prob)
    def f(pc, pr, rc, rr, nc, nr):
        def lodds(m):
            p = math.exp(m)
            return math.log(p / (1 - p))
        return -pc / nc + lam * -logsig(lodds(pc / nc) - lodds(pr / nr))
    return f


def dpo_norm(beta, eps):  # DPO on per-token mean log-ratios (conservative when ε > 0)
    def f(pc, pr, rc, rr, nc, nr):
        z = beta * ((pc - rc) / nc - (pr - rr) / nr)
        return -(1 - eps) * logsig(z) - eps * logsig(-z)
    return f


def robust(beta, eps):  # Chowdhury et al. 2024
    def f(pc, pr, rc, rr, nc, nr):
        z = beta * ((pc - rc) - (pr - rr))
        return ((1 - eps) * -logsig(z) - eps * -logsig(-z)) / (1 - 2 * eps)
    return f


def apo_zero(beta):  # D'Oosterlinck et al. 2024
    return lambda pc, pr, rc, rr, nc, nr: 1 - sig(beta * (pc - rc)) + sig(beta * (pr - rr))


def apo_down(beta):
    return lambda pc, pr, rc, rr, nc, nr: sig(beta * (pc - rc)) + 1 - sig(beta * ((pc - rc) - (pr - rr)))


def exo_pair(beta, eps):  # Ji et al. 2024: KL((p, 1 − p) ‖ (1 − ε, ε)), p = σ(βh)
    def f(pc, pr, rc, rr, nc, nr):
        p = sig(beta * ((pc - rc) - (pr - rr)))
        return p * math.log(p / (1 - eps)) + (1 - p) * math.log((1 - p) / eps)
    return f


def nca_pair(beta):  # Chen et al. 2024
    def f(pc, pr, rc, rr, nc, nr):
        rw, rl = beta * (pc - rc), beta * (pr - rr)
        return -logsig(rw) - 0.5 * logsig(-rw) - 0.5 * logsig(-rl)
    return f


CASES = [  # (registry name, LossParams, the formula, reference-free)
    ("simpo", LossParams(beta=2.0, simpo_gamma=1.0), simpo(2.0, 1.0), True),
    ("simpo", LossParams(beta=0.7, simpo_gamma=0.3), simpo(0.7, 0.3), True),
    ("orpo", LossParams(orpo_lambda=0.1), orpo(0.1), True),
    ("orpo", LossParams(orpo_lambda=1.5), orpo(1.5), True),
    ("dpo_norm", LossParams(beta=0.5), dpo_norm(0.5, 0.0), False),
    ("dpo_norm", LossParams(beta=2.0, label_smoothing=0.2), dpo_norm(2.0, 0.2), False),
    ("robust", LossParams(beta=0.1, label_smoothing=0.1), robust(0.1, 0.1), False),
    ("robust", LossParams(beta=0.4, label_smoothing=0.3), robust(0.4, 0.3), False),
    ("robust", LossParams(beta=0.4, label_smoothing=0.0), robust(0.4, 0.0), False),
    ("apo_zero", LossParams(beta=0.1), apo_zero(0.1), False),
    ("apo_zero", LossParams(beta=0.6), apo_zero(0.6), False),
    ("apo_down", LossParams(beta=0.1), apo_down(0.1), False),
    ("apo_down", LossParams(beta=0.6), apo_down(0.6), False),
    ("exo_pair", LossParams(beta=0.1), exo_pair(0.1, 1e-3), False),  # ε = 0 -> TRL's 1e-3
    ("exo_pair", LossParams(beta=0.3, label_smoothing=0.2), exo_pair(0.3, 0.2), False),
    ("nca_pair", LossParams(beta=0.1), nca_pair(0.1), False),
    ("nca_pair", LossParams(beta=0.8), nca_pair(0.8), False),
]


def _fd_grad(f, args, k, h=1e-5):
    up, down = list(args), list(args)
    up[k] += h
    down[k] -= h
    return (f(*up) - f(*down)) / (2 * h)


@pytest.mark.parametrize("name,params,formula,reference_free", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_value_and_gradient_match_the_papers_formula(name, params, formula, reference_free):
    pol, ref, lengths = _inputs(seed=len(name) + int(10 * params.beta))
    spec = LOSSES[name]
    assert spec.pairwise and spec.needs_reference is not reference_free and spec.help
    x = pol.clone().requires_grad_()
    out = spec.fn(LossInputs(x, None if reference_free else ref, lengths), params)
    out.losses.sum().backward()
    assert out.losses.shape == (B,) and out.rewards.shape == (B, 2) and out.components is None
    for i in range(B):
        args = (*pol[i].tolist(), *ref[i].tolist(), *lengths[i].tolist())  # pc, pr, rc, rr, nc, nr
        assert out.losses[i].item() == pytest.approx(formula(*args), rel=1e-10, abs=1e-12), (name, i)
        for k in (0, 1):  # ∂L/∂ log πθ(yw|x), ∂L/∂ log πθ(yl|x)
            assert x.grad[i, k].item() == pytest.approx(_fd_grad(formula, args, k), rel=1e-6, abs=1e-8), (name, i, k)


@pytest.mark.parametrize("name", ["robust", "apo_zero", "apo_down", "exo_pair", "nca_pair", "dpo_norm"])
def test_rewards_of_reference_losses_are_implicit_rewards(name):
    pol, ref, lengths = _inputs(3)
    beta = 0.3
    out = LOSSES[name].fn(LossInputs(pol, ref, lengths), LossParams(beta=beta, label_smoothing=0.1))
    per_token = lengths if name == "dpo_norm" else torch.ones_like(lengths)
    assert torch.allclose(out.rewards, beta * (pol - ref) / per_token, rtol=1e-12, atol=0)
    assert not out.rewards.requires_grad


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_reference_free_losses_report_beta_times_mean_log_prob(name):
    pol, _, lengths = _inputs(4)
    out = LOSSES[name].fn(LossInputs(pol.clone().requires_grad_(), None, lengths), LossParams(beta=2.0))
    assert torch.allclose(out.rewards, 2.0 * pol / lengths, rtol=1e-12, atol=0)
    assert not out.rewards.requires_grad
    assert LOSSES[name].needs_reference is False


def test_direct_functions_equal_the_registry():
    pol, ref, lengths = _inputs(5)
    pc, pr, rc, rr, nc, nr = pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], lengths[:, 0], lengths[:, 1]
    p = LossParams(beta=0.4, label_smoothing=0.15, simpo_gamma=0.2, orpo_lambda=0.3)
    x = LossInputs(pol, ref, lengths)
    direct = {
        "simpo": L.simpo_loss(pc, pr, nc, nr, beta=0.4, gamma=0.2),
        "orpo": L.orpo_loss(pc, pr, nc, nr, beta=0.4, orpo_lambda=0.3),
        "dpo_norm": L.dpo_norm_loss(pc, pr, rc, rr, nc, nr, beta=0.4, label_smoothing=0.15),
        "robust": L.robust_dpo_loss(pc, pr, rc, rr, beta=0.4, label_smoothing=0.15),
        "apo_zero": L.apo_zero_loss(pc, pr, rc, rr, beta=0.4),
        "apo_down": L.apo_down_loss(pc, pr, rc, rr, beta=0.4),
        "exo_pair": L.exo_pair_loss(pc, pr, rc, rr, beta=0.4, label_smoothing=0.15),
        "nca_pair": L.nca_pair_loss(pc, pr, rc, rr, beta=0.4),
    }
    for name, out in direct.items():
        reg = LOSSES[name].fn(x, p)
        assert torch.equal(reg.losses, out.losses), name
        assert torch.equal(reg.rewards, torch.stack([out.chosen_rewards, out.rejected_rewards], 1)), name
        fn = L.__dict__[f"{name}_loss" if name != "robust" else "robust_dpo_loss"]
        assert "2024" in fn.__doc__, name  # each cites its paper


# ---- properties the papers state ------------------------------------------------------------

def test_robust_dpo_is_unbiased_under_label_flips():
    """Chowdhury et al.'s point: with labels flipped at rate ε, the expected robust loss is the
    clean DPO loss: (1 − ε)·L̂(yw ≻ yl) + ε·L̂(yl ≻ yw) = −log σ(βh)."""
    pol, ref, _ = _inputs(6)
    pc, pr, rc, rr = pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1]
    for eps in (0.05, 0.2, 0.45):
        kept = L.robust_dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=eps).losses
        flipped = L.robust_dpo_loss(pr, pc, rr, rc, beta=0.2, label_smoothing=eps).losses
        clean = L.dpo_loss(pc, pr, rc, rr, beta=0.2).losses
        assert torch.allclose((1 - eps) * kept + eps * flipped, clean, rtol=1e-10, atol=1e-12)
    plain = L.robust_dpo_loss(pc, pr, rc, rr, beta=0.2).losses  # ε = 0 is DPO
    assert torch.allclose(plain, L.dpo_loss(pc, pr, rc, rr, beta=0.2).losses, rtol=1e-14, atol=0)
    for bad in (0.5, 0.7, -0.1):
        with pytest.raises(ValueError, match="robust DPO"):
            L.robust_dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=bad)


def test_exo_pair_is_zero_exactly_at_the_smoothed_label():
    eps, beta = 0.1, 0.5
    h = math.log((1 - eps) / eps) / beta  # σ(βh) = 1 − ε
    z = torch.zeros(1, dtype=torch.float64)
    at = L.exo_pair_loss(torch.tensor([h], dtype=torch.float64), z, z, z, beta=beta, label_smoothing=eps).losses
    assert at.item() == pytest.approx(0.0, abs=1e-12)
    near = L.exo_pair_loss(torch.tensor([h + 1.0], dtype=torch.float64), z, z, z, beta=beta, label_smoothing=eps)
    assert near.losses.item() > 0  # reverse KL: overshooting the label is penalised too (DPO's is not)
    with pytest.raises(ValueError, match="EXO"):
        L.exo_pair_loss(z, z, z, z, label_smoothing=1.0)


def test_values_at_the_reference():
    """πθ = πref (every implicit reward 0): APO 1, NCA 2·ln 2, robust DPO ln 2, LN-DPO ln 2."""
    pol, _, lengths = _inputs(7)
    x = LossInputs(pol, pol.clone(), lengths)
    expected = {"apo_zero": 1.0, "apo_down": 1.0, "nca_pair": 2 * math.log(2), "robust": math.log(2),
                "dpo_norm": math.log(2)}
    for name, value in expected.items():
        out = LOSSES[name].fn(x, LossParams(beta=0.3, label_smoothing=0.2))
        assert torch.allclose(out.losses, torch.full((B,), value, dtype=torch.float64), atol=1e-12), name


def test_dpo_norm_is_dpo_on_one_token_responses_and_differs_otherwise():
    pol, ref, lengths = _inputs(8)
    ones = LossInputs(pol, ref, torch.ones_like(lengths))
    assert torch.allclose(LOSSES["dpo_norm"].fn(ones, LossParams(beta=0.2)).losses,
                          LOSSES["dpo"].fn(ones, LossParams(beta=0.2)).losses, rtol=1e-12, atol=0)
    uneven = LossInputs(pol, ref, lengths)
    assert not torch.allclose(LOSSES["dpo_norm"].fn(uneven, LossParams(beta=0.2)).losses,
                              LOSSES["dpo"].fn(uneven, LossParams(beta=0.2)).losses)


def test_simpo_is_length_normalised_and_ignores_any_reference():
    """Scaling a response (twice the tokens, same per-token mean log-prob) leaves SimPO unchanged."""
    pol, ref, lengths = _inputs(9)
    p = LossParams(beta=2.0, simpo_gamma=1.0)
    a = LOSSES["simpo"].fn(LossInputs(pol, None, lengths), p).losses
    assert torch.equal(a, LOSSES["simpo"].fn(LossInputs(pol, ref, lengths), p).losses)
    assert torch.allclose(a, LOSSES["simpo"].fn(LossInputs(2 * pol, None, 2 * lengths), p).losses, rtol=1e-12)


def test_log_odds_is_stable_at_both_ends():
    mpmath = pytest.importorskip("mpmath")  # torch's own dependency (through sympy)
    xs = [-1e-12, -1e-7, -1e-3, -0.5, -math.log(2), -0.7, -5.0, -40.0, -700.0]
    got = L.log1mexp(torch.tensor(xs, dtype=torch.float64))
    with mpmath.workdps(400):  # log(1 − eˣ) with enough digits that 1 − e⁻⁷⁰⁰ is not 1
        exact = [float(mpmath.log(1 - mpmath.exp(mpmath.mpf(x)))) for x in xs]
    for x, g, e in zip(xs, got.tolist(), exact):
        assert g == pytest.approx(e, rel=1e-13, abs=0), x
    # log P at 0 and beyond the cap: finite values and gradients, in fp32 as in training
    m = torch.tensor([0.0, -1e-9, -1e-6, -1e-4, -30.0], requires_grad=True)
    lo = L.log_odds(m)
    lo.sum().backward()
    assert torch.isfinite(lo).all() and torch.isfinite(m.grad).all()
    assert lo[0].item() == pytest.approx(math.log((1 - 1e-6) / 1e-6), rel=1e-3)  # held at the cap
    assert lo[-1].item() == pytest.approx(-30.0, abs=1e-9)  # log odds → log P for small P
    # ORPO on a chosen response the model is certain of (all its tokens p = 1) stays finite
    pol = torch.tensor([[0.0, -3.0]], requires_grad=True)
    out = LOSSES["orpo"].fn(LossInputs(pol, None, torch.tensor([[4.0, 4.0]])), LossParams())
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(pol.grad).all()


# ---- weighted combinations ------------------------------------------------------------------

def test_combine_losses_is_the_weighted_sum_and_reports_components():
    pol, ref, lengths = _inputs(10)
    unl = torch.rand(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    p = LossParams(beta=0.3, label_smoothing=0.1, simpo_gamma=0.5, orpo_lambda=0.2)
    names, weights = ["sft", "dpo", "simpo", "unlikelihood"], [0.5, 1.0, 2.0, 0.25]
    spec = combine_losses(names, weights)
    assert spec.needs_reference and spec.pairwise and spec.needs_unlikelihood
    x = pol.clone().requires_grad_()
    out = spec.fn(LossInputs(x, ref, lengths, unl), p)
    out.losses.sum().backward()
    parts = {}
    grads = torch.zeros_like(pol)
    for n, w in zip(names, weights):
        xi = pol.clone().requires_grad_()
        part = LOSSES[n].fn(LossInputs(xi, ref, lengths, unl), p).losses
        (w * part).sum().backward()
        parts[n] = part.detach()
        grads += xi.grad
    assert torch.allclose(out.losses, sum(w * parts[n] for n, w in zip(names, weights)), rtol=1e-12, atol=1e-12)
    assert torch.allclose(x.grad, grads, rtol=1e-12, atol=1e-12)
    assert list(out.components) == names
    for n in names:
        assert torch.equal(out.components[n], parts[n]) and not out.components[n].requires_grad
    # rewards: the first component that has rewards (sft has none; dpo's)
    assert torch.equal(out.rewards, LOSSES["dpo"].fn(LossInputs(pol, ref, lengths), p).rewards)


def test_combine_flags_are_any_of_the_components():
    free = combine_losses(["simpo", "sft"], [1.0, 0.1])
    assert not free.needs_reference and free.pairwise and not free.needs_unlikelihood
    pol, _, lengths = _inputs(11)
    out = free.fn(LossInputs(pol, None, lengths), LossParams(beta=2.0))  # works without a reference
    assert out.losses.shape == (B,) and set(out.components) == {"simpo", "sft"}
    ranked = combine_losses(["plackett_luce", "sft"])
    assert ranked.needs_reference and not ranked.pairwise and not ranked.needs_unlikelihood
    only_sft = combine_losses(["sft"], [2.0])
    assert only_sft.fn(LossInputs(pol, None, lengths), LossParams()).rewards is None


def test_get_loss_takes_a_comma_list_and_weights():
    pol, ref, lengths = _inputs(12)
    x, p = LossInputs(pol, ref, lengths), LossParams()
    dpo, sft = LOSSES["dpo"].fn(x, p).losses, LOSSES["sft"].fn(x, p).losses
    assert torch.allclose(get_loss("dpo,sft").fn(x, p).losses, dpo + sft, rtol=1e-12)
    assert torch.allclose(get_loss(" dpo , sft ").fn(x, p).losses, dpo + sft, rtol=1e-12)
    assert torch.allclose(get_loss("dpo,sft", "1,0.5").fn(x, p).losses, dpo + 0.5 * sft, rtol=1e-12)
    assert torch.allclose(get_loss("dpo,sft", [2, 0]).fn(x, p).losses, 2 * dpo, rtol=1e-12)
    assert get_loss("dpo", "").fn is LOSSES["dpo"].fn and get_loss("dpo") is LOSSES["dpo"]
    assert torch.allclose(get_loss("dpo", "3").fn(x, p).losses, 3 * dpo, rtol=1e-12)
    assert "dpo" in get_loss("dpo,sft", "1,0.5").help and "0.5·sft" in get_loss("dpo,sft", "1,0.5").help
    for args, match in [(("dpo,nope",), "unknown loss 'nope'"), (("dpo,sft", "1"), "2 losses"),
                        (("dpo,dpo",), "twice"), (("dpo,sft", "1,-1"), "≥ 0"), (("dpo,sft", "0,0"), "not all 0"),
                        (("dpo,sft", "1,x"), "comma list of numbers"), (("dpo,sft", [1, math.inf]), "finite"),
                        (("dpo,",), "unknown loss ''")]:
        with pytest.raises(ValueError, match=match):
            get_loss(*args)
