"""The judge floor and the paper's dialogue findings, each with a verdict generated from the results.

A win rate means something only if the judge can tell a better answer from a worse one. The local
reward-model judge has a measured held-out pair accuracy (its agreement with the human label on
pairs it was not trained on); below `judge_floor` (0.65 by default) the study refuses to report win
rates unless `--force`, and with `--force` every finding is "not testable here". A judge without a
measured accuracy (an LLM endpoint, a classifier) is reported as such and not refused.

The paper's findings (§6.2, Fig. 3 left), each compared with the results:
  1. DPO's answers beat the chosen (human-preferred) answer: its win rate above 0.5.
  2. DPO is about as good as Best-of-128: DPO's best win rate not below Best-of-128's.
  3. DPO is robust to the sampling temperature: no temperature's win rate below its best one's.
  4. DPO beats Preferred-FT (πSFT).
"Below" / "above" use the 95 % intervals over prompts each point carries (non-overlapping intervals
for two methods: a conservative test; the paired per-prompt test needs the samples of both).
"""
from __future__ import annotations

from ...errors import UserValueError

REPRODUCED, NOT_REPRODUCED, NOT_TESTABLE = "reproduced", "not reproduced", "not testable here"
PAPER_BON_N = 128


def judge_accuracy(info: dict, cfg) -> float | None:
    """The judge's held-out pair accuracy: measured for the local reward model only."""
    if cfg.judge_url or cfg.judge_classifier:
        return None
    return (info.get("rm") or {}).get("heldout_accuracy")


def judge_below_floor(info: dict, cfg) -> bool:
    accuracy = judge_accuracy(info, cfg)
    return accuracy is not None and accuracy < cfg.judge_floor


def check_judge_floor(info: dict, cfg) -> None:
    """Refuse a judge measured below the floor (before any win rate is computed), unless --force."""
    if judge_below_floor(info, cfg) and not cfg.force:
        raise UserValueError(
            f"the judge (the reward model in rm/) agrees with the human label on {judge_accuracy(info, cfg):.1%} of "
            f"the held-out pairs, below --judge-floor {cfg.judge_floor:g}: its win rates would not tell methods "
            "apart; train a better judge (more --rm-steps or data), give --judge-url/--judge-classifier, or pass "
            "--force to report them anyway, marked as below the floor")


def ci(point: dict | None) -> tuple[float, float] | None:
    bounds = (point or {}).get("win_rate_ci")
    if bounds and None not in bounds:
        return float(bounds[0]), float(bounds[1])
    return None


def best(points: list[dict], method: str, knob=None) -> dict | None:
    """The method's point with the highest win rate over the temperatures."""
    mine = [p for p in points if p["method"] == method and (knob is None or p["knob"] == knob)
            and p.get("win_rate") is not None]
    return max(mine, key=lambda p: p["win_rate"]) if mine else None


def findings(points: list[dict], info: dict, cfg) -> list[tuple[str, str, str]]:
    """(finding, verdict, why) for each of the paper's findings."""
    claims = ["DPO's answers beat the chosen answer (win rate > 0.5)", "DPO ≈ Best-of-128",
              "DPO is robust across sampling temperatures", "DPO beats Preferred-FT"]
    if judge_below_floor(info, cfg):
        why = f"judge below the floor ({judge_accuracy(info, cfg):.1%} < {cfg.judge_floor:.0%} held-out accuracy)"
        return [(c, NOT_TESTABLE, why) for c in claims]
    dpo = best(points, "dpo")
    if dpo is None or ci(dpo) is None:
        return [(c, NOT_TESTABLE, "no DPO win rates with intervals") for c in claims]
    return [(claims[0],) + above_half(dpo), (claims[1],) + against_bon(points, dpo),
            (claims[2],) + robust(points, dpo), (claims[3],) + against(dpo, best(points, "preferred_ft"))]


def above_half(dpo: dict) -> tuple[str, str]:
    low, high = ci(dpo)
    where = f"DPO at T={dpo['temperature']:g}: {dpo['win_rate']:.2f} [{low:.2f}, {high:.2f}]"
    if low > 0.5:
        return REPRODUCED, where
    return NOT_REPRODUCED, where + (" (interval includes 0.5)" if high >= 0.5 else " (below 0.5)")


def against_bon(points: list[dict], dpo: dict) -> tuple[str, str]:
    ns = sorted({p["knob"] for p in points if p["method"] == "best_of_n"})
    if PAPER_BON_N not in ns:
        return NOT_TESTABLE, f"Best-of-N run with N ∈ {{{', '.join(map(str, ns)) or 'none'}}}, not 128"
    bon = best(points, "best_of_n", PAPER_BON_N)
    if ci(bon) is None:
        return NOT_TESTABLE, "Best-of-128 has no interval"
    gap = f"DPO {dpo['win_rate']:.2f} vs Best-of-128 {bon['win_rate']:.2f}"
    return (NOT_REPRODUCED, gap + " (DPO's interval below)") if ci(dpo)[1] < ci(bon)[0] else (REPRODUCED, gap)


def robust(points: list[dict], dpo: dict) -> tuple[str, str]:
    temps = sorted((p for p in points if p["method"] == "dpo" and ci(p)), key=lambda p: p["temperature"])
    if len(temps) < 2:
        return NOT_TESTABLE, "one temperature"
    below = [p for p in temps if ci(p)[1] < ci(dpo)[0]]
    rates = ", ".join(f"T={p['temperature']:g} {p['win_rate']:.2f}" for p in temps)
    if below:
        cold = ", ".join(f"{p['temperature']:g}" for p in below)
        return NOT_REPRODUCED, f"{rates}: below its best at T={cold}"
    return REPRODUCED, f"{rates}: every interval reaches its best one's"


def against(dpo: dict, pft: dict | None) -> tuple[str, str]:
    if pft is None or ci(pft) is None:
        return NOT_TESTABLE, "no Preferred-FT win rates"
    gap = f"best DPO {dpo['win_rate']:.2f} vs best Preferred-FT {pft['win_rate']:.2f}"
    if ci(dpo)[0] > ci(pft)[1]:
        return REPRODUCED, gap
    return NOT_REPRODUCED, gap + (" (intervals overlap)" if ci(dpo)[1] >= ci(pft)[0] else " (DPO below)")


def findings_markdown(points: list[dict], info: dict, cfg) -> list[str]:
    lines = ["## The paper's dialogue findings, here", "",
             "Each verdict is generated from the tables above (95 % intervals over prompts; two methods differ "
             "only where their intervals do not overlap). *not testable here*: this run cannot say.", "",
             "| finding (paper §6.2) | verdict | why |", "|---|---|---|"]
    lines += [f"| {claim} | {verdict} | {why} |" for claim, verdict, why in findings(points, info, cfg)]
    return lines + [""]
