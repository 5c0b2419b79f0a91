"""Per-example metrics of implicit rewards against the given ranking (pure functions).

Rewards are (B, K) with responses best first and NaN where absent. For a pair, the concordant
fraction is the usual reward accuracy (chosen reward > rejected reward).

Ties, one rule for every metric: a tie is not a correct ranking. A tied pair counts as wrong in the
accuracy (neither concordant nor discordant in Kendall's τ), and top-1 is correct only when the best
response's reward is strictly above every other response's: a tie at the top counts as wrong.
"""
from __future__ import annotations

import torch


def last_valid(values: torch.Tensor) -> torch.Tensor:
    """(B, K) -> (B,): each row's last non-NaN entry (the worst-ranked response)."""
    k = (~torch.isnan(values)).sum(1).clamp(min=1) - 1
    return values.gather(1, k[:, None]).squeeze(1)


def ranking_metrics(rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example concordance, Kendall's τ and top-1 accuracy of rewards vs the ranking."""
    valid = ~torch.isnan(rewards)
    r = rewards.nan_to_num(0.0)
    K = rewards.shape[1]
    upper = torch.triu(torch.ones(K, K, dtype=torch.bool, device=rewards.device), diagonal=1)
    both = valid[:, :, None] & valid[:, None, :] & upper  # ordered pairs i < j (i ranked better)
    diff = r[:, :, None] - r[:, None, :]
    n = both.sum((1, 2)).clamp(min=1)
    concordant = ((diff > 0) & both).sum((1, 2))
    discordant = ((diff < 0) & both).sum((1, 2))
    # top-1: the best response strictly above every other one (a tie at the top is wrong, as a tied
    # pair is); a row with fewer than two responses has no ranking to get right
    rest = torch.cat([r[:, 1:].masked_fill(~valid[:, 1:], float("-inf")), torch.full_like(r[:, :1], float("-inf"))], 1)
    strictly_top = valid[:, 0] & valid[:, 1:].any(1) & (r[:, 0] > rest.amax(1))
    return {
        "accuracy": concordant / n,
        "kendall_tau": (concordant - discordant) / n,
        "top1": strictly_top.float(),
    }
