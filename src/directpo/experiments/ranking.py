"""Plackett–Luce ranking DPO vs DPO on best-vs-worst pairs, on the synthetic ranked task (K = 4), for
`directpo`'s tests and `scripts/ranking_experiment.py` (the same comparison from the command line).

Hidden reward: every adjective has a hidden weight; a review's reward is the sum (see
`directpo.toy.ranked_review_task`). Every method trains the same tiny model for the same number of
steps on the same prompts; the result is Kendall's τ and top-1 accuracy between the implicit reward
β·log π/πref and the true ranking on held-out prompts (all K = 4 responses), as (mean, s.e.).
"""
from __future__ import annotations

from pathlib import Path

from directpo.data import load_examples, make_collate, tokenize_examples
from directpo.logprobs import dataset_logps
from directpo.metrics import ranking_metrics
from directpo.models import load_model, load_tokenizer
from directpo.toy import build_tiny_model, ranked_review_task, write_jsonl
from directpo.training import TrainConfig, train

RUNS = {"plackett_luce": dict(loss="plackett_luce"),
        "dpo_best_worst": dict(loss="dpo", ranking_to_pairs=True, ranking_pairs="best_worst"),
        "dpo_all_pairs": dict(loss="dpo", ranking_to_pairs=True, ranking_pairs="all")}


def heldout_ranking(model_dir: str, ref_dir: str, data: str, beta: float) -> dict[str, tuple[float, float]]:
    """{metric: (mean, standard error)} of the implicit reward's ranking of every held-out row."""
    tok = load_tokenizer(model_dir)
    exs = tokenize_examples(load_examples(data), tok, max_length=64)
    collate = make_collate("packed", tok.pad_token_id)
    pol = dataset_logps(load_model(model_dir), exs, collate)
    ref = dataset_logps(load_model(ref_dir), exs, collate)
    m = ranking_metrics(beta * (pol - ref))
    n = len(exs)
    return {k: (v.mean().item(), v.std().item() / n ** 0.5) for k, v in m.items()}


def ranking_experiment(out: str | Path, steps: int = 60, seed: int = 0, n_train: int = 256,
                       only: list[str] | None = None, beta: float = 0.1) -> dict[str, dict]:
    """Train each run of `RUNS` (or the `only` subset) from one tiny base model; held-out rankings."""
    out = Path(out)
    tr, ev, _ = ranked_review_task(n_train=n_train, n_eval=128, k=4, seed=seed)
    train_file, eval_file = write_jsonl(tr, out / "train.jsonl"), write_jsonl(ev, out / "eval.jsonl")
    texts = [r["prompt"] + x for r in tr for x in r["responses"]]
    base = str(build_tiny_model(out / "base", texts, hidden=64, layers=2, heads=4, vocab_size=400, seed=seed))
    common = dict(model=base, data=str(train_file), lr=1e-3, optimizer="adamw", beta=beta, batch_size=32,
                  micro_batch_size=32, max_steps=steps, warmup_steps=5, seed=seed, overwrite=True, max_length=64,
                  progress=False, ref_cache="off")
    results = {}
    for name, kw in RUNS.items():
        if only is not None and name not in only:
            continue
        run_dir = out / name
        train(TrainConfig(output_dir=str(run_dir), **common, **kw))
        results[name] = heldout_ranking(str(run_dir), base, str(eval_file), beta)
    return results
