"""Plackett–Luce ranking DPO vs DPO on best-vs-worst pairs, on a synthetic ranked task (K = 4).

    python scripts/ranking_experiment.py [--steps 60] [--seed 0] [--out runs/ranking]

Hidden reward: every adjective has a hidden weight; a review's reward is the sum (see
`directpo.toy.ranked_review_task`). Both methods train the same tiny model for the same number of
steps on the same prompts; we report Kendall's τ and top-1 accuracy between the implicit reward
β·log π/πref and the true ranking on held-out prompts (all K = 4 responses). The experiment code
is shared with the tests (directpo/experiments/ranking.py).
"""
from __future__ import annotations

import argparse
import json


from directpo.experiments.ranking import RUNS, ranking_experiment  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--out", default="runs/ranking")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of the runs ({', '.join(RUNS)})")
    a = ap.parse_args(argv)
    results = ranking_experiment(a.out, a.steps, a.seed, a.n_train, a.only.split(",") if a.only else None)
    print(json.dumps({"steps": a.steps, "seed": a.seed, "heldout": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
