"""LoRA DPO: the reference is the base model (adapters disabled), adapters and merged models save
and load, and a LoRA run needs less memory than full fine-tuning."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")

from directpo.data import load_examples, make_collate, tokenize_examples  # noqa: E402
from directpo.logprobs import dataset_logps  # noqa: E402
from directpo.models import load_model, load_tokenizer  # noqa: E402
from directpo.toy import build_tiny_model, review_task, write_jsonl  # noqa: E402
from directpo.training import TrainConfig, train  # noqa: E402
from directpo.training.lora import adapters_disabled, apply_lora, save_policy  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows, _ = review_task(n_train=24, n_eval=1, seed=12)
    return write_jsonl(rows, tmp_path_factory.mktemp("lora") / "d.jsonl")


def _logps(model, model_dir, data):
    tok = load_tokenizer(str(model_dir))
    exs = tokenize_examples(load_examples(str(data)), tok, max_length=64)
    return dataset_logps(model, exs, make_collate("packed", tok.pad_token_id))


def test_lora_dpo_reference_is_the_base_model_and_saves(tiny_model, data, tmp_path):
    base_logps = _logps(load_model(str(tiny_model)), tiny_model, data)
    kw = dict(model=str(tiny_model), data=str(data), lr=1e-2, optimizer="adamw", batch_size=8, micro_batch_size=8,
              max_steps=4, warmup_steps=0, max_length=64, progress=False, lora_r=4, lora_alpha=8)
    for live in (False, True):  # precomputed table, and live reference through disable_adapter()
        out = tmp_path / f"live{live}"
        train(TrainConfig(output_dir=str(out), precompute_ref=not live, **kw))
        lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
        assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and lines[-1]["loss"] < lines[0]["loss"]
        assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    from peft import AutoPeftModelForCausalLM
    adapted = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "liveFalse")
    with adapters_disabled(adapted):  # the reference inside the trained model is still the base model
        assert torch.allclose(_logps(adapted, tiny_model, data), base_logps, atol=1e-5)
    adapted_logps = _logps(adapted, tiny_model, data)
    assert not torch.allclose(adapted_logps, base_logps, atol=1e-3)  # the adapters did learn
    # --merge: a full model any HF tool loads, computing what the adapted model computes
    train(TrainConfig(output_dir=str(tmp_path / "merged"), merge=True, **kw))
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(_logps(merged, tiny_model, data), adapted_logps, atol=1e-4)


def test_adapter_of_a_relative_base_loads_from_another_directory(tiny_model, data, tmp_path, monkeypatch):
    """The base given as a relative directory is recorded by its absolute path, so the adapter loads
    wherever the user is; the adapted model computes what the run saved."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(tiny_model, work / "base")
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    train(TrainConfig(model="base", data=str(data), output_dir="out", lr=1e-2, optimizer="adamw", batch_size=8,
                      micro_batch_size=8, max_steps=2, warmup_steps=0, max_length=64, progress=False, lora_r=4,
                      lora_alpha=8, ref_cache="off"))
    recorded = json.loads((work / "out" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((work / "base").resolve())
    monkeypatch.chdir(elsewhere)
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM
    adapted = AutoPeftModelForCausalLM.from_pretrained(work / "out")
    explicit = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(recorded), work / "out")
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, explicit(ids).logits, atol=1e-6)


def test_hub_ids_are_recorded_as_given(tiny_model, tmp_path, monkeypatch):
    model = load_model(str(tiny_model))
    model.config._name_or_path = model.name_or_path = "some-org/not-a-directory"
    peft_model = apply_lora(model, r=2, alpha=4, target_modules="q_proj")
    monkeypatch.chdir(tmp_path)
    save_policy(peft_model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "some-org/not-a-directory"


def test_lora_freezes_base_and_trains_only_adapters(tiny_model):
    model = apply_lora(load_model(str(tiny_model)), r=2, alpha=4, target_modules="q_proj,v_proj")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and not any("k_proj" in n for n in trainable)


PEAK = """
import resource, sys
from directpo.cli import main
rc = main(sys.argv[1:])
print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rc)
"""


def test_lora_peak_rss_below_full_finetuning(tmp_path, data):
    """An 8-layer, hidden-768 model (≈ 57M params): full fine-tuning holds grads and two AdamW moments
    for every weight (≈ 680 MB), LoRA for the adapters only. (The margin is far above the ~150 MB
    run-to-run variation of a process's peak RSS seen here.)"""
    rows, _ = review_task(n_train=16, n_eval=1, seed=1)
    model = build_tiny_model(tmp_path / "m", [r["prompt"] + r["chosen"] for r in rows], hidden=768, layers=8,
                             heads=12, vocab_size=400)
    peaks = {}
    for name, extra in (("full", []), ("lora", ["--lora-r", "8"])):
        argv = ["train", "--model", str(model), "--data", str(data), "--output-dir", str(tmp_path / name),
                "--optimizer", "adamw", "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "2",
                "--max-length", "64", "--no-progress", *extra]
        res = subprocess.run([sys.executable, "-c", PEAK, *argv], capture_output=True, text=True, env=dict(os.environ))
        line = [x for x in res.stdout.splitlines() if x.startswith("PEAK")][-1].split()
        assert line[2] == "0", res.stderr
        peaks[name] = int(line[1]) / 1024
    assert peaks["lora"] < peaks["full"] - 300, peaks


@pytest.mark.parametrize("targets", ["nonexist_proj", "q_proj,v_porj", ""])
def test_lora_targets_that_match_no_module_are_named(tiny_model, targets):
    """Before: PEFT's NoMatchingPeftModuleError as a traceback for a name that matches nothing, and a
    misspelt name beside a right one (v_porj) silently adapted q_proj alone."""
    from directpo.errors import UserValueError

    with pytest.raises(UserValueError, match="--lora-target-modules") as e:
        apply_lora(load_model(str(tiny_model)), r=2, alpha=4, target_modules=targets)
    assert "q_proj" in str(e.value) and "all-linear" in str(e.value)


@pytest.mark.parametrize("cls, extra", [("train", {"data": "d.jsonl"}), ("ppo", {"prompts": "p.jsonl", "reward_fn": "m:f"}),
                                        ("online", {"prompts": "p.jsonl", "reward_fn": "m:f"})])
def test_adapter_settings_without_a_rank_are_refused(cls, extra):
    """--lora-alpha (or dropout, targets) without --lora-r would be ignored: a full fine-tune saved where
    the user expects an adapter. Refused naming every such flag; with a rank, or left at their
    defaults, they pass."""
    from directpo.config import ConfigError
    from directpo.rlhf.config import PPOConfig
    from directpo.rlhf.online import OnlineConfig
    from directpo.training.config import TrainConfig

    make = {"train": TrainConfig, "ppo": PPOConfig, "online": OnlineConfig}[cls]
    base = dict(model="m", output_dir="o", **extra)
    with pytest.raises(ConfigError, match=r"--lora-alpha, --lora-target-modules set without --lora-r"):
        make(**base, lora_alpha=32.0, lora_target_modules="q_proj").validate()
    with pytest.raises(ConfigError, match=r"--lora-dropout set without --lora-r"):
        make(**base, lora_dropout=0.1).validate()
    assert make(**base).validate().lora_r == 0
    assert make(**base, lora_r=4, lora_alpha=32.0, lora_dropout=0.1).validate().lora_alpha == 32.0
