"""Stage 8, the report: points.json / points.csv, frontier.png, summary.md (the frontier comparison
of `experiments.frontier` under a header describing the study)."""
from __future__ import annotations

from pathlib import Path

from ..frontier import markdown, plot_frontier, summarize, write_points
from .config import SentimentConfig


def write_report(cfg: SentimentConfig, out: Path, points: list[dict], info: dict, seconds: float) -> dict:
    """Write the report files; returns DPO's comparison with each baseline."""
    comparisons = summarize(points)
    write_points(points, out)
    plot_frontier(points, out / "frontier.png", title=f"controlled sentiment ({cfg.preset}): reward vs KL")
    (out / "summary.md").write_text(markdown(points, comparisons, summary_header(cfg, info, seconds)))
    return comparisons


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
             f"- reward model: held-out pair accuracy {format_optional(info['rm']['heldout_accuracy'])}",
             f"- evaluation: {cfg.eval_samples} samples × {prompts['eval']} eval prompts per point, "
             f"≤ {cfg.max_new_tokens} new tokens, temperature 1; KL(π‖πSFT) from samples of π; Best-of-N KL is "
             "the analytic log N − (N−1)/N",
             f"- total time: {seconds / 60:.1f} min", "", "![frontier](frontier.png)", ""]
    return "\n".join(lines)


def format_optional(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def relative_to(path: str, root: str) -> str:
    """`sft` for OUTPUT/sft: the report does not depend on where the study ran."""
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return path
