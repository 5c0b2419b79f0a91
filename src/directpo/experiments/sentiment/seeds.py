"""`--seeds 0,1,2`: the whole study once per seed, and what holds across them.

Each seed is a complete study in OUT/seed-S (its own prompts, samples, pairs, reward model, runs
and report; each resumable as usual). OUT then gets the pooled report: every point with its seed
(points.json / points.csv), all seeds' points on one frontier plot, and summary.md with DPO's
verdict against each baseline per seed, the seed-to-seed spread of the difference, and the
per-budget verdicts per seed, so a claim is only made where the seeds agree.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

from ...console import log
from ..frontier import LABELS, budget_table, budget_verdict, plot_frontier, write_points
from .config import SentimentConfig, parse_numbers


def run_seeds(cfg: SentimentConfig, run_one) -> dict:
    """run_one(cfg of seed S in OUT/seed-S) for each seed, then the pooled report in OUT."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(x) for x in parse_numbers(cfg.seeds, "seeds")]
    per_seed = {}
    for s in seeds:
        log(f"sentiment: seed {s} ({seeds.index(s) + 1} of {len(seeds)}) -> {out / f'seed-{s}'}")
        per_seed[s] = run_one(replace(cfg, seed=s, seeds="", output_dir=str(out / f"seed-{s}")))
    points = [p for s in seeds for p in json.loads((out / f"seed-{s}" / "points.json").read_text())]
    write_points(points, out)
    plot_frontier(points, out / "frontier.png", title=f"controlled sentiment ({cfg.preset}), seeds "
                                                        f"{', '.join(map(str, seeds))}: reward vs KL")
    spread = seed_spread({s: r["comparisons"] for s, r in per_seed.items()})
    (out / "summary.md").write_text(seeds_markdown(cfg, seeds, per_seed, points, spread))
    result = {"output_dir": str(out), "points": len(points), "seeds": seeds, "comparisons": spread,
              "seconds": sum(r["seconds"] for r in per_seed.values())}
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    return result


def seed_spread(comparisons: dict) -> dict:
    """Per baseline: the mean-frontier difference per seed, its mean and standard deviation over the
    seeds, the verdicts, and the verdict that holds across seeds ('mixed' when they disagree)."""
    out = {}
    for m in sorted({m for c in comparisons.values() for m in c}):
        diffs = {s: c[m]["diff"] for s, c in comparisons.items() if m in c and c[m]}
        verdicts = {s: comparisons[s][m]["verdict"] for s in diffs}
        agreed = set(verdicts.values())
        out[m] = {"diff_by_seed": diffs, "verdict_by_seed": verdicts, "diff_mean": statistics.fmean(diffs.values()),
                  "diff_sd": statistics.stdev(diffs.values()) if len(diffs) > 1 else None,
                  "verdict": agreed.pop() if len(agreed) == 1 else "mixed"}
    return out


def seeds_markdown(cfg: SentimentConfig, seeds: list[int], per_seed: dict, points: list[dict], spread: dict) -> str:
    minutes = [r["seconds"] / 60 for r in per_seed.values()]
    lines = [f"# Controlled sentiment generation — preset `{cfg.preset}`, seeds {', '.join(map(str, seeds))}", "",
             f"Each seed is a whole study (its report: `seed-S/summary.md`), {min(minutes):.1f}–{max(minutes):.1f} "
             "min each on this machine.", "", "![frontier](frontier.png)", "",
             "## DPO's mean frontier against each baseline, per seed", "",
             "| baseline | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd over seeds | holds across seeds |",
             "|---|" + "---|" * (len(seeds) + 2)]
    for m, c in spread.items():
        cells = [f"{c['diff_by_seed'][s]:+.3f} ({c['verdict_by_seed'][s]})" if s in c["diff_by_seed"] else "—"
                 for s in seeds]
        sd = f" ± {c['diff_sd']:.3f}" if c["diff_sd"] is not None else ""
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + f" | {c['diff_mean']:+.3f}{sd} | {c['verdict']} |")
    lines += ["", "## Per KL budget: DPO's best reward against each baseline's, per seed (above / below / tie)", ""]
    lines += budget_verdict_lines(seeds, points)
    return "\n".join(lines) + "\n"


def budget_verdict_lines(seeds: list[int], points: list[dict]) -> list[str]:
    top = max(max(p["kl"], 0.0) for p in points)  # the same columns for every seed
    tables = {s: budget_table([p for p in points if p.get("seed") == s], top=top) for s in seeds}
    if any("dpo" not in t for t in tables.values()):
        return ["(no DPO points)"]
    budgets = [f"KL ≤ {b:g}" for b, _ in tables[seeds[0]]["dpo"][:-1]] + ["any KL"]
    lines = ["| baseline | " + " | ".join(budgets) + " |", "|---|" + "---|" * len(budgets)]
    baselines = sorted({m for t in tables.values() for m in t if m != "dpo"})
    for m in baselines:
        cells = []
        for k in range(len(budgets)):
            per = [budget_verdict(tables[s]["dpo"][k][1], tables[s][m][k][1]) if m in tables[s] else "—"
                   for s in seeds]
            cells.append(" / ".join(per))
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return lines
