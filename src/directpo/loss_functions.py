"""Preference losses as pure functions of sequence log-probabilities.

Every loss here takes summed response log-probs (one number per sequence) and returns per-example
losses plus the implicit rewards ``β·(log πθ(y|x) − log πref(y|x))`` of the paper (§5). Nothing
here knows about models, tokenizers or the trainer: that keeps each formula checkable by hand.
Each function takes exactly the parameters it uses (no catch-all ``**kwargs``), so a parameter
passed to a loss that does not read it is an error, never silently ignored. What the trainer
knows about each loss (the settings it reads, its rows, its value at initialisation) is its entry
in the registry, `directpo.losses.LOSSES`; `directpo.losses` also re-exports everything here.

Notation (paper, eq. 7):
    L_DPO = −log σ( β·[log πθ(yw|x) − log πref(yw|x)] − β·[log πθ(yl|x) − log πref(yl|x)] )

Exactly what some of the registry's losses compute (h = the log-ratio difference above, without β):
    ipo             (h − 1/(2β))², h from *summed* log-probs. TRL's IPO averages log-probs per token,
                    which rescales h by ~1/length and so changes what a given β means; `ipo_avg` is
                    that per-token form.
    reference_free  DPO with log πref(y|x) = 0 for every response, i.e. a *constant* sequence-level
                    reference (any constant cancels in h). It is not a per-token uniform reference
                    (log πref(y|x) = −|y|·log V): that one cancels only when |yw| = |yl|.
    unlikelihood    −log πθ(yw|x)/|yw| + α·(1/|yl|)·Σ_t −log(1 − πθ(yl_t|x, yl_<t)): both terms are
                    per-token means (of the chosen response's NLL, of the rejected tokens' penalty).
    simpo, orpo     reference-free, on per-token mean log-probs; their rewards are β·log πθ(y|x)/|y|.
    dpo_norm        DPO on per-token mean log-ratios (rewards per token too).
    robust, apo_zero, apo_down, exo_pair, nca_pair
                    functions of the summed log-ratios, each as its paper (cited in its docstring)
                    states it; rewards β·[log πθ(y|x) − log πref(y|x)].
    kto             unpaired rows (a completion and a desirable/undesirable label), against a
                    reference point z0 estimated on mismatched prompt/completion pairs, which the
                    trainer computes over the whole batch and passes in (`LossParams.kto_kl`).
    bco_pair        DPO-style pairs, each response classified against a reward shift δ that the
                    trainer keeps as a running mean and passes in (`LossParams.bco_delta`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UserValueError


@dataclass
class LossOutput:
    """Per-example losses and the (detached) implicit rewards of chosen and rejected responses."""

    losses: torch.Tensor  # (B,)
    chosen_rewards: torch.Tensor  # (B,)
    rejected_rewards: torch.Tensor  # (B,)


def implicit_reward(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """r̂(x, y) = β·log πθ(y|x)/πref(y|x): 'your language model is secretly a reward model'."""
    return beta * (policy_logps - ref_logps)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """The DPO loss (eq. 7), per example.

    ``label_smoothing`` ε > 0 gives the conservative DPO of the authors' repository: the preference
    label is assumed flipped with probability ε, i.e. −(1−ε)·log σ(βh) − ε·log σ(−βh).
    The gradient (appendix A.4) is −β·σ(r̂(yl) − r̂(yw))·[∇log π(yw) − ∇log π(yl)]: examples whose
    implicit reward orders the pair wrongly are weighted more.
    """
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    losses = -F.logsigmoid(beta * logits)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * logits)
    return LossOutput(
        losses=losses,
        chosen_rewards=implicit_reward(policy_chosen_logps, ref_chosen_logps, beta).detach(),
        rejected_rewards=implicit_reward(policy_rejected_logps, ref_rejected_logps, beta).detach(),
    )


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta: float = 0.1) -> LossOutput:
    """IPO (Azar et al., 2023): (h − 1/(2β))², h the log-ratio difference; β plays IPO's τ.

    Regresses the margin to a finite target instead of pushing it to infinity, so it does not
    overfit deterministic preferences. The log-probs are summed over the response, as everywhere
    here; TRL's IPO averages them per token, which changes what β means (see `ipo_avg_loss`).
    """
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    return LossOutput((h - 1 / (2 * beta)) ** 2,
                      implicit_reward(policy_chosen_logps, ref_chosen_logps, beta).detach(),
                      implicit_reward(policy_rejected_logps, ref_rejected_logps, beta).detach())


def ipo_avg_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                 chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, beta: float = 0.1) -> LossOutput:
    """IPO on per-token average log-probs (TRL's form): `ipo_loss` with every log πθ(y|x) and
    log πref(y|x) divided by |y|, i.e. (h̄ − 1/(2β))² with
        h̄ = [log πθ(yw|x) − log πref(yw|x)]/|yw| − [log πθ(yl|x) − log πref(yl|x)]/|yl|.
    The implicit rewards are per-token too: β·[log πθ(y|x) − log πref(y|x)]/|y|.
    For one-token responses it is exactly `ipo_loss`.
    """
    nc, nr = chosen_lengths.clamp(min=1), rejected_lengths.clamp(min=1)
    return ipo_loss(policy_chosen_logps / nc, policy_rejected_logps / nr, ref_chosen_logps / nc,
                    ref_rejected_logps / nr, beta=beta)


def hinge_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
               beta: float = 0.1) -> LossOutput:
    """SLiC's calibration hinge on the implicit reward margin: max(0, 1 − β·h)."""
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    return LossOutput(torch.relu(1 - beta * h),
                      implicit_reward(policy_chosen_logps, ref_chosen_logps, beta).detach(),
                      implicit_reward(policy_rejected_logps, ref_rejected_logps, beta).detach())


def cdpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float = 0.1,
              label_smoothing: float = 0.1) -> LossOutput:
    """Conservative DPO: DPO with labels flipped with probability ε (default 0.1)."""
    return dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                    label_smoothing or 0.1)


def plackett_luce_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float = 0.1) -> tuple:
    """Ranking DPO (appendix A.3, in the correct product form of A.5), per example.

    Responses are best first; NaN marks absent responses (rows may have different K). With
    r̂_k = β·(log πθ(y_k|x) − log πref(y_k|x)):
        −log Π_{k=1..K} exp(r̂_k) / Σ_{j≥k} exp(r̂_j)
    For K = 2 this is exactly the DPO loss. Returns (losses (B,), rewards (B, K) detached).
    """
    rewards = beta * (policy_logps - ref_logps)
    valid = ~torch.isnan(rewards)
    r = rewards.masked_fill(~valid, float("-inf"))
    # Σ_{j≥k} exp(r̂_j) for every position k: a reversed cumulative logsumexp.
    tail = torch.logcumsumexp(r.flip(-1), dim=-1).flip(-1)
    terms = torch.where(valid, r - tail, torch.zeros_like(r))
    return -terms.sum(-1), rewards.detach()


def sft_loss(policy_logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-example negative log-likelihood of the (best) response, averaged over its tokens."""
    return -policy_logps / lengths.clamp(min=1)


def unlikelihood_loss(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor,
                      rejected_unlikelihood: torch.Tensor, rejected_lengths: torch.Tensor,
                      weight: float = 1.0) -> torch.Tensor:
    """The paper's Unlikelihood baseline (Welleck et al., 2019), per example: the per-token mean
    NLL of the chosen response plus α × the per-token mean unlikelihood penalty of the rejected one,

        −log πθ(yw|x)/|yw|  +  α · (1/|yl|) · Σ_t −log(1 − πθ(yl_t | x, yl_<t))

    `rejected_unlikelihood` is Σ_t −log(1 − p_t) over the rejected tokens (`unlikelihood_terms`).
    """
    return -chosen_logps / chosen_lengths.clamp(min=1) + weight * rejected_unlikelihood / rejected_lengths.clamp(min=1)


def unlikelihood_terms(token_logps: torch.Tensor) -> torch.Tensor:
    """−log(1 − p) per token from log p, stable near p → 1 (log1p(−exp(x)) = log(−expm1(x)))."""
    return -torch.log(-torch.expm1(token_logps.clamp(max=-1e-6)))


# ----------------------------------------------------------------------------------------------
# The preference-optimization menu beyond the paper: each loss as its own paper states it.
# h = [log πθ(yw|x) − log πref(yw|x)] − [log πθ(yl|x) − log πref(yl|x)] (summed log-probs) throughout.


def _ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    """The log-ratios log πθ(y|x) − log πref(y|x) of the chosen and the rejected response."""
    return policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps


def _with_rewards(losses: torch.Tensor, chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor,
                  beta: float) -> LossOutput:
    """`losses` with the implicit rewards β·(log πθ − log πref) of chosen and rejected (detached)."""
    return LossOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths: torch.Tensor,
               rejected_lengths: torch.Tensor, beta: float = 2.0, gamma: float = 1.0) -> LossOutput:
    """SimPO (Meng, Xia, Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward"), per example, without a reference model:

        r(x, y) = β·log πθ(y|x)/|y|            (the length-normalised, reference-free reward)
        L       = −log σ( r(x, yw) − r(x, yl) − γ )

    γ is the target reward margin. The paper trains with β = 2.0–2.5 (much larger than DPO's), and
    its authors' repository recommends γ/β = 0.5 as the starting point (grid 0–1): the defaults
    here, β = 2.0 and γ = 1.0, are that. The rewards reported are r(x, y).
    """
    chosen = beta * policy_chosen_logps / chosen_lengths.clamp(min=1)
    rejected = beta * policy_rejected_logps / rejected_lengths.clamp(min=1)
    return LossOutput(-F.logsigmoid(chosen - rejected - gamma), chosen.detach(), rejected.detach())


# Largest mean token log-prob ORPO's odds are computed at: P(y|x) ≤ 1 − 1e-6 keeps log odds finite.
ORPO_MAX_LOGP = -1e-6


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate everywhere (Mächler 2012): log(−expm1(x)) near 0,
    log1p(−exp(x)) below −log 2. Each branch is evaluated only on inputs it is exact for, so
    neither puts an inf or NaN into the other's gradient."""
    near = x > -math.log(2)
    a = torch.log(-torch.expm1(torch.where(near, x, torch.full_like(x, -math.log(2)))))
    b = torch.log1p(-torch.exp(torch.where(near, torch.full_like(x, -math.log(2)), x)))
    return torch.where(near, a, b)


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """ORPO's log odds log[P/(1 − P)] from log P (P = the per-token geometric-mean likelihood),
    computed as log P − log(1 − P) with log(1 − P) = `log1mexp(log P)`. log P is capped at
    `ORPO_MAX_LOGP` (P ≤ 1 − 10⁻⁶, log odds ≤ ≈13.8), where the true value diverges; above the cap
    the value is the cap's and no gradient flows through it."""
    logp = mean_logps.clamp(max=ORPO_MAX_LOGP)
    return logp - log1mexp(logp)


def orpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths: torch.Tensor,
              rejected_lengths: torch.Tensor, beta: float = 0.1, orpo_lambda: float = 0.1) -> LossOutput:
    """ORPO (Hong, Lee, Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model"), per example, without a reference model:

        log P(y|x) = log πθ(y|x)/|y|                      (mean token log-prob)
        odds(y|x)  = P(y|x) / (1 − P(y|x))
        L          = −log P(yw|x)  +  λ · −log σ( log odds(yw|x) − log odds(yl|x) )

    The first term is the NLL of the chosen response per token (the SFT loss); λ = `orpo_lambda`
    (the paper's 0.1). The log odds are computed stably (`log_odds`). β plays no part in the loss:
    the rewards reported are β·log P(y|x), β times the mean token log-prob (as TRL's ORPO reports);
    the log odds ratio is a monotone function of the same numbers, so the reward accuracy is the
    one the odds ratio would give.
    """
    chosen = policy_chosen_logps / chosen_lengths.clamp(min=1)
    rejected = policy_rejected_logps / rejected_lengths.clamp(min=1)
    ratio_loss = -F.logsigmoid(log_odds(chosen) - log_odds(rejected))
    return LossOutput(-chosen + orpo_lambda * ratio_loss, (beta * chosen).detach(), (beta * rejected).detach())


def dpo_norm_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, beta: float = 0.1,
                  label_smoothing: float = 0.0) -> LossOutput:
    """Length-normalised DPO (LN-DPO: Ahrabian et al. 2024, "A Practical Analysis of Human Alignment
    with *PO"; the per-token normalisation is SimPO's, Meng et al. 2024, applied to DPO's implicit
    reward): DPO, eq. 7, on per-token mean log-ratios,

        −log σ( β·[log πθ(yw|x) − log πref(yw|x)]/|yw| − β·[log πθ(yl|x) − log πref(yl|x)]/|yl| )

    `label_smoothing` ε > 0 makes it conservative, as for `dpo_loss`. The implicit rewards are per
    token too: β·[log πθ(y|x) − log πref(y|x)]/|y|. For one-token responses it is exactly DPO.
    """
    nc, nr = chosen_lengths.clamp(min=1), rejected_lengths.clamp(min=1)
    return dpo_loss(policy_chosen_logps / nc, policy_rejected_logps / nr, ref_chosen_logps / nc,
                    ref_rejected_logps / nr, beta=beta, label_smoothing=label_smoothing)


def robust_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Robust DPO (Chowdhury, Kini, Natarajan 2024, "Provably Robust DPO: Aligning Language Models
    with Noisy Feedback"): with preference labels flipped at a known rate ε < 1/2
    (`label_smoothing`), the unbiased estimate of the clean-label DPO loss,

        [ (1 − ε)·(−log σ(βh)) − ε·(−log σ(−βh)) ] / (1 − 2ε)

    Unlike conservative DPO (−(1−ε)·log σ(βh) − ε·log σ(−βh)) the flipped term enters with a minus
    sign: the loss is unbiased but not bounded below (it falls without limit as βh → ∞ when ε > 0).
    ε = 0 is DPO.
    """
    eps = label_smoothing
    if not 0 <= eps < 0.5:
        raise UserValueError(f"robust DPO needs a flip rate 0 ≤ ε < 0.5 (label_smoothing), got {eps}")
    cr, rr = _ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * (cr - rr)
    losses = ((1 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1 - 2 * eps)
    return _with_rewards(losses, cr, rr, beta)


def apo_zero_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  beta: float = 0.1) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions: Addressing Underspecification in Alignment", eq. 7), with r(y) = β·log πθ(y|x)/πref(y|x):

        1 − σ(r(yw)) + σ(r(yl))

    pushes the chosen likelihood up and the rejected one down, each anchored at the reference (the
    paper's −σ(r(yw)) + σ(r(yl)) plus 1, TRL's form: same gradient, loss in [0, 2], 1 at πθ = πref).
    For when the chosen responses are better than what the model produces now.
    """
    cr, rr = _ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return _with_rewards(1 - torch.sigmoid(beta * cr) + torch.sigmoid(beta * rr), cr, rr, beta)


def apo_down_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  beta: float = 0.1) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", eq. 8), with
    r(y) = β·log πθ(y|x)/πref(y|x):

        σ(r(yw)) + 1 − σ(r(yw) − r(yl))

    pushes both likelihoods down, the rejected one more (the paper's σ(r(yw)) − σ(r(yw) − r(yl)) plus
    1, TRL's form: same gradient, loss in [0, 2], 1 at πθ = πref). For when even the chosen responses
    are worse than what the model produces now.
    """
    cr, rr = _ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return _with_rewards(torch.sigmoid(beta * cr) + 1 - torch.sigmoid(beta * (cr - rr)), cr, rr, beta)


EXO_DEFAULT_EPSILON = 1e-3  # TRL's, used when label_smoothing is 0 (ε = 0 would make the loss infinite)


def exo_pair_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """EXO on preference pairs (Ji et al. 2024, "Towards Efficient Exact Optimization of Language
    Model Alignment"; the pairwise form, TRL's `exo_pair`, which cites its eq. 16), per example: the
    *reverse* KL from the model's distribution over the pair, pθ = (σ(βh), σ(−βh)), to the label
    distribution with smoothing ε, (1 − ε, ε):

        KL(pθ ‖ p_label) = σ(βh)·[log σ(βh) − log(1 − ε)] + σ(−βh)·[log σ(−βh) − log ε]

    (DPO minimises the forward KL(p_label ‖ pθ) = cross-entropy up to a constant; reverse KL is
    mode-seeking). ε = `label_smoothing`, or 1e-3 (TRL's default) when that is 0; 0 < ε < 1.
    The minimum, 0, is at σ(βh) = 1 − ε.
    """
    eps = label_smoothing or EXO_DEFAULT_EPSILON
    if not 0 < eps < 1:
        raise UserValueError(f"EXO needs a label smoothing 0 < ε < 1, got {eps}")
    cr, rr = _ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * (cr - rr)
    losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps))
              + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    return _with_rewards(losses, cr, rr, beta)


def nca_pair_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  beta: float = 0.1) -> LossOutput:
    """NCA on preference pairs (Chen et al. 2024, "Noise Contrastive Alignment of Language Models
    with Explicit Rewards"; the form for preference pairs, TRL's `nca_pair`), with r(y) = β·log πθ(y|x)/πref(y|x):

        −log σ(r(yw)) − ½·log σ(−r(yw)) − ½·log σ(−r(yl))

    Each response's own reward is trained, not only the margin, so the chosen likelihood is not
    pushed down with the rejected one (DPO's known failure).
    """
    cr, rr = _ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    rw, rl = beta * cr, beta * rr
    losses = -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)
    return _with_rewards(losses, cr, rr, beta)


def kto_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point (Ethayarajh et al. 2024), a 0-dim tensor:

        z0 = max(0, mean_i [log πθ(y'_i|x_i) − log πref(y'_i|x_i)])

    over *mismatched* pairs: prompt x_i with the completion y'_i of another example, so the mean
    estimates KL(πθ ‖ πref) on text unrelated to the labels. Detached: as in the paper (and TRL), no
    gradient flows through z0, which only sets the point rewards are judged against.
    """
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             reference_point: torch.Tensor | float, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    eq. 7), per unpaired example (x, y) with r = log πθ(y|x) − log πref(y|x) and z0 the reference
    point (`kto_reference_point`):

        desirable y:    λ_D · (1 − σ(β·(r − z0)))
        undesirable y:  λ_U · (1 − σ(β·(z0 − r)))

    i.e. the paper's λ_y − v(x, y). λ_D = `desirable_weight`, λ_U = `undesirable_weight`; the paper
    keeps λ_D·n_D / (λ_U·n_U) in [1, 4/3] for n_D desirable and n_U undesirable examples.
    `desirable`: (B,) booleans. Returns (losses (B,), implicit rewards β·r (B,), detached).
    """
    z0 = torch.as_tensor(reference_point, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    r = policy_logps - ref_logps
    desirable = desirable.to(torch.bool)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    return losses, (beta * r).detach()


def bco_pair_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  beta: float = 0.1, delta: float = 0.0) -> LossOutput:
    """BCO on preference pairs (Jung et al. 2024, "Binary Classifier Optimization for Large Language
    Model Alignment"; the pairwise form, TRL's `bco_pair`), with r(y) = β·log πθ(y|x)/πref(y|x):

        −log σ(r(yw) − δ) − log σ(−(r(yl) − δ))

    a binary classifier whose logit is the implicit reward: the chosen response is class 1, the
    rejected one class 0. δ, the reward shift, is the running mean of the batches' mean implicit
    rewards (over chosen and rejected), detached; it is an argument here, and the trainer keeps it
    (see `directpo.training.loop.RunningMean`). δ = 0 at the start, where every reward is 0.
    """
    cr, rr = _ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -F.logsigmoid(beta * cr - delta) - F.logsigmoid(-(beta * rr - delta))
    return _with_rewards(losses, cr, rr, beta)


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Reward-model loss (eq. 2), per example: −log σ(r(x, yw) − r(x, yl)).

    The maximum-likelihood fit of a Bradley–Terry preference model p(yw ≻ yl) = σ(r(yw) − r(yl)).
    Only differences of rewards enter, so r is determined up to a constant per prompt (Lemma 1).
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards)
