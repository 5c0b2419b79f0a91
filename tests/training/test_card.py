"""Model cards of real runs (Hub metadata, method, data, metrics, alarms, the command line) and
--push-to-hub up to the upload call (HfApi mocked: the Hub is not reachable from the tests)."""
import json

import pytest

from directpo.toy import review_task, write_jsonl
from directpo.training import TrainConfig
from directpo.training.card import (base_model_id, card_data, dataset_id, invoked_command_line, method_rows,
                                 recorded_alerts, write_model_card)
from directpo.training.hub import IGNORE_PATTERNS, check_repo_id, push_to_hub


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory):
    """A finished 2-step DPO run with periodic evaluation and a checkpoint."""
    from directpo.training.loop import train

    d = tmp_path_factory.mktemp("card")
    tr, ev = review_task(n_train=16, n_eval=8, seed=5)
    data, eval_data = write_jsonl(tr, d / "train.jsonl"), write_jsonl(ev, d / "eval.jsonl")
    out = d / "run"
    train(TrainConfig(model=str(tiny_model), data=str(data), eval_data=str(eval_data), output_dir=str(out),
                      max_steps=2, batch_size=4, micro_batch_size=4, lr=1e-3, optimizer="adamw", warmup_steps=0,
                      max_length=64, progress=False, save_every=1, beta=0.2))
    return out


def _settings(run):
    return json.loads((run / "directpo_config.json").read_text()), json.loads((run / "run_complete.json").read_text())


def test_card_of_a_real_run(tiny_run, tiny_model):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    settings, result = _settings(tiny_run)
    argv = ["train", "--model", str(tiny_model), "--data", settings["data"], "--output-dir", str(tiny_run),
            "--beta", "0.2", "--max-steps", "2", "--note", "two words"]
    alerts = [{"name": "grad_spike", "step": 2, "message": "gradient norm 12.5, 10× the median"},
              {"step": 1, "grad_norm": 12.5}]  # another shape: its fields listed
    path = write_model_card(tiny_run, settings, result, argv, data_summary="16 pairs; prompts 12–30 tokens.",
                            alerts=alerts)
    assert path == tiny_run / "README.md"
    card = ModelCard.load(path)
    meta = card.data.to_dict()
    assert meta["library_name"] == "directpo" and meta["tags"] == ["dpo", "directpo"]
    assert meta["pipeline_tag"] == "text-generation"
    assert "base_model" not in meta and "datasets" not in meta  # a local model and file: no Hub ids to name
    text = card.text
    for needle in ["| loss | `dpo` |", "| β | 0.2 |", "| learning rate | 0.001 |", "| optimizer | `adamw` |",
                   "| batch size | 4 |", "| steps | 2 |", "16 pairs; prompts 12–30 tokens.",
                   f"Training data: `{settings['data']}`", "train examples: 16",
                   "| metric | train (step 2) | eval (step 2) |", "| rewards/accuracies |",
                   "- step 2: **grad_spike** gradient norm 12.5, 10× the median", "- step 1: grad_norm 12.5",
                   f"directpo train --model {tiny_model} ", "--note 'two words'", f"`{tiny_model}`"]:
        assert needle in text, needle
    loss = f"{result['train']['loss']:.4g}"
    assert f"| loss | {loss} |" in text and "training time:" in text
    assert "pairs_per_s" not in text.split("## Reproduce")[0]  # the machine's speed is not the model's
    assert 'from_pretrained("run")' in text and text.startswith("\n# run\n")
    AutoModelForCausalLM.from_pretrained(tiny_run)  # the folder still loads as a model
    # no command line recorded: the settings alone, still loadable
    write_model_card(tiny_run, settings, result, None)
    assert "directpo train --model" not in ModelCard.load(path).text and "Alarms" not in ModelCard.load(path).text


def test_hub_ids_in_the_metadata(tmp_path):
    assert base_model_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B" and base_model_id("gpt2") == "gpt2"
    assert base_model_id(str(tmp_path)) is None and base_model_id("./local/dir") is None
    sft = tmp_path / "sft"  # a local SFT run started from a Hub model: DPO from it names that model
    sft.mkdir()
    (sft / "directpo_config.json").write_text(json.dumps({"command": "sft", "model": "Qwen/Qwen2.5-0.5B"}))
    assert base_model_id(str(sft)) == "Qwen/Qwen2.5-0.5B"
    assert dataset_id("Anthropic/hh-rlhf") == "Anthropic/hh-rlhf"
    assert dataset_id("Anthropic/hh-rlhf:test") == "Anthropic/hh-rlhf"
    assert dataset_id("pairs.jsonl") is None and dataset_id(str(tmp_path)) is None and dataset_id(None) is None
    data = card_data({"command": "train", "model": "Qwen/Qwen2.5-0.5B", "data": "Anthropic/hh-rlhf", "loss": "ipo",
                      "lora_r": 8})
    assert data.base_model == "Qwen/Qwen2.5-0.5B" and data.datasets == ["Anthropic/hh-rlhf"]
    assert data.tags == ["dpo", "directpo", "ipo", "lora", "peft"]


def test_rm_and_ppo_cards(tmp_path):
    from huggingface_hub import ModelCard

    rm = {"command": "rm", "model": "gpt2", "data": "Anthropic/hh-rlhf", "lr": 1e-5, "optimizer": "adamw",
          "batch_size": 8, "total_steps": 10, "reward_offset": -0.25, "train_pairs": 80}
    rows = dict(method_rows(rm))
    assert rows["reward offset (subtracted)"] == -0.25 and "β" not in rows and "loss" not in rows
    ppo = {"command": "ppo", "model": "gpt2", "prompts": "prompts.jsonl", "reward_model": "rm/", "kl_coef": 0.05,
           "adaptive_kl": True, "target_kl": 6.0, "ppo_epochs": 4, "mini_batch_size": 16, "cliprange": 0.2,
           "cliprange_value": 0.2, "vf_coef": 0.1, "gamma": 1.0, "lam": 0.95, "max_new_tokens": 64, "lr": 1e-5,
           "max_steps": 100}
    rows = dict(method_rows(ppo))
    assert rows["KL coefficient β"] == 0.05 and rows["target KL (nats)"] == 6.0 and rows["steps"] == 100
    for settings, tags, pipeline in [(rm, ["directpo", "reward-model"], "text-classification"),
                                     (ppo, ["directpo", "ppo", "rlhf"], "text-generation")]:
        out = tmp_path / settings["command"]
        out.mkdir()
        card = ModelCard.load(write_model_card(out, settings, {"train": {"step": 10, "loss": 0.5}}, None))
        assert card.data.tags == tags and card.data.pipeline_tag == pipeline and card.data.base_model == "gpt2"
    assert "AutoModelForSequenceClassification" in (tmp_path / "rm" / "README.md").read_text()
    assert "PPO (Schulman et al., 2017)" in (tmp_path / "ppo" / "README.md").read_text()


def test_push_to_hub_sends_the_run_without_checkpoints(tiny_run, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    settings, result = _settings(tiny_run)
    write_model_card(tiny_run, settings, result, None)
    (tiny_run / "tensorboard").mkdir(exist_ok=True)
    (tiny_run / "tensorboard" / "events.out.tfevents.1").write_bytes(b"x")
    assert list((tiny_run / "checkpoints").glob("step-*/*.safetensors"))  # there is something to leave out
    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["create_repo"] = {"repo_id": repo_id, **kw}
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        calls["upload_folder"] = kw

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    url = push_to_hub(tiny_run, "someone/tiny-dpo", token="hf_test", private=True)
    assert url == "https://huggingface.co/someone/tiny-dpo"
    card = (tiny_run / "README.md").read_text()  # the card names the repo it is in
    assert 'from_pretrained("someone/tiny-dpo")' in card and "\n# tiny-dpo\n" in card
    assert calls["create_repo"] == {"repo_id": "someone/tiny-dpo", "repo_type": "model", "private": True,
                                    "exist_ok": True}
    up = calls["upload_folder"]
    assert up["repo_id"] == "someone/tiny-dpo" and up["repo_type"] == "model" and up["folder_path"] == str(tiny_run)
    assert up["ignore_patterns"] == IGNORE_PATTERNS and up.get("allow_patterns") is None
    # what upload_folder does with those patterns: every file but the checkpoints goes
    files = sorted(str(p.relative_to(tiny_run)) for p in tiny_run.rglob("*") if p.is_file())
    sent = list(filter_repo_objects(files, ignore_patterns=up["ignore_patterns"]))
    assert not [f for f in sent if f.startswith("checkpoints/")]
    for f in ("model.safetensors", "config.json", "README.md", "tokenizer.json", "directpo_config.json",
              "metrics.jsonl", "run_complete.json", "tensorboard/events.out.tfevents.1"):
        assert f in sent, f
    assert set(files) - set(sent) == {f for f in files if f.startswith("checkpoints/")}


def test_push_to_hub_refusals(tmp_path, tiny_run, monkeypatch):
    from huggingface_hub import HfApi

    def fail(*a, **kw):
        raise AssertionError("the Hub must not be called")

    monkeypatch.setattr(HfApi, "create_repo", fail)
    monkeypatch.setattr(HfApi, "upload_folder", fail)
    with pytest.raises(ValueError, match="--push-to-hub 'a/b/c': not a Hugging Face repo id"):
        push_to_hub(tiny_run, "a/b/c")
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        push_to_hub(tmp_path / "nope", "me/x")
    with pytest.raises(ValueError, match="no model to upload"):
        push_to_hub(tmp_path, "me/x")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no README.md model card"):
        push_to_hub(tmp_path, "me/x")


def test_command_line_and_repo_id_checks():
    assert invoked_command_line(["/venv/bin/directpo", "train", "--beta", "0.2"]) == ["train", "--beta", "0.2"]
    assert invoked_command_line(["/src/directpo/__main__.py", "ppo", "--lr", "1e-5"]) == ["ppo", "--lr", "1e-5"]
    assert invoked_command_line(["/venv/bin/pytest", "-q"]) is None and invoked_command_line(["directpo"]) is None
    check_repo_id("someone/tiny-dpo")
    with pytest.raises(ValueError, match="--push-to-hub 'a/b/c': not a Hugging Face repo id"):
        check_repo_id("a/b/c")


def test_recorded_alerts(tmp_path):
    """Read with the one metrics reader (`runfiles.read_metrics`): an unfinished last line is passed
    over; a file it refuses (a broken line before the last) gives None, and the card no alarm section."""
    assert recorded_alerts(tmp_path) == []
    a1, a2 = {"name": "grad_spike", "step": 3, "message": "m1"}, {"name": "overfitting", "step": 4, "message": "m2"}
    lines = [json.dumps({"split": "train", "step": 3, "loss": 1.0, "alerts": [a1]}),
             json.dumps({"split": "train", "step": 4, "loss": 1.0}),
             json.dumps({"split": "eval", "step": 4, "loss": 1.0, "alerts": [a2]})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n{cut sho")
    assert recorded_alerts(tmp_path) == [a1, a2]
    (tmp_path / "metrics.jsonl").write_text("\n".join([lines[0], "{cut sho", *lines[1:]]) + "\n")
    assert recorded_alerts(tmp_path) is None
