"""`directpo experiment sentiment`: the paper's controlled-sentiment study (§6.1, Fig. 2 left).

x is the first 2–8 tokens of a movie review, and the policy must continue it with positive
sentiment; a sentiment scorer is the ground-truth reward. Every method starts from the same πSFT
and is measured by the reward it reaches against its KL(π‖πSFT). The stages, each through the
library's own commands/APIs and each resumable (a killed study continues where it stopped):

  1 corpus      review text -> pretraining set, held-out LM set, two disjoint prompt pools
  2 sft         πSFT: a given model, or a small Llama pretrained here on the corpus (`train`, loss sft)
  3 prompts     2–8-token prefixes of held-out reviews: train prompts, disjoint eval prompts
  4 pairs       N samples per train prompt from πSFT, labelled by the scorer (best vs worst)
  5 rm          a Bradley–Terry reward model on the pairs (`directpo rm`)
  6 baselines   πSFT itself, and Best-of-N of πSFT picked by the RM (KL = log N − (N−1)/N)
  7 runs        DPO over β; Unlikelihood; Preferred-FT (`train`); PPO with the RM and PPO-GT with the
                scorer over KL coefficients (`ppo`); each saves several checkpoints, each evaluated on
                the eval prompts (`directpo eval`: ground-truth reward, KL from samples of π, length);
                opt-in (`--methods ...,online_dpo`): online DPO rounds (`directpo online`), a point each;
                then the coverage rule: a method whose runs fall short of the KL the others reach
                trains its furthest run on (PPO-type: to a plateau or DPO's FLOPs; `coverage`, `budgets`)
  8 report      points.json / points.csv, frontier.png, summary.md (hull gaps, crossings, budgets)

Modules: `config` (settings, presets), `corpus` (reading and cleaning reviews), `resume` (the
resumable-step helper), `stages` (1–5), `runs`, `evaluation` and `coverage` (6–7), `report` (8).

Presets: `smoke` (every stage on a tiny model, CI), `cpu-small` (~1 h or more on 2 CPU cores),
`paper` (gpt2-large fine-tuned on IMDb, the siebert classifier, on a GPU). Any preset value can be
overridden by its flag.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ...console import log
from ..common import STUDY_RECORD, StudyClock, study_dir
from .config import PRESETS, SentimentConfig, preset_defaults, sentiment_config
from .budgets import settings_counts
from .coverage import cover_kl_range
from .evaluation import eval_best_of_n, eval_point, eval_run
from .online_runs import offline_cost, run_online_dpo
from .runs import Run, plan_runs, run_method
from .stages import ground_truth, stage_corpus, stage_pairs, stage_prompts, stage_rm, stage_sft

__all__ = ["PRESETS", "Run", "SentimentConfig", "preset_defaults", "run_sentiment", "sentiment_config"]

N_STAGES = 8


def run_sentiment(cfg: SentimentConfig) -> dict:
    """Run (or continue) the whole study in cfg.output_dir, once per seed with `seeds`; returns what
    summary.json holds."""
    cfg.validate()
    if cfg.report_only:
        from .report import rewrite_reports

        return rewrite_reports(cfg)
    if cfg.seeds:
        from .seeds import run_seeds

        return run_seeds(cfg, run_one_seed)
    return run_one_seed(cfg)


def run_one_seed(cfg: SentimentConfig) -> dict:
    with study_dir(cfg, "experiment sentiment") as out:
        return _run_one_seed(cfg, out)


def _run_one_seed(cfg: SentimentConfig, out: Path) -> dict:
    from .report import write_report

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    (out / STUDY_RECORD).write_text(json.dumps(asdict(cfg), indent=1))
    clock = StudyClock("sentiment", N_STAGES, out / "study_time.json")
    scorer = ground_truth(cfg)
    runs = plan_runs(cfg)
    counts = settings_counts(cfg)
    if len(set(counts.values())) > 1:  # the rule is the same number for every method; said, not enforced
        log("sentiment: warning: unequal numbers of strength settings ("
            + ", ".join(f"{m} {n}" for m, n in counts.items()) + "): the frontier of a method with more is favoured")

    info: dict = {}
    info["corpus"] = clock.step(1, "corpus", stage_corpus, cfg, out)
    info["sft"] = clock.step(2, "πSFT", stage_sft, cfg, out)
    sft = info["sft"]["sft"]
    info["prompts"] = clock.step(3, "prompts", stage_prompts, cfg, out, sft)
    info["pairs"] = clock.step(4, "preference pairs", stage_pairs, cfg, out, sft, scorer)
    # Only Best-of-N and PPO use the learned reward model.
    info["rm"] = (clock.step(5, "reward model", stage_rm, cfg, out, sft)
                  if cfg.runs_method("best_of_n") or cfg.runs_method("ppo") else {"rm": None, "heldout_accuracy": None})

    (out / "evals").mkdir(exist_ok=True)
    points = [clock.step(6, "evaluate πSFT", eval_point, cfg, out, sft, scorer, "sft", None, 0, sft)]
    if cfg.runs_method("best_of_n"):
        points += clock.step(6, "Best-of-N", eval_best_of_n, cfg, out, sft, scorer)
    # Each run is evaluated as soon as it is trained: its points are on disk before the next starts.
    for k, run in enumerate(runs, 1):
        clock.step(7, f"run {k}/{len(runs)} {run.name}: train", run_method, cfg, out, sft, run, scorer)
        points += clock.step(7, f"run {k}/{len(runs)} {run.name}: evaluate", eval_run, cfg, out, sft, run, scorer)
    if cfg.dpo_cover:  # only where a method's runs fall short of the KL the others reach
        points += clock.step(7, "every method over the others' KL range", cover_kl_range, cfg, out, sft, scorer, runs,
                             points)
    if cfg.runs_method("online_dpo"):
        online_points, info["online_cost"] = clock.step(7, "online DPO", run_online_dpo, cfg, out, sft, scorer)
        points += online_points
        info["offline_cost"] = offline_cost(cfg, out)

    log(f"sentiment: stage 8/{N_STAGES}: report")
    comparisons = write_report(cfg, out, points, info, clock.elapsed())
    result = {"output_dir": str(out), "points": len(points), "comparisons": comparisons, "info": info,
              "timings_s": clock.timings, "seconds": clock.elapsed()}
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    for method, c in comparisons.items():
        log(f"sentiment: DPO vs {method}: {c['diff']:+.3f} ± {c['diff_se']:.3f} over KL 0–{c['kl_range']:.2f} "
            f"-> DPO {c['verdict']} {method}")
    log(f"sentiment: done in {clock.elapsed():.0f} s -> {out / 'summary.md'}")
    return result
