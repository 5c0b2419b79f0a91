"""Every trainer's output folder has a model card (README.md, loadable by huggingface_hub) and, with
--report-to tensorboard, event files with the metrics."""
import json

import pytest

from directpo.cli import main
from directpo.toy import review_task, write_jsonl

pytest.importorskip("tensorboard")


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_every_trainer_writes_a_card_and_tensorboard_events(tiny_model, tmp_path, one_thread):
    from huggingface_hub import ModelCard

    rows, _ = review_task(n_train=8, n_eval=1, seed=2)
    pairs = write_jsonl(rows, tmp_path / "pairs.jsonl")
    common = ["--report-to", "tensorboard", "--no-progress", "--max-steps", "2"]
    runs = {
        "train": ["train", "--model", str(tiny_model), "--data", str(pairs), "--batch-size", "4", "--micro-batch-size", "4", "--max-length", "64"],
        "sft": ["sft", "--model", str(tiny_model), "--data", str(pairs), "--batch-size", "4", "--micro-batch-size", "4", "--max-length", "64"],
        "rm": ["rm", "--model", str(tiny_model), "--data", str(pairs), "--batch-size", "4", "--micro-batch-size", "4", "--max-length", "64"],
        "ppo": ["ppo", "--model", str(tiny_model), "--prompts", str(pairs), "--batch-size", "4", "--mini-batch-size",
                "2", "--ppo-epochs", "1", "--max-new-tokens", "4", "--reward-fn",
                "directpo.eval.scorers:review_sentiment"],
    }
    for name, argv in runs.items():
        out = tmp_path / name
        assert main([*argv, "--output-dir", str(out), *common]) == 0, name
        card = ModelCard.load(out / "README.md")
        assert card.data.library_name == "directpo", name
        metrics = [json.loads(x) for x in open(out / "metrics.jsonl")]
        loss_key = "reward" if name == "ppo" else "loss"
        tag = loss_key if name == "ppo" else f"train/{loss_key}"
        scalars = _scalars(out)
        key = next(k for k in scalars if k.endswith(tag))
        want = [m[loss_key] for m in metrics if m.get("split", "train") == "train"]
        assert scalars[key] == pytest.approx(want, rel=1e-6), name
