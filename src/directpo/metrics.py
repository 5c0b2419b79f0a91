"""Per-example metrics of implicit rewards against the given ranking (pure functions).

Rewards are (B, K) with responses best first and NaN where absent. For a pair, the concordant
fraction is the usual reward accuracy (chosen reward > rejected reward; a tie counts as wrong).
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
    best_is_top = r.masked_fill(~valid, float("-inf")).argmax(1) == 0
    # a row whose rewards are all equal has no top: count it as wrong, like a tied pair
    all_tied = (r.masked_fill(~valid, float("inf")).amin(1) == r.masked_fill(~valid, float("-inf")).amax(1))
    return {
        "accuracy": concordant / n,
        "kendall_tau": (concordant - discordant) / n,
        "top1": (best_is_top & ~all_tied).float(),
    }
