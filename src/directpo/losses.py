"""Preference losses as pure functions of sequence log-probabilities.

Every loss here takes summed response log-probs (one number per sequence) and returns per-example
losses plus the implicit rewards ``β·(log πθ(y|x) − log πref(y|x))`` of the paper (§5). Nothing
here knows about models, tokenizers or the trainer: that keeps each formula checkable by hand.

Notation (paper, eq. 7):
    L_DPO = −log σ( β·[log πθ(yw|x) − log πref(yw|x)] − β·[log πθ(yl|x) − log πref(yl|x)] )
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


# name -> loss function with the signature of `dpo_loss`. The trainer looks losses up here, so a new
# loss is one function and one entry, never a branch inside the training loop.
PAIRWISE_LOSSES: dict[str, Callable[..., LossOutput]] = {
    "dpo": dpo_loss,
}


def get_pairwise_loss(name: str) -> Callable[..., LossOutput]:
    try:
        return PAIRWISE_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(PAIRWISE_LOSSES)}") from None
