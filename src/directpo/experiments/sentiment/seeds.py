"""`--seeds 0,1,2,3,4`: the whole study once per seed, and what holds across them.

Each seed is a complete study in OUT/seed-S (its own prompts, samples, pairs, reward model, runs
and report; each resumable as usual). OUT then gets the pooled report: every point with its seed
(points.json / points.csv), every seed's points and hulls on one plot, and summary.md. The unit of
evidence there is one seed's difference between DPO's hull and a baseline's: their mean, a 95 %
t-interval on seeds − 1 degrees of freedom and the sign count (`intervals.seed_interval`), the
crossings per seed, the gap at fixed KLs, the per-budget verdicts, each on the raw reward and on the
length-controlled one, and what each method was given (settings, steps, FLOPs). A verdict is
worded no stronger than its interval. `--report-only` rewrites all of it from the points on disk.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ...console import log
from ...diskio import write_text
from ...errors import UserValueError
from ..frontier import (LABELS, budget_table, budget_verdict, hull_of, length_controlled, plot_frontier, summarize,
                        write_points)
from ..intervals import interval_word, seed_interval
from .budgets import budget_lines, coverage_decisions
from .config import SentimentConfig, parse_numbers, recorded_config

GRID = (0.5, 1.0, 2.0, 4.0, 8.0)  # KLs (nats) at which the seeds' hull gaps are pooled
VIEWS = {"raw": "raw ground-truth reward", "length_controlled": "length-controlled reward (at πSFT's mean length)"}


def run_seeds(cfg: SentimentConfig, run_one) -> dict:
    """run_one(cfg of seed S in OUT/seed-S) for each seed, then the pooled report in OUT."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(x) for x in parse_numbers(cfg.seeds, "seeds")]
    for s in seeds:
        log(f"sentiment: seed {s} ({seeds.index(s) + 1} of {len(seeds)}) -> {out / f'seed-{s}'}")
        run_one(replace(cfg, seed=s, seeds="", output_dir=str(out / f"seed-{s}")))
    return report_seeds(cfg, seeds)


def report_seeds(cfg: SentimentConfig, seeds: list[int]) -> dict:
    """The pooled report in OUT from each OUT/seed-S's points.json and summary.json."""
    out = Path(cfg.output_dir)
    points = [p for s in seeds for p in json.loads((out / f"seed-{s}" / "points.json").read_text())]
    seconds = {s: json.loads((out / f"seed-{s}" / "summary.json").read_text()).get("seconds") for s in seeds}
    write_points(points, out)
    plot_frontier(points, out / "frontier.png", title=f"controlled sentiment ({cfg.preset}), seeds "
                                                        f"{', '.join(map(str, seeds))}: reward vs KL")
    pooled = {view: pool(points, seeds, view) for view in VIEWS}
    (out / "summary.md").write_text(seeds_markdown(cfg, seeds, seconds, points, pooled))
    result = {"output_dir": str(out), "points": len(points), "seeds": seeds, "comparisons": pooled["raw"],
              "length_controlled": pooled["length_controlled"],
              "seconds": sum(v for v in seconds.values() if v is not None)}
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    if cfg.check_seeds:
        result["check_seeds"] = check_seeds(cfg, seeds, pooled)
    return result


def check_seeds(cfg: SentimentConfig, seeds: list[int], pooled: dict) -> dict:
    """Each seed of --check-seeds (a study in OUT/seed-S, not pooled): its gap to each baseline, in both
    views, against the pooled seeds' 95 % prediction interval for a new seed; OUT/check-seeds.md and
    .json. Inside for ~95 % of gaps is what normal seed-to-seed spread predicts."""
    out = Path(cfg.output_dir)
    rows = []
    for s in (int(x) for x in parse_numbers(cfg.check_seeds, "check_seeds")):
        path = out / f"seed-{s}" / "points.json"
        if not path.exists():
            raise UserValueError(f"--check-seeds: {path} does not exist; run that seed first: directpo experiment "
                                 f"sentiment --preset {cfg.preset} --seed {s} --output-dir {path.parent}")
        points = [{**p, "seed": s} for p in json.loads(path.read_text())]
        for view in VIEWS:
            gaps = summarize(view_points(points, view)) if any(p["method"] == "sft" for p in points) else {}
            for m, c in pooled[view].items():
                iv, gap = c["interval"], gaps.get(m, {}).get("diff")
                inside = None if gap is None or iv["pred_low"] is None else iv["pred_low"] <= gap <= iv["pred_high"]
                rows.append({"seed": s, "view": view, "baseline": m, "gap": gap, "pooled": iv, "inside": inside})
    judged = [r for r in rows if r["inside"] is not None]
    result = {"seeds": seeds, "checked": sorted({r["seed"] for r in rows}), "rows": rows,
              "inside": sum(r["inside"] for r in judged), "judged": len(judged)}
    write_text(out / "check-seeds.json", json.dumps(result, indent=1))
    write_text(out / "check-seeds.md", check_markdown(result))
    log(f"sentiment: --check-seeds: {result['inside']} of {result['judged']} gaps inside the pooled seeds' 95 % "
        f"prediction intervals -> {out / 'check-seeds.md'}")
    return result


def check_markdown(result: dict) -> str:
    n = len(result["seeds"])
    lines = [f"# Seeds run apart, against the pooled seeds ({', '.join(map(str, result['seeds']))})", "",
             f"{result['inside']} of {result['judged']} gaps fall inside the pooled seeds' 95 % prediction interval "
             f"for a new seed (mean ± t·sd·√(1 + 1/{n}), {n - 1} degrees of freedom); normal seed-to-seed spread puts "
             "~95 % inside, so about one gap in twenty outside is expected. The interval for the mean (also shown) is "
             f"√{n + 1} times narrower: it says where the mean is, not where one seed lands.", "",
             "| seed | view | baseline | gap | pooled mean [95 % interval] | 95 % prediction interval | inside |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        gap = "—" if r["gap"] is None else f"{r['gap']:+.3f}"
        inside = {True: "yes", False: "**no**", None: "—"}[r["inside"]]
        lines.append(f"| {r['seed']} | {VIEWS[r['view']]} | {LABELS.get(r['baseline'], r['baseline'])} | {gap} | "
                     f"{fmt_interval(r['pooled'])} | {fmt_prediction(r['pooled'])} | {inside} |")
    return "\n".join(lines) + "\n"


def view_points(points: list[dict], view: str) -> list[dict]:
    return length_controlled(points) if view == "length_controlled" else points


def pool(points: list[dict], seeds: list[int], view: str = "raw") -> dict:
    """Per baseline: DPO's hull gap per seed, its seed-level interval, the crossings and verdicts per
    seed, the gap at each KL of GRID (over the seeds whose common range reaches it), the pooled verdict."""
    per_seed = {s: view_points([p for p in points if p.get("seed") == s], view) for s in seeds}
    comparisons = {s: summarize(ps) if any(p["method"] == "sft" for p in ps) else {} for s, ps in per_seed.items()}
    out = {}
    for m in sorted({m for c in comparisons.values() for m in c}):
        got = {s: c[m] for s, c in comparisons.items() if c.get(m)}
        grid = {}
        for k in GRID:
            gaps = [gap_at(per_seed[s], m, k) for s in got if got[s]["kl_range"] >= k]
            grid[k] = seed_interval(gaps)
        entry = {"diff_by_seed": {s: c["diff"] for s, c in got.items()},
                 "diff_se_by_seed": {s: c["diff_se"] for s, c in got.items()},
                 "kl_range_by_seed": {s: c["kl_range"] for s, c in got.items()},
                 "crossings_by_seed": {s: c["crossings"] for s, c in got.items()},
                 "verdict_by_seed": {s: c["verdict"] for s, c in got.items()},
                 "interval": seed_interval([c["diff"] for c in got.values()]), "grid": grid}
        entry["verdict"] = pooled_verdict(entry)
        out[m] = entry
    return out


def gap_at(points: list[dict], method: str, k: float, reference: str = "dpo") -> float:
    import numpy as np

    start = next(p for p in points if p["method"] == "sft")["reward"]
    (xa, ya), (xb, yb) = (hull_of([p for p in points if p["method"] == m], start) for m in (reference, method))
    return float(np.interp(k, xa, ya) - np.interp(k, xb, yb))


def pooled_verdict(c: dict) -> str:
    """No stronger than the evidence: 'dominates' only where every seed's hull is above everywhere and
    the seed-level interval is above 0; otherwise what the interval says, and how often the hulls cross."""
    iv, verdicts = c["interval"], list(c["verdict_by_seed"].values())
    word = interval_word(iv)
    if verdicts and all(v == "dominates" for v in verdicts) and word == "above 0":
        text = "DPO dominates in every seed; gap above 0"
    elif verdicts and all(v == "is dominated by" for v in verdicts) and word == "below 0":
        text = "DPO is dominated in every seed; gap below 0"
    else:
        text = {"above 0": "DPO higher on average (interval above 0)",
                "below 0": "DPO lower on average (interval below 0)",
                "includes 0": "no difference shown (interval includes 0)"}.get(word, word)
    crosses = sum(v == "crosses" for v in verdicts)
    return text + (f"; hulls cross in {crosses} of {len(verdicts)} seeds" if crosses else "")


def fmt_interval(iv: dict, digits: int = 3) -> str:
    if iv.get("mean") is None:
        return "—"
    if iv.get("low") is None:
        return f"{iv['mean']:+.{digits}f} (1 seed)"
    return (f"{iv['mean']:+.{digits}f} [{iv['low']:+.{digits}f}, {iv['high']:+.{digits}f}] "
            f"({iv['positive']}+/{iv['negative']}−)")


def fmt_prediction(iv: dict, digits: int = 3) -> str:
    """A seed interval's 95 % prediction interval for a new seed, or — (fewer than two seeds)."""
    if iv.get("pred_low") is None:
        return "—"
    return f"[{iv['pred_low']:+.{digits}f}, {iv['pred_high']:+.{digits}f}]"


def seeds_markdown(cfg: SentimentConfig, seeds: list[int], seconds: dict, points: list[dict], pooled: dict) -> str:
    minutes = [v / 60 for v in seconds.values() if v is not None]
    took = f", {min(minutes):.1f}–{max(minutes):.1f} min each on this machine" if minutes else ""
    lines = [f"# Controlled sentiment generation — preset `{cfg.preset}`, seeds {', '.join(map(str, seeds))}", "",
             f"Each seed is a whole study (its report: `seed-S/summary.md`){took}. Every point is "
             f"{cfg.eval_samples} samples × {cfg.n_eval_prompts} eval prompts (the same prompts for every method of "
             f"a seed; a seed's own prompts); {len(seeds)} seeds, so each interval below has "
             f"{len(seeds) - 1} degrees of freedom.", "", "![frontier](frontier.png)", "",
             "Each method's frontier is the upper piecewise-linear hull of its points and πSFT (KL 0), flat past its "
             "best point. The gap is DPO's hull minus the baseline's, averaged over the KL range both reach in that "
             "seed. Pooled: the mean of the seeds' gaps, its 95 % t-interval over seeds and the sign count "
             "(seeds above / below 0). *dominates* only where, in every seed, DPO's hull is at or above the "
             "baseline's at every KL of the common range (gap > 2 s.e. of the points' errors) and the interval is "
             "above 0; *crosses*: the hulls change order within the range.", ""]
    for view, title in VIEWS.items():
        lines += pooled_section(seeds, pooled[view], title)
        lines += ["", f"### Per KL budget, {title}: DPO's best point against each baseline's, per seed "
                      "(above / below / tie at 2 s.e.)", ""]
        lines += budget_verdict_lines(seeds, view_points(points, view))
        lines.append("")
    lines += budget_section(cfg, seeds, points)
    return "\n".join(lines) + "\n"


def pooled_section(seeds: list[int], pooled: dict, title: str) -> list[str]:
    lines = [f"## DPO against each baseline — {title}", "",
             "| baseline | gap per seed | mean [95 % interval] (signs) | a new seed: 95 % prediction interval | "
             "crossings (KL) per seed | verdict |",
             "|---|---|---|---|---|---|"]
    for m, c in pooled.items():
        gaps = " / ".join(f"{c['diff_by_seed'][s]:+.3f}" if s in c["diff_by_seed"] else "—" for s in seeds)
        cross = " / ".join(",".join(f"{k:.1f}" for k in c["crossings_by_seed"].get(s, [])) or "none" for s in seeds)
        lines.append(f"| {LABELS.get(m, m)} | {gaps} | {fmt_interval(c['interval'])} | "
                     f"{fmt_prediction(c['interval'])} | {cross} | {c['verdict']} |")
    lines += ["", f"The gap at fixed KLs ({title}; mean [95 % interval] over the seeds whose common range reaches "
                  "that KL; — where none does):", "",
              "| baseline | " + " | ".join(f"KL {k:g}" for k in GRID) + " |", "|---|" + "---|" * len(GRID)]
    for m, c in pooled.items():
        cells = [fmt_interval(c["grid"][k]) + (f" n={c['grid'][k]['n']}" if 0 < c["grid"][k]["n"] < len(seeds) else "")
                 for k in GRID]
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return lines + [""]


def budget_section(cfg: SentimentConfig, seeds: list[int], points: list[dict]) -> list[str]:
    """What each method was given, per seed, and what the equal-coverage rule says of it."""
    lines = ["## What each method was given", "",
             "Settings (β, KL coefficients, α), the steps each setting's run reached, and estimated training FLOPs "
             "(`experiments/sentiment/budgets.py`). Coverage rule: a method whose largest KL is below the largest "
             "KL of the others is trained on (PPO-type runs until their ground-truth reward plateaus or they have "
             "spent DPO's FLOPs).", ""]
    for s in seeds:
        ps = [p for p in points if p.get("seed") == s]
        record = Path(cfg.output_dir) / f"seed-{s}"
        seed_cfg = recorded_config(record) if (record / "study_config.json").exists() else cfg
        short = [f"{LABELS.get(m, m)} ({d['reach']:.2f} < {d['target']:.2f})"
                 for m, d in sorted(coverage_decisions(ps).items()) if d["short"]]
        lines += [f"Seed {s}:", ""] + budget_lines(seed_cfg, ps)
        lines += ["", "Short of the others' KL range under the rule: " + (", ".join(short) or "none") + ".", ""]
    return lines


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
