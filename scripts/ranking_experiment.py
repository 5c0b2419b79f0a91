"""Plackett–Luce ranking DPO vs DPO on best-vs-worst pairs, on a synthetic ranked task (K = 4).

    python scripts/ranking_experiment.py [--steps 60] [--seed 0] [--out runs/ranking]

Hidden reward: every adjective has a hidden weight; a review's reward is the sum (see
`directpo.toy.ranked_review_task`). Both methods train the same tiny model for the same number of
steps on the same prompts; we report Kendall's τ and top-1 accuracy between the implicit reward
β·log π/πref and the true ranking on held-out prompts (all K = 4 responses).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from directpo.data import load_examples, make_collate, tokenize_examples
from directpo.logprobs import dataset_logps
from directpo.metrics import ranking_metrics
from directpo.models import load_model, load_tokenizer
from directpo.toy import build_tiny_model, ranked_review_task, write_jsonl
from directpo.train import TrainConfig, train


def heldout_ranking(model_dir: str, ref_dir: str, data: str, beta: float) -> dict:
    tok = load_tokenizer(model_dir)
    exs = tokenize_examples(load_examples(data), tok, max_length=64)
    collate = make_collate("packed", tok.pad_token_id)
    pol = dataset_logps(load_model(model_dir), exs, collate)
    ref = dataset_logps(load_model(ref_dir), exs, collate)
    m = ranking_metrics(beta * (pol - ref))
    n = len(exs)
    return {k: (v.mean().item(), v.std().item() / n ** 0.5) for k, v in m.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--out", default="runs/ranking")
    ap.add_argument("--only", default=None, help="comma-separated subset of the runs")
    a = ap.parse_args(argv)
    out = Path(a.out)
    tr, ev, _ = ranked_review_task(n_train=a.n_train, n_eval=128, k=4, seed=a.seed)
    train_file, eval_file = write_jsonl(tr, out / "train.jsonl"), write_jsonl(ev, out / "eval.jsonl")
    texts = [r["prompt"] + x for r in tr for x in r["responses"]]
    base = str(build_tiny_model(out / "base", texts, hidden=64, layers=2, heads=4, vocab_size=400, seed=a.seed))
    common = dict(model=base, data=str(train_file), lr=1e-3, optimizer="adamw", beta=0.1, batch_size=32,
                  micro_batch_size=32, max_steps=a.steps, warmup_steps=5, seed=a.seed, overwrite=True, max_length=64,
                  progress=False, ref_cache="off")
    runs = {"plackett_luce": dict(loss="plackett_luce"),
            "dpo_best_worst": dict(loss="dpo", ranking_to_pairs=True, ranking_pairs="best_worst"),
            "dpo_all_pairs": dict(loss="dpo", ranking_to_pairs=True, ranking_pairs="all")}
    if a.only:
        runs = {k: v for k, v in runs.items() if k in a.only.split(",")}
    results = {}
    for name, kw in runs.items():
        run_dir = out / name
        train(TrainConfig(output_dir=str(run_dir), **common, **kw))
        results[name] = heldout_ranking(str(run_dir), base, str(eval_file), 0.1)
    print(json.dumps({"steps": a.steps, "seed": a.seed, "heldout": results}, indent=1))
    return results


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
