"""`directpo demo`: DPO end to end on a built-in task, offline, in about a minute on 2 CPU cores.

A tiny random Llama and a tokenizer trained on the spot; 256 training pairs of film reviews where
the chosen review has more praise than criticism and the rejected one the reverse (see
`directpo.toy.review_task`); 64 held-out pairs about other films with unseen word combinations. DPO should lift the held-out implicit-reward accuracy
(β·log π/πref of chosen > rejected) from 0 (at step 0 policy = reference: every margin is 0) to
well above chance (0.5).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..config import setting
from ..console import log
from ..outputs import check_output_dir
from ..runfiles import read_metrics
from ..toy import (COLOUR_QUESTION, COLOURS, build_tiny_model, build_tiny_vlm, colour_image_task, review_task,
                   write_jsonl)
from ..training import TrainConfig, train


@dataclass
class DemoConfig:
    """The built-in demo"""

    output_dir: str = setting("runs/demo", "where the demo writes its data, model and run (rewritten each time)")
    steps: int = setting(60, "DPO steps", ge=1)
    seed: int = setting(0, "seed of the task's data and the model's initialisation")
    task: str = setting("reviews", "reviews: film reviews, a tiny Llama; colours: pictures, a tiny Qwen2-VL, the "
                                   "chosen answer naming the picture's colour (vision-language DPO)",
                        choices=["reviews", "colours"])


DEMO_MARKERS = ("dpo/directpo_config.json", "base/config.json")


def run_demo(output_dir: str = "runs/demo", steps: int = 60, seed: int = 0, threshold: float = 0.8,
             task: str = "reviews") -> dict:
    t0 = time.perf_counter()
    out = Path(output_dir)
    # The demo rewrites its own folder on every run, never a folder of someone else's files.
    check_output_dir(out, {}, None, markers=DEMO_MARKERS, what="directpo demo")
    cfg = colours_run(out, steps, seed) if task == "colours" else reviews_run(out, steps, seed)
    summary = train(cfg)
    evals = read_metrics(out / "dpo", split="eval")
    final = evals[-1]["rewards/accuracies"]
    passed = final >= threshold
    print("\nheld-out implicit-reward accuracy (chance 0.5):")
    for e in evals:
        print(f"  step {e['step']:>4}: {e['rewards/accuracies']:.3f}   margin {e['rewards/margins']:+.3f}")
    alerts = summary.get("alerts") or []
    print(f"health alarms: {', '.join(a['name'] for a in alerts) if alerts else 'none'}")
    print(f"{'PASS' if passed else 'FAIL'}: final held-out accuracy {final:.3f} "
          f"({'≥' if passed else '<'} {threshold}) in {time.perf_counter() - t0:.0f} s; model in {out / 'dpo'}")
    return {"passed": passed, "final_accuracy": final, "evals": evals, "summary": summary}


def reviews_run(out: Path, steps: int, seed: int) -> TrainConfig:
    """The review task's data, its tiny Llama, and the DPO run's settings."""
    train_rows, eval_rows = review_task(seed=seed)
    train_file = write_jsonl(train_rows, out / "data" / "train.jsonl")
    eval_file = write_jsonl(eval_rows, out / "data" / "eval.jsonl")
    texts = [r["prompt"] + r["chosen"] for r in train_rows] + [r["prompt"] + r["rejected"] for r in train_rows]
    base = build_tiny_model(out / "base", texts, hidden=64, layers=2, heads=4, vocab_size=400, seed=seed)
    log(f"tiny Llama + tokenizer in {base}; {len(train_rows)} train / {len(eval_rows)} held-out "
          f"pairs in {train_file.parent}", prefix="directpo demo")
    cfg = TrainConfig(model=str(base), data=str(train_file), eval_data=str(eval_file), output_dir=str(out / "dpo"),
                      lr=1e-3, optimizer="adamw", beta=0.1, batch_size=32, micro_batch_size=32, max_steps=steps,
                      warmup_steps=5, eval_every=max(1, steps // 6), seed=seed, overwrite=True, max_length=64)
    return cfg


def colours_run(out: Path, steps: int, seed: int) -> TrainConfig:
    """The colour task (`toy.colour_image_task`: a picture of one dominant colour, the chosen answer
    naming it, the rejected one another colour), a tiny Qwen2-VL, and the DPO run's settings: only
    a policy that reads the picture ranks the held-out pairs."""
    train_file, eval_file = colour_image_task(out / "data", n_train=COLOUR_PAIRS[0], n_eval=COLOUR_PAIRS[1],
                                              seed=seed)
    texts = [f"{COLOUR_QUESTION} It is {c}." for c in COLOURS] * 8
    base = build_tiny_vlm(out / "base", "qwen2_vl", texts, seed=seed)
    log(f"tiny Qwen2-VL + processor in {base}; {COLOUR_PAIRS[0]} train / {COLOUR_PAIRS[1]} held-out image pairs in "
        f"{train_file.parent}", prefix="directpo demo")
    return TrainConfig(model=str(base), data=str(train_file), eval_data=str(eval_file), output_dir=str(out / "dpo"),
                       lr=1e-3, optimizer="adamw", beta=0.1, batch_size=16, micro_batch_size=16, max_steps=steps,
                       warmup_steps=5, eval_every=max(1, steps // 6), seed=seed, overwrite=True, max_length=128)


COLOUR_PAIRS = (128, 32)  # (train, held-out) pairs of the colour task
