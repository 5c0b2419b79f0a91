"""Adapter directories as models: `--model SFT_ADAPTER_DIR` (continue its adapter, or merge it and train
a new one) with πref = the SFT model, `--ref ADAPTER_DIR` on the policy's own base (one copy of it),
and the one-line errors of adapters that cannot work."""
import json
import math
import shutil

import pytest
import torch

pytest.importorskip("peft")

from conftest import review_pairs, train_argv

from directpo.cli import main
from directpo.data import load_examples, make_collate, tokenize_examples
from directpo.logprobs import dataset_logps
from directpo.losses import get_loss
from directpo.models import load_model, load_tokenizer
from directpo.training import TrainConfig
from directpo.training.adapters import REFERENCE, tokenizer_source
from directpo.training.lora import adapters_disabled
from directpo.training.prepare import load_policy_and_reference


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return review_pairs(tmp_path_factory.mktemp("adapters"), n_train=16, seed=5)


@pytest.fixture(scope="module")
def sft_adapter(tiny_model, data, tmp_path_factory):
    """`directpo sft --lora-r 16` on the tiny model: an adapter directory that moved off its base."""
    out = tmp_path_factory.mktemp("sft") / "sft"
    argv = train_argv(tiny_model, data, out, "--lora-r", "16", "--lora-alpha", "32", "--lr", "3e-2", "--optimizer",
                      "adamw", "--max-steps", "3", "--ref-cache", "off")
    argv[0] = "sft"
    assert main(argv) == 0
    return out


def _logps(model, tok, data):
    exs = tokenize_examples(load_examples(str(data)), tok, max_length=64)
    return dataset_logps(model, exs, make_collate("packed", tok.pad_token_id))


def _sft_merged(tiny_model, sft_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), sft_adapter).merge_and_unload()


def _prepared(model, data, tok, **kw):
    cfg = TrainConfig(model=str(model), data=str(data), output_dir="unused", progress=False, **kw).validate()
    return load_policy_and_reference(cfg, tok, "cpu", get_loss("dpo"), empty=False)


# continuing the adapter, πref is base + the adapter unmerged: the same function as the merged model,
# its float rounding differs (~1e-7 relative); with a new adapter πref is the merged model itself
@pytest.mark.parametrize("extra, tol", [({}, {"atol": 0, "rtol": 1e-6}),
                                        ({"lora_r": 4, "new_adapter": True}, {"atol": 1e-6, "rtol": 0})],
                         ids=["continue", "new-adapter"])
def test_reference_of_an_sft_adapter_is_the_sft_model(tiny_model, sft_adapter, data, extra, tol):
    """πref = πSFT (the adapter merged by PEFT) to 1e-6, whether its adapter is trained further or a
    new one is trained on the merged model; the policy starts as that same model."""
    tok = load_tokenizer(tokenizer_source(str(sft_adapter)))
    want = _logps(_sft_merged(tiny_model, sft_adapter), tok, data)
    base = _logps(load_model(str(tiny_model)), tok, data)
    assert (want - base).abs().max() > 1e-2  # the SFT adapter moved the model: the check below can fail
    policy, ref = _prepared(sft_adapter, data, tok, **extra)
    with adapters_disabled(ref):
        got = _logps(ref, tok, data)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(_logps(policy, tok, data), want, **tol)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and f".{REFERENCE}." not in n for n in trainable)


def test_ref_naming_the_adapters_base_is_that_base(tiny_model, sft_adapter, data):
    """--model SFT_ADAPTER --ref BASE: πref = the base, the same network with its adapter disabled
    (no reference adapter, no second copy)."""
    tok = load_tokenizer(str(tiny_model))
    policy, ref = _prepared(sft_adapter, data, tok, ref=str(tiny_model))
    assert ref is policy and REFERENCE not in policy.peft_config
    with adapters_disabled(ref):
        got = _logps(ref, tok, data)
    torch.testing.assert_close(got, _logps(load_model(str(tiny_model)), tok, data), atol=1e-6, rtol=0)


def test_ref_adapter_shares_the_policy_base(tiny_model, sft_adapter, data):
    """--ref ADAPTER_DIR: one copy of the base weights (every storage counted once), πref = base + that
    adapter as PEFT computes it, the policy's own adapter inactive meanwhile and trainable after."""
    tok = load_tokenizer(str(tiny_model))
    policy, ref = _prepared(tiny_model, data, tok, lora_r=4, ref=str(sft_adapter))
    assert ref is policy
    base_numel = sum(p.numel() for p in load_model(str(tiny_model)).parameters())
    storages = {}
    for n, p in policy.named_parameters():
        storages[p.untyped_storage().data_ptr()] = p.numel()
    adapters = sum(p.numel() for n, p in policy.named_parameters() if "lora_" in n)
    assert sum(storages.values()) == base_numel + adapters  # the base once, plus two adapters' worth
    assert sum(p.numel() for n, p in policy.named_parameters() if f".{REFERENCE}." in n) > 0
    with adapters_disabled(ref):
        got = _logps(ref, tok, data)
    from peft import PeftModel
    want = _logps(PeftModel.from_pretrained(load_model(str(tiny_model)), sft_adapter), tok, data)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    fresh = _logps(policy, tok, data)  # its own new adapter (B = 0): the base model, after the context too
    torch.testing.assert_close(fresh, _logps(load_model(str(tiny_model)), tok, data), atol=1e-6, rtol=0)
    assert all(p.requires_grad == ("lora_" in n and f".{REFERENCE}." not in n) for n, p in policy.named_parameters())


def _first_and_last(out):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return lines[0], lines[-1]


def test_train_from_an_sft_adapter_directory(tiny_model, sft_adapter, data, tmp_path):
    """The CLI end to end: continuing the adapter (πref precomputed, or live through its reference
    adapter) and a new adapter all start at loss log 2 (the policy is πref), learn, and save their
    adapter alone; an adapter directory without tokenizer files takes its base's tokenizer."""
    bare = tmp_path / "bare"  # the adapter files only
    bare.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(sft_adapter / f, bare / f)
    assert tokenizer_source(str(bare)) == str(tiny_model.resolve())
    common = ["--lr", "5e-2", "--optimizer", "adamw", "--max-steps", "3", "--ref-cache", "off"]
    runs = {"continue": (bare, []), "continue-live": (bare, ["--no-precompute-ref"]),  # πref's adapter at each step
            "new": (sft_adapter, ["--lora-r", "4", "--new-adapter"])}
    for name, (model, extra) in runs.items():
        out = tmp_path / name
        assert main(train_argv(model, data, out, *common, *extra)) == 0
        first, last = _first_and_last(out)
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and last["loss"] < first["loss"]
        assert (out / "adapter_model.safetensors").exists() and not (out / REFERENCE).exists()
    saved = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tiny_model.resolve())  # folded onto the true base
    from peft import AutoPeftModelForCausalLM
    continued = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "continue")
    assert list(continued.peft_config) == ["default"]


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("[directpo] ")]  # (the log before it)
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_bad_adapter_inputs_are_one_line(tiny_model, sft_adapter, data, tmp_path, capsys):
    moved = tmp_path / "moved"  # an adapter whose base is gone
    shutil.copytree(sft_adapter, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")}))
    err = _one_line_error(capsys, train_argv(moved, data, tmp_path / "o1", "--max-steps", "1"))
    assert str(moved) in err and str(tmp_path / "gone") in err
    looped = tmp_path / "looped"  # an adapter naming itself as its base
    shutil.copytree(sft_adapter, looped)
    (looped / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(looped)}))
    assert "comes back to" in _one_line_error(capsys, train_argv(looped, data, tmp_path / "o0", "--max-steps", "1"))
    err = _one_line_error(capsys, train_argv(sft_adapter, data, tmp_path / "o2", "--new-adapter"))
    assert "--new-adapter" in err and "--lora-r" in err
    other_base = tmp_path / "other-base"  # the same weights in another place: another model to directpo
    shutil.copytree(tiny_model, other_base)
    other = tmp_path / "other"
    shutil.copytree(sft_adapter, other)
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(other_base)}))
    err = _one_line_error(capsys, train_argv(tiny_model, data, tmp_path / "o3", "--lora-r", "4", "--ref", str(other),
                                             "--max-steps", "1", "--ref-cache", "off"))
    assert f"--ref {other}" in err and str(other_base) in err
    err = _one_line_error(capsys, train_argv(tiny_model, data, tmp_path / "o4", "--ref", str(sft_adapter),
                                             "--max-steps", "1", "--ref-cache", "off"))
    assert "--lora-r" in err  # full fine-tuning cannot share its base with a reference adapter
    err = _one_line_error(capsys, train_argv(sft_adapter, data, tmp_path / "o5", "--ref-sync-every", "2"))
    assert "--ref-sync-every" in err and "--new-adapter" in err  # TR-DPO would mix the policy into its own πref


def test_pipeline_with_lora_trains_dpo_from_the_sft_adapter(tiny_model, data, tmp_path):
    """`directpo pipeline --lora-r`: stage 2 names the SFT adapter as model and reference; it trains a
    new adapter on the merged SFT model, πref that model (its first loss log 2)."""
    argv = train_argv(tiny_model, data, tmp_path / "p", "--lora-r", "4", "--lr", "5e-2", "--optimizer", "adamw",
                      "--max-steps", "2", "--ref-cache", "off")
    argv[0] = "pipeline"
    assert main(argv) == 0
    assert (tmp_path / "p" / "sft" / "adapter_config.json").exists()
    first, _ = _first_and_last(tmp_path / "p" / "dpo")
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    saved = json.loads((tmp_path / "p" / "dpo" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tiny_model.resolve())  # the SFT adapter folded in


def test_continued_adapter_resumes_bit_identical(sft_adapter, data, tmp_path):
    """A run continuing an SFT adapter, stopped at a checkpoint and resumed, ends with the adapter an
    uninterrupted run ends with (the reference adapter is rebuilt from the SFT directory, not saved)."""
    from safetensors.torch import load_file

    common = ["--lr", "5e-2", "--optimizer", "adamw", "--ref-cache", "off"]
    assert main(train_argv(sft_adapter, data, tmp_path / "straight", *common, "--max-steps", "4")) == 0
    assert main(train_argv(sft_adapter, data, tmp_path / "split", *common, "--max-steps", "2", "--save-every",
                           "2")) == 0
    assert main(train_argv(sft_adapter, data, tmp_path / "split", *common, "--max-steps", "4", "--save-every", "2",
                           "--resume")) == 0
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(REFERENCE in k for k in a)


# ---- a new adapter on a merged one is saved folded: one LoRA on the true base ----

_IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64], [1, 2, 3, 4, 5, 6, 7, 8]])


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=_IDS).logits.float()


def _capture_saved_policy(monkeypatch) -> dict:
    """The policy's logits as the run holds it in memory when it saves it (base + merged SFT + new LoRA)."""
    from directpo.training import loop

    seen, real = {}, loop.save_policy

    def spy(model, out, *a, **kw):
        seen["logits"] = _logits(model)
        return real(model, out, *a, **kw)

    monkeypatch.setattr(loop, "save_policy", spy)
    return seen


def test_new_adapter_on_an_sft_adapter_saves_one_lora_on_the_base(tiny_model, sft_adapter, data, tmp_path,
                                                                   monkeypatch, capsys):
    """SFT adapter (r 16, alpha 32) → `train --model SFT_DIR --lora-r 4 --lora-alpha 16`: the saved adapter
    names the true base and PEFT's AutoPeftModelForCausalLM loads the trained policy (to 1e-5); so does
    `directpo merge`; `--merge` still saves the merged policy."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    seen = _capture_saved_policy(monkeypatch)
    common = ["--lora-r", "4", "--lora-alpha", "16", "--lr", "5e-2", "--optimizer", "adamw", "--max-steps", "3",
              "--ref-cache", "off"]
    out = tmp_path / "dpo"
    assert main(train_argv(sft_adapter, data, out, *common)) == 0
    said = capsys.readouterr().err
    assert f"folded in: one LoRA of rank 20 on its base {tiny_model.resolve()}" in said and "saved LoRA adapters" in said
    want = seen["logits"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model.resolve())
    assert config["r"] == config["lora_alpha"] == 16 + 4
    assert (want - _logits(_sft_merged(tiny_model, sft_adapter))).abs().max() > 1e-3  # the new LoRA moved it
    assert (want - _logits(load_model(str(tiny_model)))).abs().max() > 1e-2  # the SFT part matters
    torch.testing.assert_close(_logits(AutoPeftModelForCausalLM.from_pretrained(out)), want, atol=1e-5, rtol=0)
    assert main(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(merged), want, atol=1e-5, rtol=0)
    assert main(train_argv(sft_adapter, data, tmp_path / "m", *common, "--merge")) == 0
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m")), seen["logits"],
                               atol=1e-5, rtol=0)


def _random_lora(model, config, seed):
    from peft import get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)
    return peft_model


def test_fold_handles_patterns_modules_to_save_and_partial_targets(tiny_model, tmp_path):
    """The fold on PEFT-made adapters: alpha/rank patterns and rsLoRA (per-module scalings), modules
    targeted by one adapter only (zero blocks), lm_head saved whole by the first and adapted by the
    second (its delta added into the saved copy): AutoPeftModelForCausalLM loads the chain's model."""
    from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel

    from directpo.training.adapters import fold_onto_root

    first = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                       alpha_pattern={"v_proj": 4}, rank_pattern={"v_proj": 2}, task_type="CAUSAL_LM")
    _random_lora(load_model(str(tiny_model)), first, 0).save_pretrained(tmp_path / "sft")
    merged = PeftModel.from_pretrained(load_model(str(tiny_model)), tmp_path / "sft").merge_and_unload()
    second = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "o_proj", "lm_head"],
                        task_type="CAUSAL_LM")
    top = _random_lora(merged, second, 1)
    want = _logits(top)
    top.save_pretrained(tmp_path / "dpo")
    config_file = tmp_path / "dpo" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "sft")}))
    assert "one LoRA of rank 12" in fold_onto_root(tmp_path / "dpo")
    folded = json.loads(config_file.read_text())
    assert folded["modules_to_save"] == ["lm_head"] and not any("lm_head" in t for t in folded["target_modules"])
    torch.testing.assert_close(_logits(AutoPeftModelForCausalLM.from_pretrained(tmp_path / "dpo")), want,
                               atol=1e-5, rtol=0)
    assert fold_onto_root(tmp_path / "dpo") is None  # on the base already: nothing to fold


def test_fold_refuses_dora_in_one_line(tiny_model, tmp_path):
    from peft import LoraConfig

    from directpo.errors import UserValueError
    from directpo.training.adapters import fold_onto_root

    dora = LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, task_type="CAUSAL_LM")
    _random_lora(load_model(str(tiny_model)), dora, 0).save_pretrained(tmp_path / "sft")
    _random_lora(load_model(str(tiny_model)), LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"),
                 1).save_pretrained(tmp_path / "dpo")
    config_file = tmp_path / "dpo" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "base_model_name_or_path": str(tmp_path / "sft")}))
    with pytest.raises(UserValueError, match="DoRA") as e:
        fold_onto_root(tmp_path / "dpo")
    assert "\n" not in str(e.value) and str(tmp_path / "sft") in str(e.value)


# ---- adapter directories wherever a model is read for inference ----

def test_sample_and_score_from_an_adapter_directory_equal_the_merged_model(tiny_model, sft_adapter, data, tmp_path):
    """`sample` (and `score`, `inspect --model`) on an adapter directory run its base with the adapter merged in: the
    same samples at a fixed seed as the merged model saved whole, the same scores; an adapter
    directory without tokenizer files takes its base's."""
    from directpo.eval.sample import sample
    from directpo.eval.score import score

    merged = tmp_path / "merged"
    _sft_merged(tiny_model, sft_adapter).save_pretrained(merged)
    load_tokenizer(str(tiny_model)).save_pretrained(merged)
    bare = tmp_path / "bare"  # the adapter files only
    bare.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(sft_adapter / f, bare / f)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("The film was", "I think this", "Overall")))
    runs = {}
    for name, model in {"adapter": bare, "merged": merged, "base": tiny_model}.items():
        sample(str(model), str(prompts), str(tmp_path / f"{name}.jsonl"), n=2, max_new_tokens=12, seed=3,
               progress=False)
        runs[name] = (tmp_path / f"{name}.jsonl").read_text()
    assert runs["adapter"] == runs["merged"] and runs["adapter"] != runs["base"]  # the adapter matters
    scores = {}
    for name, model in {"adapter": bare, "merged": merged}.items():
        score(str(model), str(data), str(tmp_path / f"{name}.scores.jsonl"), ref=str(tiny_model), max_length=64)
        scores[name] = [json.loads(x) for x in (tmp_path / f"{name}.scores.jsonl").read_text().splitlines()]
    assert scores["adapter"] == scores["merged"] and scores["adapter"]
    pairs = {}
    for name, model in {"adapter": bare, "merged": merged}.items():  # inspect: the reference's log-probs of pairs
        assert main(["inspect", "--data", str(data), "--model", str(model), "--out", str(tmp_path / f"{name}.inspect"),
                     "--max-length", "64", "--no-progress", "--device", "cpu"]) == 0
        pairs[name] = (tmp_path / f"{name}.inspect" / "pairs.jsonl").read_text()
    assert pairs["adapter"] == pairs["merged"] and "logp" in pairs["adapter"]


def test_plan_counts_an_adapter_on_its_base(tiny_model, sft_adapter):
    """`directpo plan --model ADAPTER_DIR`: the base's shape, its parameters plus the adapter's."""
    from safetensors.torch import load_file

    from directpo.training.plan import PlanConfig, plan

    base = plan(PlanConfig(model=str(tiny_model)))["shape"]
    got = plan(PlanConfig(model=str(sft_adapter)))["shape"]
    adapter = sum(t.numel() for t in load_file(sft_adapter / "adapter_model.safetensors").values())
    assert adapter > 0 and got["params"] == base["params"] + adapter
    assert {k: v for k, v in got.items() if k != "params"} == {k: v for k, v in base.items() if k != "params"}
