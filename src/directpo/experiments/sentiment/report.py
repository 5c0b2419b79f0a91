"""Stage 8, the report: points.json / points.csv, frontier.png, summary.md (the frontier comparison
of `experiments.frontier` under a header describing the study)."""
from __future__ import annotations

import json
from pathlib import Path

from ..frontier import (LABELS, best_within, budget_markdown, budget_verdict, length_markdown, markdown,
                        plot_frontier, predict_at, summarize, write_points)
from ..common import STUDY_RECORD, relative_to
from ...errors import UserValueError
from .config import SentimentConfig, parse_numbers, recorded_config


def write_report(cfg: SentimentConfig, out: Path, points: list[dict], info: dict, seconds: float) -> dict:
    """Write the report files; returns DPO's comparison with each baseline."""
    points = with_length_control(points, cfg.seed)
    comparisons = summarize(points)
    write_points(points, out)
    plot_frontier(points, out / "frontier.png", title=f"controlled sentiment ({cfg.preset}): reward vs KL")
    text = markdown(points, comparisons, summary_header(cfg, info, seconds)) + coverage_note(points)
    text += budget_markdown(points) + length_markdown(points) + given_markdown(cfg, points)
    if "online_cost" in info:
        text += online_section(cfg, points, comparisons, info)
    (out / "summary.md").write_text(text)
    return comparisons


def given_markdown(cfg: SentimentConfig, points: list[dict]) -> str:
    """What each method was given (settings, steps, FLOPs) and what the coverage rule says of it."""
    from .budgets import budget_lines, coverage_decisions

    short = [f"{LABELS.get(m, m)} ({d['reach']:.2f} < {d['target']:.2f})"
             for m, d in sorted(coverage_decisions(points, compared=cfg.cover_list()).items()) if d["short"]]
    lines = ["", "## What each method was given", "",
             "Strength settings, the steps each setting's run reached, estimated training FLOPs "
             "(`experiments/sentiment/budgets.py`).", ""] + budget_lines(cfg, points)
    lines += ["", f"Short of the others' KL range under the coverage rule (methods compared: {cfg.cover_methods}): "
              + (", ".join(short) or "none") + "."]
    return "\n".join(lines) + "\n"


def rewrite_reports(cfg: SentimentConfig) -> dict:
    """`--report-only`: each study's report rewritten from its points.json (with `seeds`: each seed's,
    then the pooled one); what summary.json holds."""
    out = Path(cfg.output_dir)
    if not cfg.seeds:
        return rewrite_report(out)
    from .seeds import report_seeds

    seeds = [int(x) for x in parse_numbers(cfg.seeds, "seeds")]
    for s in seeds:
        rewrite_report(out / f"seed-{s}")
    return report_seeds(cfg, seeds)


def rewrite_report(out: Path) -> dict:
    """One study's report files again from its points.json, study_config.json and summary.json."""
    missing = [name for name in ("points.json", STUDY_RECORD, "summary.json") if not (out / name).exists()]
    if missing:
        raise UserValueError(f"--report-only: {out} has no {', '.join(missing)} (run the study first)")
    summary = json.loads((out / "summary.json").read_text())
    points = json.loads((out / "points.json").read_text())
    cfg = recorded_config(out)
    summary["comparisons"] = write_report(cfg, out, points, summary["info"], summary["seconds"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def with_length_control(points: list[dict], seed: int) -> list[dict]:
    """The points with their seed and their reward predicted at πSFT's mean length (reward_lc ± s.e.)."""
    sft_length = next(p["length"] for p in points if p["method"] == "sft")
    out = []
    for p in points:
        p = dict(p, seed=seed)
        if p.get("length_fit"):
            p["reward_lc"], p["reward_lc_se"] = predict_at(p["length_fit"], sft_length)
        out.append(p)
    return out


def coverage_note(points: list[dict], reference: str = "dpo") -> str:
    """Say where the mean-frontier comparison stops: past DPO's largest KL only the baseline has points."""
    reach = {m: max(max(p["kl"], 0.0) for p in points if p["method"] == m) for m in {p["method"] for p in points}}
    if reference not in reach:
        return ""
    beyond = [f"{LABELS.get(m, m)} (to {k:.2f})" for m, k in sorted(reach.items()) if m not in (reference, "sft")
              and k > reach[reference]]
    if not beyond:
        return f"\n{LABELS[reference]}'s points reach KL {reach[reference]:.2f}, as far as every baseline's.\n"
    return (f"\n{LABELS[reference]}'s points stop at KL {reach[reference]:.2f}; past it only these have points: "
            f"{', '.join(beyond)}. The comparison above covers the shared range only; the budget table below "
            "shows the rest.\n")


def online_section(cfg: SentimentConfig, points: list[dict], comparisons: dict, info: dict) -> str:
    """Offline DPO vs online DPO at matched KL, and what each cost."""
    c = comparisons.get("online_dpo") or {}
    offline = [p for p in points if p["method"] == "dpo" and p["knob"] == cfg.online_beta]
    online = sorted((p for p in points if p["method"] == "online_dpo"), key=lambda p: p["step"])
    lines = ["", f"## Offline DPO vs online DPO (β {cfg.online_beta:g}, {cfg.online_rounds} rounds, πref: "
             f"{'each round' + chr(39) + 's start' if cfg.online_ref == 'round' else 'πSFT'})", ""]
    if c:
        lines += [f"Over KL 0–{c['kl_range']:.2f}, offline DPO's frontier (every β) averages {c['mean_a']:.3f}, "
                  f"online DPO's {c['mean_b']:.3f}: difference {c['diff']:+.3f} ± {c['diff_se']:.3f} "
                  f"(DPO {c['verdict']} online DPO).", ""]
    lines += ["| run | point | KL | reward | length |", "|---|---|---|---|---|"]
    lines += [f"| offline DPO β {p['knob']:g} | step {p['step']} | {p['kl']:.2f} | {p['reward']:.3f} ± "
              f"{p['reward_se']:.3f} | {p['length']:.1f} |" for p in offline]
    lines += [f"| online DPO β {p['knob']:g} | round {p['step']} | {p['kl']:.2f} | {p['reward']:.3f} ± "
              f"{p['reward_se']:.3f} | {p['length']:.1f} |" for p in online]
    lines += ["", "At matched KL: each round against the best offline DPO point (any β) whose KL is no larger "
              "(above / below / tie at 2 s.e.; a frontier with more points has more chances, which favours "
              "offline DPO's 4 × β):", "",
              "| online round | KL | online reward | best offline DPO within that KL | verdict |", "|---|---|---|---|---|"]
    start = next(p for p in points if p["method"] == "sft")
    all_offline = [p for p in points if p["method"] == "dpo"]
    for p in online:
        best = best_within(all_offline, max(p["kl"], 0.0), start)
        reached = all_offline and max(q["kl"] for q in all_offline) >= p["kl"]
        verdict = f"online {budget_verdict(p, best)}" if reached else \
            f"no verdict: offline DPO never reaches KL {p['kl']:.2f}"
        lines.append(f"| {p['step']} | {p['kl']:.2f} | {p['reward']:.3f} ± {p['reward_se']:.3f} | "
                     f"{best['reward']:.3f} ± {best['reward_se']:.3f} @ {best['kl']:.2f} (β {best['knob']}) | "
                     f"{verdict} |")
    lines += ["", "Cost (labelled samples: completions scored by the ground truth; minutes: wall clock on this "
              "machine; evaluation left out; offline sampling is shared by every offline run; n/a: not recorded):",
              "", "| run | labelled samples | pairs | optimizer steps | sampling + labelling (min) | training (min) |",
              "|---|---|---|---|---|---|"]
    for name, cost in (("offline DPO (one β)", info["offline_cost"]), ("online DPO", info["online_cost"])):
        lines.append(f"| {name} | {cost['labelled_samples']} | {cost['pairs']} | {cost['steps']} | "
                     f"{format_optional(cost['sampling_minutes'], '.1f')} | "
                     f"{format_optional(cost['training_minutes'], '.1f')} |")
    return "\n".join(lines) + "\n"


def summary_header(cfg: SentimentConfig, info: dict, seconds: float) -> str:
    """summary.md's opening: what was run, on what, and how long it took."""
    ground_truth = cfg.reward_model or "VADER compound score of prompt + completion (vaderSentiment)"
    sft, prompts, pairs = info["sft"], info["prompts"], info["pairs"]
    sft_line = f"- πSFT: {relative_to(sft['sft'], cfg.output_dir)}"
    if sft.get("pretrained"):
        sft_line += f", pretrained here ({sft['steps']} steps), held-out perplexity {sft['heldout_perplexity']:.1f}"
    lines = [f"# Controlled sentiment generation — preset `{cfg.preset}`", "",
             "The paper's §6.1 / Fig. 2 (left), reproduced by `directpo experiment sentiment`.", "",
             f"- corpus: {info['corpus']['corpus']} ({info['corpus']['texts']} texts)",
             sft_line,
             f"- ground-truth reward: {ground_truth}",
             f"- prompts: {prompts['train']} train, {prompts['eval']} eval (disjoint), "
             f"{cfg.prompt_min_tokens}–{cfg.prompt_max_tokens}-token prefixes of held-out reviews",
             f"- pairs: {pairs['pairs']} ({cfg.pairs}, margin {cfg.pair_margin}) from "
             f"{cfg.samples_per_prompt} samples per prompt; median within-prompt reward spread "
             f"{pairs['median_spread']:.2f}",
             f"- reward model: held-out pair accuracy {format_optional(info['rm']['heldout_accuracy'])}"
             if info["rm"]["rm"] else "- reward model: not trained (no method here uses it)",
             f"- evaluation: {cfg.eval_samples} samples × {prompts['eval']} eval prompts per point, "
             + (f"exactly {cfg.max_new_tokens} new tokens (--fixed-length: EOS suppressed after πSFT, every policy "
              "and πSFT renormalised without it)" if cfg.fixed_length else f"≤ {cfg.max_new_tokens} new tokens")
             + ", temperature 1; KL(π‖πSFT) from samples of π; Best-of-N KL is the analytic log N − (N−1)/N",
             f"- total time: {seconds / 60:.1f} min", "", "![frontier](frontier.png)", ""]
    return "\n".join(lines)


def format_optional(x, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)
