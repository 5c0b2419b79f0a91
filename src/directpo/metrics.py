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


# Metrics of a training run's micro-batches, summed and averaged (the DPO/SFT loop's log lines)


def reward_stats(r: torch.Tensor) -> dict[str, float]:
    """Sums over a micro-batch of the implicit-reward metrics (chosen, rejected, margin, accuracy,
    and for rankings top-1 and Kendall's τ)."""
    rank = ranking_metrics(r)
    chosen, rejected = r[:, 0], last_valid(r)
    stats = {"rewards/chosen": chosen.sum().item(), "rewards/rejected": rejected.sum().item(),
             "rewards/margins": (chosen - rejected).sum().item(),
             "rewards/accuracies": rank["accuracy"].sum().item()}
    if r.shape[1] > 2:
        stats.update({"rewards/top1": rank["top1"].sum().item(),
                      "rewards/kendall_tau": rank["kendall_tau"].sum().item()})
    return stats


def add_stats(total: dict, stats: dict) -> None:
    for k, v in stats.items():
        total[k] = total.get(k, 0.0) + v


def mean_metrics(sums: dict, n: int) -> dict:
    """Metric sums -> means per example (÷ n). A sum that comes with a count of its own ("_n/<key>")
    is the mean over the examples it counts instead (KTO's rewards of the desirable examples), and is
    left out when there were none."""
    counts = {k[len("_n/"):]: v for k, v in sums.items() if k.startswith("_n/")}
    out = {}
    for k, v in sums.items():
        if k.startswith("_n/"):
            continue
        if k not in counts:
            out[k] = v / n
        elif counts[k]:
            out[k] = v / counts[k]
    return out


def summary_line(m: dict, short: bool = False) -> str:
    parts = [f"loss {m['loss']:.4f}"]
    if "rewards/accuracies" in m:
        parts.append(f"acc {m['rewards/accuracies']:.2f}")
        if not short:
            parts.append(f"margin {m['rewards/margins']:.4f}")
    if "rewards/kendall_tau" in m:
        parts.append(f"tau {m['rewards/kendall_tau']:.2f}")
    if "kl" in m:  # KTO's reference point z0
        parts.append(f"kl {m['kl']:.4f}")
    if "rewards/accuracies" not in m:
        parts.append(f"nll/tok {m['nll/token']:.3f}")
    if short and "pairs_per_s" in m:
        parts.append(f"{m['pairs_per_s']:.1f} ex/s")
    return " ".join(parts)
