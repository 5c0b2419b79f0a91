"""`--seeds 0,1,2`: the whole win-rate study once per seed, and what holds across the seeds.

Each seed is a complete study in OUT/seed-S (its own split of prompts into eval / judge / policy
training, its own models, samples, judge and report; each resumable as usual). OUT then gets the
pooled report: per method and temperature the seeds' win rates, their mean and a 95 % t-interval over
seeds (`intervals.seed_interval`); per pair of methods (and DPO's temperatures) the seeds' mean
per-prompt differences pooled the same way, with the sign test over every seed's prompts
(`paired.pool_paired`); the paper's findings judged from those pooled numbers; and the judge's
held-out accuracy per seed (the floor applies to the weakest one). `--report-only --seeds ...`
rewrites every seed's report and the pooled one from the points on disk.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ...console import log
from ..common import parse_numbers
from ..intervals import seed_interval
from .findings import Evidence, findings, findings_markdown, judge_accuracy, judge_below_floor
from .paired import label, paired_markdown, paired_tests, pool_paired

SEED_DIR = "seed-{}"


def seed_list(cfg) -> list[int]:
    return [int(x) for x in parse_numbers(cfg.seeds, "seeds")]


def seed_config(cfg, s: int):
    return replace(cfg, seed=s, seeds="", output_dir=str(Path(cfg.output_dir) / SEED_DIR.format(s)))


def run_seeds(cfg, run_one) -> dict:
    """run_one(the settings of seed S in OUT/seed-S) for each seed, then the pooled report in OUT."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = seed_list(cfg)
    for k, s in enumerate(seeds, 1):
        log(f"{cfg.TASK}: seed {s} ({k} of {len(seeds)}) -> {out / SEED_DIR.format(s)}")
        run_one(seed_config(cfg, s))
    return report_seeds(cfg, seeds)


def load_seed(out: Path, s: int) -> tuple[list[dict], dict]:
    """A seed's points (each tagged with its seed) and summary.json."""
    folder = out / SEED_DIR.format(s)
    points = json.loads((folder / "points.json").read_text())
    return [{**p, "seed": s} for p in points], json.loads((folder / "summary.json").read_text())


def pooled_wins(points: list[dict], seeds: list[int]) -> dict[str, dict]:
    """label -> the seeds' win rates and their seed-level interval (one seed: its interval over prompts)."""
    out: dict[str, dict] = {}
    for key in dict.fromkeys(label(p) for p in points):
        mine = {p["seed"]: p for p in points if label(p) == key and p.get("win_rate") is not None}
        iv = seed_interval([p["win_rate"] for p in mine.values()])
        if iv["n"] == 1:  # no spread over seeds is known: the prompts' bootstrap interval
            only = next(iter(mine.values()))
            iv["low"], iv["high"] = (only.get("win_rate_ci") or [None, None])[:2]
        out[key] = {"by_seed": {s: p["win_rate"] for s, p in mine.items()}, "interval": iv,
                    "method": next(iter(mine.values()))["method"], "knob": next(iter(mine.values()))["knob"],
                    "temperature": next(iter(mine.values()))["temperature"]}
    return out


def floor_info(summaries: dict[int, dict], cfg) -> dict:
    """The judge the floor applies to: the seed whose judge is weakest (None: not measured here)."""
    accuracies = [judge_accuracy(s["info"], cfg) for s in summaries.values()]
    known = [a for a in accuracies if a is not None]
    return {"judge": {"heldout_accuracy": min(known)}} if known else {}


def report_seeds(cfg, seeds: list[int]) -> dict:
    """The pooled report in OUT (summary.md, summary.json, points.json, winrate.png) from each seed's."""
    from .report import LABELS, plot_winrates, short_judge, write_points

    out = Path(cfg.output_dir)
    loaded = {s: load_seed(out, s) for s in seeds}
    points = [p for s in seeds for p in loaded[s][0]]
    summaries = {s: loaded[s][1] for s in seeds}
    wins = pooled_wins(points, seeds)
    per_seed = {s: summaries[s].get("paired") or paired_tests(loaded[s][0], seed=s) for s in seeds}
    pooled = pool_paired(per_seed)
    evidence = Evidence({k: (w["interval"]["mean"], w["interval"]["low"], w["interval"]["high"])
                         for k, w in wins.items() if w["interval"]["low"] is not None}, pooled)
    info = floor_info(summaries, cfg)
    verdicts = findings(points, info, cfg, evidence)
    mean_points = [{"method": w["method"], "knob": w["knob"], "temperature": w["temperature"],
                    "win_rate": w["interval"]["mean"], "win_rate_ci": [w["interval"]["low"], w["interval"]["high"]]}
                   for w in wins.values()]
    write_points(points, out / "points.json")
    ref_length = [s["info"]["evaluation"]["reference_length"] for s in summaries.values()]
    plot_winrates(mean_points, out / "winrate.png", f"{cfg.TASK} ({cfg.preset}), seeds {', '.join(map(str, seeds))}: "
                  f"mean win rate, 95 % t-interval over seeds; judge: {short_judge(cfg)}", sum(ref_length) / len(ref_length))
    seconds = {s: summaries[s].get("seconds") for s in seeds}
    (out / "summary.md").write_text(seeds_markdown(cfg, seeds, summaries, wins, pooled, info, points, evidence,
                                                   LABELS))
    result = {"output_dir": str(out), "task": cfg.TASK, "preset": cfg.preset, "seeds": seeds,
              "win_rates": {k: w["interval"]["mean"] for k, w in wins.items()},
              "win_rates_over_seeds": wins, "paired": pooled,
              "findings": [{"finding": c, "verdict": v, "why": why} for c, v, why in verdicts],
              "judge_accuracy_by_seed": {s: judge_accuracy(summaries[s]["info"], cfg) for s in seeds},
              "seconds_by_seed": seconds, "seconds": sum(v for v in seconds.values() if v is not None)}
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    return result


def fmt_iv(iv: dict) -> str:
    if iv.get("mean") is None:
        return "–"
    text = f"{iv['mean']:.3f}"
    return text + (f" [{iv['low']:.3f}, {iv['high']:.3f}]" if iv.get("low") is not None else "")


def seeds_markdown(cfg, seeds, summaries, wins, pooled, info, points, evidence, names) -> str:
    from .report import format_rate, series_name

    first = summaries[seeds[0]]["info"]
    data = first["data"]
    lines = [f"# {cfg.TASK} — preset `{cfg.preset}`, seeds {', '.join(map(str, seeds))}", "",
             f"Each seed is a whole study (its report: `seed-S/summary.md`): its own split of the prompts "
             f"({data['eval_prompts']} eval prompts, {data['train_pairs']} policy pairs, {data.get('judge_pairs', 0)} "
             f"judge pairs in seed {seeds[0]}), models, samples and judge. {len(seeds)} seeds: each interval below "
             f"is a 95 % t-interval over seeds ({len(seeds) - 1} degrees of freedom)"
             + (" (one seed: the interval over its prompts)" if len(seeds) == 1 else "") + ".", "",
             "![win rate vs temperature](winrate.png)", "", "## The judge, per seed", "",
             "| seed | judge (`judge/`) held-out accuracy | reward model of Best-of-N/PPO (`rm/`) held-out accuracy | "
             "minutes |", "|---|---|---|---|"]
    for s in seeds:
        i = summaries[s]["info"]
        minutes = summaries[s].get("seconds")
        lines.append(f"| {s} | {format_rate(judge_accuracy(i, cfg))} | {format_rate(i['rm'].get('heldout_accuracy'))} | "
                     f"{'–' if minutes is None else f'{minutes / 60:.1f}'} |")
    if judge_below_floor(info, cfg):
        lines += ["", f"**The weakest seed's judge agrees with the human label on {format_rate(judge_accuracy(info, cfg))}"
                      f" of the held-out pairs, BELOW THE FLOOR ({format_rate(cfg.judge_floor)}): the win rates below "
                      "are reported only because of --force and do not test the paper's claims.**"]
    lines += ["", "## Win rate against the reference, per seed and pooled", "",
              "| method | T | " + " | ".join(f"seed {s}" for s in seeds) + " | mean [95 % interval] |",
              "|---|---|" + "---|" * (len(seeds) + 1)]
    for w in wins.values():
        cells = " | ".join("–" if w["by_seed"].get(s) is None else f"{w['by_seed'][s]:.3f}" for s in seeds)
        lines.append(f"| {series_name(w)} | {w['temperature']:g} | {cells} | {fmt_iv(w['interval'])} |")
    lines += [""] + paired_markdown(pooled, names, over_seeds=len(seeds))
    lines += findings_markdown(points, info, cfg, evidence)
    return "\n".join(lines) + "\n"
