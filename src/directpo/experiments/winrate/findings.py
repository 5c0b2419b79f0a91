"""The judge floor and the paper's dialogue findings, each with a verdict generated from the results.

A win rate means something only if the judge can tell a better answer from a worse one. The local
reward-model judge has a measured held-out pair accuracy (its agreement with the human label on
pairs it was not trained on); below `judge_floor` (0.65 by default) the study refuses to report win
rates unless `--force`, and with `--force` every finding is "not testable here". A judge without a
measured accuracy (an LLM endpoint, a classifier) is reported as such and not refused.

The paper's findings (§6.2, Fig. 3 left), each compared with the results:
  1. DPO's answers beat the chosen (human-preferred) answer: its best win rate's interval above 0.5.
  2. DPO is about as good as Best-of-128: not below it at every temperature both ran.
  3. DPO is robust to the sampling temperature: no temperature below its best one.
  4. DPO beats Preferred-FT (πSFT): above it at every temperature.
"Below" / "above": the paired per-prompt difference's 95 % interval excludes 0 (`paired`; over seeds
its t-interval on the seeds' differences, `seeds`); where no paired record exists (results recorded
before per-prompt outcomes were kept), non-overlapping win-rate intervals (conservative). The
win rates' intervals: over prompts for one study, over seeds (t) for several. With several seeds
the floor applies to the weakest seed's judge.
"""
from __future__ import annotations

from ...errors import UserValueError

REPRODUCED, NOT_REPRODUCED, NOT_TESTABLE = "reproduced", "not reproduced", "not testable here"
PAPER_BON_N = 128


def judge_accuracy(info: dict, cfg) -> float | None:
    """The judge's held-out pair accuracy: measured for the local reward model only."""
    if cfg.judge_url or cfg.judge_classifier:
        return None
    return (info.get("judge") or info.get("rm") or {}).get("heldout_accuracy")


def judge_below_floor(info: dict, cfg) -> bool:
    accuracy = judge_accuracy(info, cfg)
    return accuracy is not None and accuracy < cfg.judge_floor


def check_judge_floor(info: dict, cfg) -> None:
    """Refuse a judge measured below the floor (before any win rate is computed), unless --force."""
    if judge_below_floor(info, cfg) and not cfg.force:
        raise UserValueError(
            f"the judge (the reward model in {'judge/' if 'judge' in info else 'rm/'}) agrees with the human label on {judge_accuracy(info, cfg):.1%} of "
            f"the held-out pairs, below --judge-floor {cfg.judge_floor:g}: its win rates would not tell methods "
            "apart; train a better judge (more --judge-steps or data), give --judge-url/--judge-classifier, or pass "
            "--force to report them anyway, marked as below the floor")


Win = tuple[float, float, float]  # (estimate, low, high) of a win rate


def ci(point: dict | None) -> tuple[float, float] | None:
    bounds = (point or {}).get("win_rate_ci")
    if bounds and None not in bounds:
        return float(bounds[0]), float(bounds[1])
    return None


def wins_of(points: list[dict]) -> dict[str, Win]:
    """label -> (win rate, its 95 % interval over prompts) of one study's points."""
    from .paired import label

    return {label(p): (p["win_rate"], *ci(p)) for p in points if p.get("win_rate") is not None and ci(p)}


class Evidence:
    """What the verdicts read: win rates with intervals (one study's bootstrap over prompts, or the
    t-interval over seeds) and paired differences (`paired.paired_tests` / `pool_paired`). Where a
    paired record is missing (results recorded before outcomes were kept), two methods differ only
    where their win-rate intervals do not overlap (conservative)."""

    def __init__(self, wins: dict[str, Win], paired: list[dict] | None = None):
        self.wins, self.paired = wins, paired or []

    def best(self, method: str) -> str | None:
        """The label of the method's (or `best_of_n_N`'s) highest win rate over the temperatures."""
        mine = [k for k in self.wins if k.rsplit("@", 1)[0] == method]
        return max(mine, key=lambda k: self.wins[k][0]) if mine else None

    def diff(self, a: str, b: str) -> tuple[str, str]:
        """('above' | 'below' | 'unclear', text) for a − b."""
        from .paired import fmt_diff, lookup

        r = lookup(self.paired, a, b)
        if r is not None and r.get("low") is not None:
            side = "above" if r["low"] > 0 else "below" if r["high"] < 0 else "unclear"
            return side, f"{a} − {b} {fmt_diff(r)} (paired, p(sign) {r['p_sign']:.2g})"
        (ea, la, ha), (eb, lb, hb) = self.wins[a], self.wins[b]
        side = "above" if la > hb else "below" if ha < lb else "unclear"
        return side, f"{a} {ea:.2f} vs {b} {eb:.2f} (intervals{' overlap' if side == 'unclear' else ''})"


def findings(points: list[dict], info: dict, cfg, evidence: Evidence | None = None) -> list[tuple[str, str, str]]:
    """(finding, verdict, why) for each of the paper's findings; `evidence`: by default one study's
    win rates and its paired tests from the points' per-prompt outcomes."""
    from .paired import paired_tests

    claims = ["DPO's answers beat the chosen answer (win rate > 0.5)", "DPO ≈ Best-of-128",
              "DPO is robust across sampling temperatures", "DPO beats Preferred-FT"]
    if judge_below_floor(info, cfg):
        why = f"judge below the floor ({judge_accuracy(info, cfg):.1%} < {cfg.judge_floor:.0%} held-out accuracy)"
        return [(c, NOT_TESTABLE, why) for c in claims]
    ev = evidence or Evidence(wins_of(points), paired_tests(points))
    dpo = ev.best("dpo")
    if dpo is None:
        return [(c, NOT_TESTABLE, "no DPO win rates with intervals") for c in claims]
    return [(claims[0],) + above_half(ev, dpo), (claims[1],) + against_bon(ev, dpo),
            (claims[2],) + robust(ev, dpo), (claims[3],) + against_pft(ev)]


def above_half(ev: Evidence, dpo: str) -> tuple[str, str]:
    rate, low, high = ev.wins[dpo]
    where = f"{dpo}: {rate:.2f} [{low:.2f}, {high:.2f}]"
    if low > 0.5:
        return REPRODUCED, where
    return NOT_REPRODUCED, where + (" (interval includes 0.5)" if high >= 0.5 else " (below 0.5)")


def temperatures_of(ev: Evidence, method: str) -> list[str]:
    return sorted((k for k in ev.wins if k.rsplit("@", 1)[0] == method), key=lambda k: float(k.rsplit("@", 1)[1]))


def against_bon(ev: Evidence, dpo: str) -> tuple[str, str]:
    bon = f"best_of_n_{PAPER_BON_N}"
    ns = sorted({int(k.rsplit("@", 1)[0].removeprefix("best_of_n_")) for k in ev.wins if k.startswith("best_of_n_")})
    if PAPER_BON_N not in ns:
        return NOT_TESTABLE, f"Best-of-N run with N ∈ {{{', '.join(map(str, ns)) or 'none'}}}, not 128"
    # paired at each temperature both ran: DPO falls short only if it is below at every one
    tested = [ev.diff(d, f"{bon}@{d.rsplit('@', 1)[1]}") for d in temperatures_of(ev, "dpo")
              if f"{bon}@{d.rsplit('@', 1)[1]}" in ev.wins]
    if not tested:
        return NOT_TESTABLE, "no temperature with both DPO and Best-of-128"
    text = "; ".join(t for _, t in tested)
    return (NOT_REPRODUCED, text + " (DPO below at every temperature)") if all(s == "below" for s, _ in tested)         else (REPRODUCED, text)


def robust(ev: Evidence, dpo: str) -> tuple[str, str]:
    temps = temperatures_of(ev, "dpo")
    if len(temps) < 2:
        return NOT_TESTABLE, "one temperature"
    tested = {t: ev.diff(t, dpo) for t in temps if t != dpo}
    below = [t for t, (side, _) in tested.items() if side == "below"]
    text = "; ".join(t for _, t in tested.values())
    if below:
        return NOT_REPRODUCED, f"below its best ({dpo}) at {', '.join(below)}: {text}"
    return REPRODUCED, f"no temperature below its best ({dpo}): {text}"


def against_pft(ev: Evidence) -> tuple[str, str]:
    tested = [ev.diff(d, "preferred_ft@" + d.rsplit("@", 1)[1]) for d in temperatures_of(ev, "dpo")
              if "preferred_ft@" + d.rsplit("@", 1)[1] in ev.wins]
    if not tested:
        return NOT_TESTABLE, "no Preferred-FT win rates"
    text = "; ".join(t for _, t in tested)
    if all(side == "above" for side, _ in tested):
        return REPRODUCED, text + " (above at every temperature)"
    return NOT_REPRODUCED, text + (" (DPO below somewhere)" if any(s == "below" for s, _ in tested) else
                                   " (not above at every temperature)")


def findings_markdown(points: list[dict], info: dict, cfg, evidence: Evidence | None = None) -> list[str]:
    lines = ["## The paper's dialogue findings, here", "",
             "Each verdict is generated from the tables above: win rates with their 95 % intervals, and two "
             "methods (or two temperatures) compared by the paired per-prompt difference: above / below where its "
             "95 % interval excludes 0 (only where no paired record exists: where the win-rate intervals do not "
             "overlap). *not testable here*: this run cannot say.", "",
             "| finding (paper §6.2) | verdict | why |", "|---|---|---|"]
    lines += [f"| {claim} | {verdict} | {why} |" for claim, verdict, why in findings(points, info, cfg, evidence)]
    return lines + [""]
