"""Preference losses as pure functions of sequence log-probabilities.

Every loss here takes summed response log-probs (one number per sequence) and returns per-example
losses plus the implicit rewards ``β·(log πθ(y|x) − log πref(y|x))`` of the paper (§5). Nothing
here knows about models, tokenizers or the trainer: that keeps each formula checkable by hand.

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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


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


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float = 0.1,
             **_) -> LossOutput:
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
                 chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, beta: float = 0.1,
                 **_) -> LossOutput:
    """IPO on per-token average log-probs (TRL's form): `ipo_loss` with every log πθ(y|x) and
    log πref(y|x) divided by |y|, i.e. (h̄ − 1/(2β))² with
        h̄ = [log πθ(yw|x) − log πref(yw|x)]/|yw| − [log πθ(yl|x) − log πref(yl|x)]/|yl|.
    The implicit rewards are per-token too: β·[log πθ(y|x) − log πref(y|x)]/|y|.
    For one-token responses it is exactly `ipo_loss`.
    """
    nc, nr = chosen_lengths.clamp(min=1), rejected_lengths.clamp(min=1)
    return ipo_loss(policy_chosen_logps / nc, policy_rejected_logps / nr, ref_chosen_logps / nc,
                    ref_rejected_logps / nr, beta=beta)


def hinge_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float = 0.1,
               **_) -> LossOutput:
    """SLiC's calibration hinge on the implicit reward margin: max(0, 1 − β·h)."""
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    return LossOutput(torch.relu(1 - beta * h),
                      implicit_reward(policy_chosen_logps, ref_chosen_logps, beta).detach(),
                      implicit_reward(policy_rejected_logps, ref_rejected_logps, beta).detach())


def cdpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float = 0.1,
              label_smoothing: float = 0.1, **_) -> LossOutput:
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
# The registry: name -> LossSpec. The trainer looks losses up here and calls `spec.fn(inputs,
# params)`; a new loss is one function and one entry, never a branch inside the training loop.


@dataclass
class LossInputs:
    """What a loss may use, per example, responses best first (NaN where absent)."""

    policy: torch.Tensor  # (B, K) summed response log-probs under πθ
    ref: torch.Tensor | None  # (B, K) under πref, or None for reference-free losses
    lengths: torch.Tensor  # (B, K) response token counts
    unlikelihood: torch.Tensor | None = None  # (B, K) Σ_t −log(1 − p_t), when the loss asks for it


@dataclass
class LossParams:
    beta: float = 0.1
    label_smoothing: float = 0.0
    unlikelihood_weight: float = 1.0


@dataclass
class RankedLossOutput:
    losses: torch.Tensor  # (B,)
    rewards: torch.Tensor | None  # (B, K) implicit rewards (None for losses without a reference)


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[[LossInputs, LossParams], RankedLossOutput]
    needs_reference: bool = True
    pairwise: bool = True  # takes exactly two responses per example
    needs_unlikelihood: bool = False
    help: str = ""


def _pairwise(fn):
    def run(x: LossInputs, p: LossParams) -> RankedLossOutput:
        out = fn(x.policy[:, 0], x.policy[:, 1], x.ref[:, 0], x.ref[:, 1], beta=p.beta,
                 label_smoothing=p.label_smoothing)
        return RankedLossOutput(out.losses, torch.stack([out.chosen_rewards, out.rejected_rewards], 1))
    return run


def _ipo_avg(x: LossInputs, p: LossParams) -> RankedLossOutput:
    out = ipo_avg_loss(x.policy[:, 0], x.policy[:, 1], x.ref[:, 0], x.ref[:, 1], x.lengths[:, 0], x.lengths[:, 1],
                       beta=p.beta)
    return RankedLossOutput(out.losses, torch.stack([out.chosen_rewards, out.rejected_rewards], 1))


def _reference_free(x: LossInputs, p: LossParams) -> RankedLossOutput:
    """DPO with log πref(y|x) = 0: a constant sequence-level reference (not a per-token uniform one)."""
    zeros = torch.zeros_like(x.policy[:, 0])
    out = dpo_loss(x.policy[:, 0], x.policy[:, 1], zeros, zeros, beta=p.beta, label_smoothing=p.label_smoothing)
    return RankedLossOutput(out.losses, torch.stack([out.chosen_rewards, out.rejected_rewards], 1))


def _plackett_luce(x: LossInputs, p: LossParams) -> RankedLossOutput:
    return RankedLossOutput(*plackett_luce_loss(x.policy, x.ref, p.beta))


def _sft(x: LossInputs, p: LossParams) -> RankedLossOutput:
    return RankedLossOutput(sft_loss(x.policy[:, 0], x.lengths[:, 0]), None)


def _unlikelihood(x: LossInputs, p: LossParams) -> RankedLossOutput:
    return RankedLossOutput(unlikelihood_loss(x.policy[:, 0], x.lengths[:, 0], x.unlikelihood[:, 1],
                                              x.lengths[:, 1], p.unlikelihood_weight), None)


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(_pairwise(dpo_loss), help="DPO, eq. 7 (label_smoothing > 0: conservative DPO)"),
    "cdpo": LossSpec(_pairwise(cdpo_loss), help="conservative DPO, ε = label_smoothing (default 0.1)"),
    "ipo": LossSpec(_pairwise(ipo_loss), help="IPO (Azar et al.): squared margin regression to 1/(2β), "
                                              "summed log-probs (TRL averages per token: see ipo_avg)"),
    "ipo_avg": LossSpec(_ipo_avg, help="IPO on per-token average log-probs (TRL's form; β means what it means "
                                       "there)"),
    "hinge": LossSpec(_pairwise(hinge_loss), help="SLiC hinge on the implicit reward margin"),
    "reference_free": LossSpec(_reference_free, needs_reference=False,
                               help="DPO with a constant sequence-level reference (log πref(y|x) = 0)"),
    "plackett_luce": LossSpec(_plackett_luce, pairwise=False, help="ranking DPO over K ≥ 2 responses (A.3/A.5)"),
    "sft": LossSpec(_sft, needs_reference=False, pairwise=False, help="supervised NLL of the best response"),
    "unlikelihood": LossSpec(_unlikelihood, needs_reference=False, needs_unlikelihood=True,
                             help="the paper's Unlikelihood baseline: per-token mean NLL(yw) + α·per-token mean "
                                  "−log(1 − p) over yl"),
}

# The plain pairwise functions, for users who call them directly.
PAIRWISE_LOSSES: dict[str, Callable[..., LossOutput]] = {"dpo": dpo_loss, "cdpo": cdpo_loss, "ipo": ipo_loss,
                                                         "hinge": hinge_loss}


def get_loss(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None


def get_pairwise_loss(name: str) -> Callable[..., LossOutput]:
    try:
        return PAIRWISE_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(PAIRWISE_LOSSES)}") from None


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Reward-model loss (eq. 2), per example: −log σ(r(x, yw) − r(x, yl)).

    The maximum-likelihood fit of a Bradley–Terry preference model p(yw ≻ yl) = σ(r(yw) − r(yl)).
    Only differences of rewards enter, so r is determined up to a constant per prompt (Lemma 1).
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards)
