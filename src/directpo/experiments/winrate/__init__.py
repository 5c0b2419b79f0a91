"""`directpo experiment dialogue` and `directpo experiment summarize`: the paper's win-rate studies
(§6.2: single-turn dialogue on Anthropic HH, Fig. 3 left; summarization on Reddit TL;DR, Fig. 2
right), one recipe for both tasks.

Every method is measured by its win rate against the held-out prompts' reference (the dataset's
chosen response; for TL;DR the chosen, human-preferred summary) at each sampling temperature. The
stages, each through the library's own APIs and each resumable (a killed study continues where it
stopped, and redoes nothing that finished):

  1 data        preference pairs for training; held-out prompts (with their reference) disjoint from
                every training prompt; the training prompts split (seeded, --judge-fraction) between
                the judge and the policies; dialogue: `--single-turn` keeps prompts with one Human turn
                (without it a prompt is the conversation up to its last Assistant turn)
  2 base        --base-model, or a small Llama pretrained here on the training text (`train`, loss sft)
  3 sft         Preferred-FT = πSFT: SFT on the chosen responses (`train`, loss sft)
  4 rm          a Bradley–Terry reward model on the policies' pairs (`directpo rm`): Best-of-N's picker
                and PPO's reward (part of those methods, as in the paper)
  5 judge       the default judge: a Bradley–Terry reward model of its own, on the judge's pairs only
                (prompts no policy trains on and no eval prompt), from the base LM
  6 dpo         DPO from πSFT against πSFT (`train`)
  7 ppo         PPO from πSFT with the reward model of stage 4 (`directpo ppo`), where the preset budgets it
  8 evaluate    each policy at each temperature (`directpo eval`: one sample per prompt, judged against
                the reference; KL to πSFT), and Best-of-N of πSFT picked by the reward model; every
                prompt's outcome kept (win 1, tie ½, loss 0)
  9 report      points.json, winrate.png (win rate vs temperature, 95 % bootstrap intervals; length),
                summary.md (tables, paired per-prompt tests between methods, the judge, the paper's
                findings with a verdict each, side-by-side samples), summary.json

`--seeds 0,1,2`: the whole study once per seed into OUT/seed-S and a pooled report in OUT (`seeds`):
win rates with t-intervals over seeds, the paired differences pooled over seeds, the findings from them.

The judge: `--judge-url URL --judge-model NAME` (an OpenAI-compatible endpoint, key from
DIRECTPO_JUDGE_API_KEY; the paper used GPT-4), `--judge-classifier NAME`, or by default the reward
model of stage 5 (`--judge-fraction 0`: the reward model of stage 4, which Best-of-N and PPO
optimise). The report names the judge and both reward models' held-out accuracies; a local reward
model is not GPT-4, and a judge measured below `--judge-floor` is refused unless `--force`.

Presets (any value can be overridden by its flag):
  dialogue  smoke      every stage on a tiny model, on the HH pairs shipped in ../shared (CI)
            cpu-small  2 CPU cores (≈ 60–75 min a seed, estimated), offline: the HH harmless-base test
                       pairs, multi-turn prompts included (512 held-out prompts; the other rows split
                       by prompt: 899 pairs for the judge, 901 for the policies), a 4-layer Llama
                       pretrained here on the file's other transcripts; PPO 20 steps
            paper      Pythia-2.8B on Anthropic/hh-rlhf (single-turn), β 0.1, RMSprop lr 1e-6, batch 64,
                       150 warm-up steps, Best-of-128, PPO; needs the network and a GPU
  summarize smoke      every stage on a tiny model, on SYNTHETIC comparisons in the TL;DR format
            paper      GPT-J-6B on openai/summarize_from_feedback (comparisons), β 0.5; network + GPU

On a GPU machine (the costs are estimates from the model sizes, not measurements; README, "Dialogue
and summarization"):

  directpo experiment dialogue --preset paper --output-dir runs/hh \
      --judge-url https://api.openai.com/v1 --judge-model gpt-4      # ≈ 8–14 h on one 80 GB H100
  directpo experiment summarize --preset paper --output-dir runs/tldr \
      --judge-url https://api.openai.com/v1 --judge-model gpt-4      # ≈ 10–18 h on one H200

Modules: `config` (settings, presets), `data` (stage 1), `synthetic` (the smoke preset's TL;DR-format
rows), `stages` (2–7), `evaluation` (8), `report` (9), `paired` (the paired per-prompt tests),
`findings` (the judge floor, the paper's findings), `seeds` (--seeds).
"""
from __future__ import annotations

import json
from dataclasses import asdict, fields, replace
from pathlib import Path

from ...console import log
from ..common import STUDY_RECORD, StudyClock, study_dir
from .config import DialogueConfig, SummarizeConfig, WinrateConfig, preset_defaults, winrate_config
from .data import stage_data
from .findings import check_judge_floor
from .evaluation import (eval_best_of_n, eval_policy, judge_label, make_judge, reference_length,
                         side_by_side)
from .stages import stage_base, stage_dpo, stage_judge, stage_ppo, stage_rm, stage_sft

__all__ = ["DialogueConfig", "SummarizeConfig", "WinrateConfig", "preset_defaults", "run_winrate",
           "winrate_config"]

N_STAGES = 9


class LazyJudge:
    """The judge, built on its first comparison: a resumed study whose evaluations are all recorded
    loads no judge model."""

    def __init__(self, build):
        self._build, self._judge = build, None

    def judge(self, *args, **kwargs):
        if self._judge is None:
            self._judge = self._build()
        return self._judge.judge(*args, **kwargs)


def train_models(cfg: WinrateConfig, out: Path, clock: StudyClock) -> dict:
    """Stages 1–7: the data and every trained model."""
    info: dict = {"data": clock.step(1, "data", stage_data, cfg, out)}
    n_train = info["data"]["train_pairs"]
    info["base"] = clock.step(2, "base model", stage_base, cfg, out)
    info["sft"] = clock.step(3, "Preferred-FT (πSFT)", stage_sft, cfg, out, info["base"]["base"], n_train)
    sft = info["sft"]["sft"]
    info["rm"] = clock.step(4, "reward model", stage_rm, cfg, out, sft, n_train)
    if info["data"].get("judge_pairs"):  # (a study begun before the judge had its own split has none)
        info["judge"] = clock.step(5, "judge", stage_judge, cfg, out, info["base"]["base"], sft,
                                   info["data"]["judge_pairs"])
    check_judge_floor(info, cfg)  # a judge that cannot tell is refused before DPO and PPO are trained
    info["dpo"] = clock.step(6, "DPO", stage_dpo, cfg, out, sft, n_train)
    if cfg.ppo_steps:
        info["ppo"] = clock.step(7, "PPO", stage_ppo, cfg, out, sft, info["rm"]["rm"])
    return info


def evaluate(cfg: WinrateConfig, out: Path, info: dict, clock: StudyClock) -> tuple[list[dict], dict]:
    """Stage 8: every method's entries (one per temperature, and N for Best-of-N), and what the
    report needs besides (KLs, the judge, reference length, samples)."""
    check_judge_floor(info, cfg)  # before any sample is judged
    (out / "evals").mkdir(exist_ok=True)
    sft, rm = info["sft"]["sft"], info["rm"]["rm"]
    judge_rm = info["judge"]["judge"] if "judge" in info else rm
    judge = LazyJudge(lambda: make_judge(cfg, judge_rm))
    policies = {"preferred_ft": sft, "dpo": info["dpo"]["dpo"]}
    if "ppo" in info:
        policies["ppo"] = info["ppo"]["ppo"]
    points, kls = [], {}
    for method, model_dir in policies.items():
        result = clock.step(8, f"evaluate {method}", eval_policy, cfg, out, method, model_dir, sft, judge)
        points += result["entries"]
        kls[method] = result["kl"]
    points += clock.step(8, "evaluate Best-of-N", eval_best_of_n, cfg, out, sft, rm, judge)
    methods = list(policies) + (["best_of_n"] if cfg.bon_list() else [])
    kinds = sorted({p["judge_kind"] for p in points if p.get("judge_kind")})
    evaluation = {"judge": judge_label(cfg, own="judge" in info), "judge_kind": kinds, "kl": kls,
                  "reference_length": reference_length(out, sft), "samples": side_by_side(cfg, out, methods)}
    return points, evaluation


def run_winrate(cfg: WinrateConfig) -> dict:
    """Run (or continue) the study in cfg.output_dir; returns what summary.json holds."""
    cfg.validate()
    if cfg.seeds:
        from .seeds import report_seeds, run_seeds, seed_config, seed_list

        if cfg.report_only:
            for s in seed_list(cfg):
                rewrite_report(seed_config(cfg, s))
            return report_seeds(cfg, seed_list(cfg))
        return run_seeds(cfg, run_winrate)
    if cfg.report_only:
        return rewrite_report(cfg)
    with study_dir(cfg, f"experiment {cfg.TASK}") as out:
        return _run_winrate(cfg, out)


def rewrite_report(cfg: WinrateConfig) -> dict:
    """`--report-only`: summary.md and winrate.png again from points.json and summary.json (the
    settings given now, e.g. --judge-floor/--force, apply; the study's own are in study_config.json)."""
    from ...errors import UserValueError
    from .report import write_report

    out = Path(cfg.output_dir)
    missing = [f for f in ("points.json", "summary.json") if not (out / f).exists()]
    if missing:
        raise UserValueError(f"--report-only: {out} has no {', '.join(missing)} (run the study first)")
    summary = json.loads((out / "summary.json").read_text())
    if (out / STUDY_RECORD).exists():  # the study's settings; the floor and --force as given now
        known = {f.name for f in fields(cfg)}
        recorded = {k: v for k, v in json.loads((out / STUDY_RECORD).read_text()).items() if k in known}
        cfg = replace(type(cfg)(**recorded), judge_floor=cfg.judge_floor, force=cfg.force)
    check_judge_floor(summary["info"], cfg)
    summary["paired"] = write_report(cfg, out, json.loads((out / "points.json").read_text()), summary["info"],
                                     summary["seconds"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return {"win_rates": {}, **summary, "output_dir": str(out), "task": cfg.TASK, "preset": cfg.preset}


def _run_winrate(cfg: WinrateConfig, out: Path) -> dict:
    from .report import write_report

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    (out / STUDY_RECORD).write_text(json.dumps({"task": cfg.TASK, **asdict(cfg)}, indent=1))
    clock = StudyClock(cfg.TASK, N_STAGES, out / "study_time.json")
    info = train_models(cfg, out, clock)
    points, info["evaluation"] = evaluate(cfg, out, info, clock)
    log(f"{cfg.TASK}: stage 9/{N_STAGES}: report")
    paired = write_report(cfg, out, points, info, clock.elapsed())
    headline = {f"{p['method']}{'' if p['knob'] is None else '_' + str(p['knob'])}@{p['temperature']:g}":
                p.get("win_rate") for p in points}
    result = {"output_dir": str(out), "task": cfg.TASK, "preset": cfg.preset, "win_rates": headline,
              "points": len(points), "info": info, "paired": paired, "timings_s": clock.timings,
              "seconds": clock.elapsed()}
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    log(f"{cfg.TASK}: done in {clock.elapsed():.0f} s -> {out / 'summary.md'}")
    return result
