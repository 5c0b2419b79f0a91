"""Stages 6–7's evaluation: the points of the reward–KL plot. A point is one policy evaluated on the
eval prompts (ground-truth reward, KL(π‖πSFT) from samples of π, length), recorded as
OUT/evals/METHOD_KNOB_STEP.json as soon as it is measured, so a resumed study measures it once."""
from __future__ import annotations

import shutil
import statistics
from pathlib import Path

from .config import SentimentConfig, parse_numbers
from ..resume import resumable
from .runs import Run, checkpoints_of, export_checkpoint


def point_record(out: Path, method: str, knob, step: int) -> Path:
    return out / "evals" / f"{method}_{knob}_{step}.json"


def eval_point(cfg: SentimentConfig, out: Path, sft: str, scorer, method: str, knob, step: int,
               model_dir: str) -> dict:
    """The point of the policy in `model_dir` (step `step` of `method` at `knob`)."""
    return resumable(point_record(out, method, knob, step),
                     lambda: measure_point(cfg, out, sft, scorer, method, knob, step, model_dir))


def measure_point(cfg: SentimentConfig, out: Path, sft: str, scorer, method: str, knob, step: int,
                  model_dir: str) -> dict:
    from ...eval.evaluate import evaluate_policy
    from ..frontier import length_fit
    from .stages import read_jsonl

    record = point_record(out, method, knob, step)
    report = record.with_name(record.name + ".tmp")  # evaluate's own report and samples: not kept
    samples = record.with_name(record.name + ".samples.tmp")
    result = evaluate_policy(model_dir, str(out / "prompts" / "eval.jsonl"), str(report), ref=sft, reward=scorer,
                             n=cfg.eval_samples, temperatures=[1.0], max_new_tokens=cfg.max_new_tokens,
                             seed=cfg.seed + 4, batch_size=cfg.eval_batch, device=cfg.device, precision=cfg.precision,
                             samples_out=str(samples), progress=False, fixed_length=cfg.fixed_length)
    rows = read_jsonl(samples)
    report.unlink()
    samples.unlink()
    # The per-sample fit of reward on length: the report predicts each point's reward at πSFT's length.
    fit = length_fit([r["reward"] for r in rows], [r["completion_tokens"] for r in rows])
    return {"method": method, "knob": knob, "step": step, "kl": result["kl_mean"], "kl_se": result["kl_se"],
            "reward": result["reward_mean"], "reward_se": result["reward_se"], "length": result["length_mean"],
            "length_fit": fit, "prompt_rewards": prompt_means([r["prompt_index"] for r in rows],
                                                              [r["reward"] for r in rows])}


def prompt_means(prompt_index: list[int], values: list[float]) -> list[float]:
    """The mean of `values` per prompt, in prompt order: what the report's prompt bootstrap resamples
    (a prompt's samples are correlated; every method shares the eval prompts)."""
    sums: dict[int, list[float]] = {}
    for i, v in zip(prompt_index, values):
        sums.setdefault(i, []).append(v)
    return [statistics.fmean(sums[i]) for i in sorted(sums)]


def eval_run(cfg: SentimentConfig, out: Path, sft: str, run: Run, scorer) -> list[dict]:
    """The points of a trained run: its saved checkpoints along the way and its final model."""
    points = []
    for step, weights in checkpoints_of(out / "runs" / run.name, run, cfg):
        if point_record(out, run.method, run.knob, step).exists():  # measured before: no export needed
            points.append(eval_point(cfg, out, sft, scorer, run.method, run.knob, step, str(weights)))
            continue
        export = None
        if (weights / "model.safetensors").exists() and not (weights / "config.json").exists():
            export = export_checkpoint(weights, sft, out / "evals" / f".export-{run.name}-{step}")
            weights = export
        try:
            points.append(eval_point(cfg, out, sft, scorer, run.method, run.knob, step, str(weights)))
        finally:
            if export is not None:
                shutil.rmtree(export, ignore_errors=True)
    return points


def eval_best_of_n(cfg: SentimentConfig, out: Path, sft: str, scorer) -> list[dict]:
    """Best-of-N of πSFT picked by the learned RM: one set of max(N) samples, its first N per prompt."""
    return resumable(out / "evals" / "best_of_n.json", lambda: measure_best_of_n(cfg, out, sft, scorer))


def measure_best_of_n(cfg: SentimentConfig, out: Path, sft: str, scorer) -> list[dict]:
    from ...data.prompts import load_prompts
    from ...eval.bon import bon_kl
    from ...eval.evaluate import mean_se
    from ...eval.reward_model import RewardModel
    from ...eval.sample import draw_samples
    from ...models import load_model, load_tokenizer, pick_device, suppress_eos
    from ..frontier import length_fit

    ns = [int(x) for x in parse_numbers(cfg.bon_ns, "bon_ns")]
    samples_per_prompt = max(ns)
    items = load_prompts(str(out / "prompts" / "eval.jsonl"))
    tok = load_tokenizer(sft)
    model = load_model(sft, pick_device(cfg.device))
    suppress_eos(model, tok, cfg.fixed_length)  # (Best-of-N over π''s samples: its KL is the same formula)
    samples = draw_samples(model, tok, items, samples_per_prompt,
                           cfg.max_new_tokens, 1.0, 1.0, cfg.seed + 5, cfg.eval_batch,
                           progress="sampling for Best-of-N" if cfg.progress else None)
    rm = RewardModel(str(out / "rm"), device=cfg.device, batch_size=cfg.eval_batch, precision=cfg.precision)
    rm_scores, true_rewards = rm(samples.prompts, samples.texts), scorer(samples.prompts, samples.texts)
    lengths = samples.lengths(tok.eos_token_id)
    points = []
    for n in ns:
        picks = [max(range(i * samples_per_prompt, i * samples_per_prompt + n), key=lambda k: rm_scores[k])
                 for i in range(len(items))]
        reward, reward_se = mean_se([true_rewards[k] for k in picks])
        points.append({"method": "best_of_n", "knob": n, "step": 0, "kl": bon_kl(n), "kl_se": 0.0, "reward": reward,
                       "reward_se": reward_se, "length": statistics.fmean(lengths[k] for k in picks),
                       "prompt_rewards": [true_rewards[k] for k in picks],
                       "length_fit": length_fit([true_rewards[k] for k in picks], [lengths[k] for k in picks])})
    return points
