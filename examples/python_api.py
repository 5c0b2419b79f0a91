"""directpo from Python: SFT then DPO, score pairs, evaluate both policies — offline, on a CPU.

    python examples/python_api.py [OUT_DIR]      (default: runs/python-api)

The model is a tiny Llama with a tokenizer trained on the spot (`directpo.toy`), so the example
needs no network; give `model="your/hub-id"` or a local folder for a real run. Every setting is the
command's (`directpo train --help` lists them), as keywords or a `directpo.TrainConfig`.
"""
from __future__ import annotations

import sys
from pathlib import Path

from directpo import api
from directpo.toy import NEGATIVE, POSITIVE, build_tiny_model, review_task, write_jsonl


class PrintEvery(api.Callback):
    """Callbacks see every metrics line as it is written; returning True stops the run (saved)."""

    def on_eval(self, record):
        print(f"  eval @ step {record['step']}: reward accuracy {record['rewards/accuracies']:.2f}")


def praise(prompt: str, completion: str) -> float:
    """A reward for `evaluate`: praise words minus criticism words (what the preference data prefers)."""
    words = completion.replace(",", " ").replace(".", " ").split()
    return float(sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words))


def main(out: Path) -> dict:
    # Data and a starting model, written here only because the example has none of its own.
    train_rows, eval_rows = review_task(n_train=128, n_eval=32)
    train_file = write_jsonl(train_rows, out / "data" / "train.jsonl")
    eval_file = write_jsonl(eval_rows, out / "data" / "eval.jsonl")
    texts = [r["prompt"] + r["chosen"] for r in train_rows] + [r["prompt"] + r["rejected"] for r in train_rows]
    base = build_tiny_model(out / "base", texts, hidden=64, layers=2, heads=4, vocab_size=400)

    # 1. The paper's recipe: πSFT by Preferred-FT on the chosen responses (`directpo sft`), then DPO
    #    from it and against it (`directpo train`), the same settings as the commands.
    common = dict(data=str(train_file), optimizer="adamw", batch_size=32, micro_batch_size=32, warmup_steps=5,
                  max_length=64, overwrite=True, progress=False)
    sft = api.sft(model=str(base), output_dir=str(out / "sft"), lr=3e-3, max_steps=120, **common)
    result = api.train(model=str(sft.output_dir), eval_data=str(eval_file), output_dir=str(out / "dpo"), lr=1e-4,
                       max_steps=40, eval_every=10, callbacks=[PrintEvery()], **common)
    print(f"trained: {result.output_dir}, final held-out reward accuracy {result.eval['rewards/accuracies']:.2f}, "
          f"{len(result.metrics)} metrics records, alarms: {[a['name'] for a in result.alerts] or 'none'}")

    # 2. Score the held-out pairs: log-probs and implicit rewards against the starting model.
    scores = api.score(model=str(result.output_dir), ref=str(sft.output_dir), data=str(eval_file),
                       out=str(out / "scores.jsonl"), overwrite=True, max_length=64)
    print(f"scored: {scores}")

    # 3. Evaluate: samples at two temperatures, their reward (a Python function) and KL(π‖πref).
    prompts = write_jsonl([{"prompt": r["prompt"]} for r in eval_rows[:16]], out / "data" / "prompts.jsonl")
    evals = {}
    for name, model in (("sft", sft.output_dir), ("dpo", result.output_dir)):
        evals[name] = api.evaluate(model=str(model), ref=str(sft.output_dir), prompts=str(prompts), reward=praise,
                                   out=str(out / f"eval-{name}.json"), temperatures=[0.7, 1.0], max_new_tokens=16,
                                   overwrite=True, progress=False)
        e = evals[name]
        print(f"evaluated {name}: reward {e['reward_mean']:.3f} ± {e['reward_se']:.3f}, "
              f"KL(π‖πSFT) {e['kl_mean']:.3f}")
    return {"train": result.train, "eval": result.eval, "score": scores, "evaluate": evals}


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/python-api"))
