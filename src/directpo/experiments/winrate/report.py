"""Stage 8, the report: points.json (one entry per method, N and temperature), winrate.png (the
paper's Fig. 3 layout: win rate against sampling temperature, one line per method, 0.5 dashed; and
mean length), summary.md (what ran, which judge, the tables, side-by-side samples)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..common import relative_to
from .findings import Evidence, findings_markdown, judge_accuracy, judge_below_floor, wins_of
from .paired import paired_markdown, paired_tests

LABELS = {"dpo": "DPO", "preferred_ft": "Preferred-FT (πSFT)", "ppo": "PPO (learned RM)", "best_of_n": "Best-of-N"}
COLORS = {"dpo": "tab:red", "preferred_ft": "tab:orange", "ppo": "tab:blue", "best_of_n": "tab:gray"}
TITLES = {"dialogue": ("Dialogue (Anthropic HH)", "§6.2 / Fig. 3 (left): Anthropic HH, win rate against the chosen "
                                              "response", "dialogue"),
          "summarize": ("Summarization (Reddit TL;DR)", "§6.2 / Fig. 2 (right): TL;DR, win rate against the "
                                                        "chosen (human-preferred) summary", "summarize")}


def series_name(point: dict) -> str:
    return LABELS[point["method"]] + (f" (N={point['knob']})" if point["method"] == "best_of_n" else "")


def interval(point: dict) -> tuple[float, float] | None:
    """The 95 % bootstrap interval of the win rate, else ±1.96 standard errors (older judges), else None."""
    ci = point.get("win_rate_ci")
    if ci and None not in ci:
        return float(ci[0]), float(ci[1])
    p, se = point.get("win_rate"), point.get("win_rate_se")
    if p is None or se is None or math.isnan(se):
        return None
    return max(0.0, p - 1.96 * se), min(1.0, p + 1.96 * se)


def write_report(cfg, out: Path, points: list[dict], info: dict, seconds: float) -> list[dict]:
    """points.json, winrate.png and summary.md; returns the paired per-prompt tests (for summary.json)."""
    write_points(points, out / "points.json")
    plot_winrates(points, out / "winrate.png", f"{TITLES[cfg.TASK][0]} ({cfg.preset}), judge: "
                                               f"{short_judge(cfg)}", info["evaluation"]["reference_length"])
    paired = paired_tests(points, seed=cfg.seed)
    (out / "summary.md").write_text(markdown(cfg, points, info, seconds, paired))
    return paired


def write_points(points: list[dict], path: Path) -> None:
    """One entry a line: the per-prompt outcomes (hundreds of numbers each) stay on their entry's line."""
    path.write_text("[\n" + ",\n".join(json.dumps(p) for p in points) + "\n]\n")


def short_judge(cfg) -> str:
    return cfg.judge_model if cfg.judge_url else cfg.judge_classifier or "local reward model (not GPT-4)"


def plot_winrates(points: list[dict], path: Path, title: str, reference_length: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, lax) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for name in dict.fromkeys(series_name(p) for p in points):
        series = sorted((p for p in points if series_name(p) == name), key=lambda p: p["temperature"])
        xs = [p["temperature"] for p in series]
        ys = [math.nan if p.get("win_rate") is None else p["win_rate"] for p in series]
        bounds = [interval(p) or (y, y) for p, y in zip(series, ys)]
        err = [[max(0.0, y - lo) for y, (lo, _) in zip(ys, bounds)], [max(0.0, hi - y) for y, (_, hi) in zip(ys, bounds)]]
        style = dict(marker="o", capsize=3, color=COLORS[series[0]["method"]], label=name,
                     ls=":" if series[0]["method"] == "best_of_n" and name != last_bon(points) else "-")
        ax.errorbar(xs, ys, yerr=err, **style)
        lax.plot(xs, [p.get("length_mean") or math.nan for p in series], marker="o", color=style["color"],
                 ls=style["ls"], label=name)
    ax.axhline(0.5, color="grey", lw=1, ls="--")
    ax.set(xlabel="sampling temperature", ylabel="win rate vs reference", ylim=(0, 1), title=title)
    lax.axhline(reference_length, color="black", lw=1, ls="--", label="reference")
    lax.set(xlabel="sampling temperature", ylabel="mean length (tokens)", title="length")
    for a in (ax, lax):
        a.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def last_bon(points: list[dict]) -> str | None:
    """The Best-of-N series with the largest N (drawn solid; smaller N dotted)."""
    ns = [p["knob"] for p in points if p["method"] == "best_of_n"]
    return series_name({"method": "best_of_n", "knob": max(ns)}) if ns else None


def cell(point: dict | None, key: str = "win_rate", ci_key: str | None = "win_rate_ci") -> str:
    if point is None or point.get(key) is None:
        return "–"
    text = f"{point[key]:.2f}"
    if ci_key == "win_rate_ci":
        bounds = interval(point)
        return text + (f" [{bounds[0]:.2f}, {bounds[1]:.2f}]" if bounds else "")
    ci = point.get(ci_key) if ci_key else None
    return text + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and None not in ci else "")


def table(points: list[dict], temps: list[float], key: str, ci_key: str | None, kls: dict | None = None) -> list[str]:
    names = list(dict.fromkeys(series_name(p) for p in points))
    head = "| method | " + " | ".join(f"T={t:g}" for t in temps) + (" | KL(π‖πSFT) nats |" if kls else " |")
    lines = [head, "|" + " --- |" * (len(temps) + 1 + bool(kls))]
    for name in names:
        by_t = {p["temperature"]: p for p in points if series_name(p) == name}
        row = f"| {name} | " + " | ".join(cell(by_t.get(t), key, ci_key) for t in temps)
        if kls:
            method = next(iter(by_t.values()))["method"]
            kl = kls.get(method)
            row += f" | {'–' if kl is None else f'{kl:.2f}'}"
        lines.append(row + " |")
    return lines


def markdown(cfg, points: list[dict], info: dict, seconds: float, paired: list[dict]) -> str:
    temps = cfg.temperature_list()
    lines = header(cfg, info, seconds)
    lines += ["## Win rate against the reference (95 % bootstrap interval over prompts)", "",
              *table(points, temps, "win_rate", "win_rate_ci", info["evaluation"]["kl"]), ""]
    if any(p.get("win_rate_lc") is not None for p in points):
        lines += ["## Length-controlled win rate (predicted win rate at equal length)", "",
                  *table(points, temps, "win_rate_lc", "win_rate_lc_ci"), ""]
    if any(p.get("judge_consistency") is not None for p in points):
        lines += ["## Judge consistency (both orders agree)", "", *table(points, temps, "judge_consistency", None), ""]
    if paired:
        lines += paired_markdown(paired, LABELS)
    lines += findings_markdown(points, info, cfg, Evidence(wins_of(points), paired))  # the table's own tests
    lines += ["## Mean length (tokens)", "", f"Reference: {info['evaluation']['reference_length']:.1f} tokens.", "",
              *table(points, temps, "length_mean", None), ""]
    lines += samples_section(info["evaluation"]["samples"])
    return "\n".join(lines) + "\n"


def header(cfg, info: dict, seconds: float) -> list[str]:
    title, paper, command = TITLES[cfg.TASK]
    data, base, sft, rm, dpo = info["data"], info["base"], info["sft"], info["rm"], info["dpo"]
    lines = [f"# {title} — preset `{cfg.preset}`", "",
             f"The paper's {paper}; reproduced by `directpo experiment {command}`.", ""]
    if data["synthetic"]:
        lines += ["**SYNTHETIC DATA**: the comparisons were generated by the recipe (TL;DR format, smoke test). "
                  "Nothing here is a result about summarization.", ""]
    base_line = f"- base model: {relative_to(base['base'], cfg.output_dir)}"
    if base.get("pretrained_here"):
        base_line += f", a small Llama pretrained here ({base['steps']} steps on {base['texts']} texts)"
    ppo = info.get("ppo")
    lines += [f"- data: {data['source']} ({data['rows_read']} rows read, {data['skipped']} skipped"
              + prompt_kind(cfg, data) + f"); eval prompts from {data['eval_source']}",
              f"- training: {data['train_pairs']} pairs over {data['train_prompts']} prompts" + judge_split_text(data)
              + f"; evaluation: {data['eval_prompts']} held-out prompts, disjoint from every training prompt",
              base_line,
              f"- Preferred-FT (πSFT): {sft['steps']} steps on the chosen responses",
              f"- DPO: β {cfg.beta:g}, {dpo['steps']} steps from πSFT (πref = πSFT)",
              f"- reward model of Best-of-N and PPO (`rm/`): {rm['steps']} steps on the policies' training pairs "
              f"from πSFT; agrees with the human label on {format_rate(rm['heldout_accuracy'])} of the held-out pairs",
              judge_model_line(info),
              f"- PPO: {ppo['steps']} steps, KL coefficient {cfg.ppo_kl_coef:g}" if ppo else
              "- PPO: not run (no budget in this preset: --ppo-steps 0)",
              f"- Best-of-N: N ∈ {{{', '.join(map(str, cfg.bon_list()))}}} samples of πSFT, the best by the reward "
              "model (temperatures above 0)" if cfg.bon_list() else "- Best-of-N: not run",
              f"- **judge: {info['evaluation']['judge']}**",
              judge_floor_line(cfg, info),
              f"- sampling: one completion per prompt and temperature, ≤ {cfg.max_new_tokens} new tokens",
              f"- total time: {seconds / 60:.1f} min", "", "![win rate vs temperature](winrate.png)", ""]
    return lines


def prompt_kind(cfg, data: dict) -> str:
    if data["single_turn"]:
        return ", single-turn prompts only"
    return ", multi-turn prompts included: a prompt is the conversation up to its last Assistant turn" \
        if cfg.TASK == "dialogue" else ""


def judge_split_text(data: dict) -> str:
    if not data.get("judge_pairs"):
        return ""
    return (f"; the judge's own: {data['judge_pairs']} pairs over {data['judge_prompts']} other prompts (a split of "
            f"the training prompts seeded {data['judge_split_seed']})")


def judge_model_line(info: dict) -> str:
    judge = info.get("judge")
    if not judge:
        return "- judge's reward model: none of its own (the judge is named below)"
    return (f"- judge's reward model (`judge/`): {judge['steps']} steps on its {judge['pairs']} pairs from the "
            f"{'base LM' if judge['init'] == 'base' else 'πSFT'}; agrees with the human label on "
            f"{format_rate(judge['heldout_accuracy'])} of the held-out pairs")


def judge_floor_line(cfg, info: dict) -> str:
    """The judge's held-out accuracy against the floor, in one line (loud when below it)."""
    accuracy = judge_accuracy(info, cfg)
    if accuracy is None:
        return "- judge's held-out accuracy: not measured here (an external judge)"
    text = f"- judge's held-out pair accuracy: {format_rate(accuracy)} (floor {format_rate(cfg.judge_floor)})"
    if judge_below_floor(info, cfg):
        text += " — **BELOW THE FLOOR: these win rates are reported only because of --force; they do not test the " \
                "paper's claims**"
    return text


def format_rate(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def samples_section(samples: list[dict]) -> list[str]:
    if not samples:
        return []
    lines = ["## Samples (first held-out prompts; lowest temperature)", ""]
    for k, s in enumerate(samples, 1):
        lines += [f"### Prompt {k}", "", quote(s["prompt"]), "", f"**Reference:** {inline(s['reference'])}", ""]
        for method, answer in s["answers"].items():
            label = answer.get("label") or LABELS[method]
            lines += [f"**{label}** (T={answer['temperature']:g}): {inline(answer['completion'])}", ""]
    return lines


def text_of(value) -> str:
    return value if isinstance(value, str) else "\n".join(f"{m.get('role')}: {m.get('content')}" for m in value)


def quote(value) -> str:
    return "\n".join("> " + line for line in text_of(value).strip().splitlines())


def inline(value) -> str:
    text = " ".join(text_of(value).split())
    return text if len(text) <= 600 else text[:597] + "..."
