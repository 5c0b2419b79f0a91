"""DPO vs PPO vs Best-of-N on one tiny task: reward and KL to the reference (the paper's Fig. 2 left,
in miniature).

    python scripts/rlhf_comparison.py [--out runs/rlhf_comparison] [--seed 0]

Task: `directpo.toy.review_task` (film reviews; the chosen one has more praise than criticism).
Ground-truth reward: `directpo.eval.scorers:review_sentiment` = #positive − #negative words.
1. base: a tiny random Llama; SFT on both chosen and rejected reviews -> πref (mixed reviews, mean
   reward ≈ 0).
2. A Bradley–Terry reward model on the same pairs (`directpo rm`), from πref.
3. For each β: DPO from πref on the preference pairs; PPO from πref against the ground-truth
   reward (PPO-GT) and against the learned reward model, with KL coefficient β.
5. Best-of-N samples of πref, picked by the reward model (the paper's baseline).
Every policy is evaluated on held-out prompts (unseen films) with `directpo eval`: mean
ground-truth reward (± s.e.) and sequence-level KL(π‖πref) from samples. Best-of-N's KL is the
analytic log N − (N−1)/N (an upper bound when rewards tie).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from directpo.eval.bon import best_of_n, bon_kl
from directpo.eval.evaluate import evaluate_policy, mean_se
from directpo.eval.reward_model import RewardModel
from directpo.eval.scorers import review_sentiment
from directpo.rlhf.config import PPOConfig
from directpo.rlhf.ppo import ppo
from directpo.rlhf.reward_model import train_reward_model
from directpo.toy import build_tiny_model, review_task, write_jsonl
from directpo.training import TrainConfig, train


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/rlhf_comparison")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--dpo-steps", type=int, default=60)
    ap.add_argument("--ppo-steps", type=int, default=60)
    ap.add_argument("--betas", default="0.1,0.5", help="β of DPO and of PPO's KL penalty: one run of each per β")
    ap.add_argument("--dpo-lr", type=float, default=1e-4)
    ap.add_argument("--ppo-lr", type=float, default=1e-4)
    ap.add_argument("--n-eval-samples", type=int, default=4, help="samples per held-out prompt")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(a.out)
    tr, ev = review_task(n_train=256, n_eval=64, seed=a.seed)
    pairs, held_out = write_jsonl(tr, out / "train.jsonl"), write_jsonl(ev, out / "eval.jsonl")
    prompts = write_jsonl([{"prompt": r["prompt"]} for r in tr], out / "prompts.jsonl")
    both = write_jsonl([{"prompt": r["prompt"], "completion": r[k]} for r in tr for k in ("chosen", "rejected")],
                       out / "sft.jsonl")
    base = build_tiny_model(out / "base", [r["prompt"] + r["chosen"] + r["rejected"] for r in tr], hidden=64, layers=2,
                            heads=4, vocab_size=400, seed=a.seed)
    common = dict(lr=1e-3, optimizer="adamw", batch_size=32, micro_batch_size=32, warmup_steps=5, seed=a.seed,
                  overwrite=True, max_length=64, progress=False, log_every=50, ref_cache="off")
    sft = out / "sft"
    train(TrainConfig(model=str(base), data=str(both), output_dir=str(sft), loss="sft", max_steps=a.sft_steps,
                      **common))
    rm_dir = out / "rm"
    train_reward_model(TrainConfig(model=str(sft), data=str(pairs), eval_data=str(held_out), output_dir=str(rm_dir),
                                   max_steps=60, eval_every=60, **common))
    rm = RewardModel(str(rm_dir))
    policies = ["sft"]
    for beta in [float(b) for b in a.betas.split(",")]:
        train(TrainConfig(model=str(sft), data=str(pairs), output_dir=str(out / f"dpo_b{beta:g}"), beta=beta,
                          max_steps=a.dpo_steps, **{**common, "lr": a.dpo_lr}))
        ppo_common = dict(model=str(sft), prompts=str(prompts), kl_coef=beta, lr=a.ppo_lr, batch_size=64,
                          mini_batch_size=16, ppo_epochs=4, max_steps=a.ppo_steps, max_new_tokens=24, seed=a.seed,
                          overwrite=True, progress=False, log_every=20)
        ppo(PPOConfig(output_dir=str(out / f"ppo_gt_b{beta:g}"), **ppo_common), reward=review_sentiment)
        ppo(PPOConfig(output_dir=str(out / f"ppo_rm_b{beta:g}"), **ppo_common), reward=rm)
        policies += [f"dpo_b{beta:g}", f"ppo_gt_b{beta:g}", f"ppo_rm_b{beta:g}"]

    ev_kw = dict(ref=str(sft), reward=review_sentiment, n=a.n_eval_samples, max_new_tokens=24, seed=a.seed + 1,
                 progress=False)
    results = {}
    for name in policies:
        r = evaluate_policy(str(out / name), str(held_out), str(out / f"eval_{name}.json"), **ev_kw)
        results[name] = {k: r[k] for k in ("reward_mean", "reward_se", "kl_mean", "kl_se", "win_rate",
                                           "length_mean")}
    for n in (4, 16):
        # Best-of-N picks by the learned reward model; we report the ground-truth reward of the pick.
        r = best_of_n(str(sft), str(held_out), str(out / f"bon{n}.jsonl"), n, rm, max_new_tokens=24,
                      seed=a.seed + 1, progress=False)
        rows = [json.loads(line) for line in open(out / f"bon{n}.jsonl")]
        gt = [review_sentiment(x["prompt"], x["completion"]) for x in rows]
        m, se = mean_se(gt)
        results[f"bon{n}_rm"] = {"reward_mean": m, "reward_se": se, "kl_bound": bon_kl(n),
                                 "rm_reward_mean": r["reward_mean"]}
    rm_acc = [json.loads(line) for line in open(rm_dir / "metrics.jsonl") if '"eval"' in line][-1]["accuracy"]
    summary = {"seed": a.seed, "betas": a.betas, "dpo_lr": a.dpo_lr, "ppo_lr": a.ppo_lr, "sft_steps": a.sft_steps,
               "dpo_steps": a.dpo_steps, "ppo_steps": a.ppo_steps, "rm_heldout_accuracy": rm_acc, "results": results,
               "seconds": time.perf_counter() - t0}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{'method':<14} {'GT reward':>16} {'KL(π‖πref) nats':>20} {'length':>7}")
    for name, r in results.items():
        kl = f"{r['kl_mean']:.3f} ± {r['kl_se']:.3f}" if "kl_mean" in r else f"≤ {r['kl_bound']:.3f}"
        length = f"{r['length_mean']:.1f}" if "length_mean" in r else ""
        print(f"{name:<14} {r['reward_mean']:>9.3f} ± {r['reward_se']:.3f} {kl:>20} {length:>7}")
    return summary


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    main()
