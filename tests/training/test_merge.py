"""`directpo merge ADAPTER_DIR --out DIR`: the streamed merge equals PEFT's `merge_and_unload()`, loads
with `AutoModelForCausalLM.from_pretrained`, and refuses what it must (its output over its input, a
quantized base without --dequantize)."""
import json
import shutil

import pytest
import torch

pytest.importorskip("peft")

from conftest import review_pairs, train_argv

from directpo.cli import main


@pytest.fixture(scope="module")
def sft_adapter(tiny_model, tmp_path_factory):
    """`directpo sft --lora-r 16`: a real adapter, its B moved off zero."""
    out = tmp_path_factory.mktemp("merge") / "sft"
    argv = train_argv(tiny_model, review_pairs(out.parent, n_train=8), out, "--lora-r", "16", "--lora-alpha", "32",
                      "--lr", "3e-2", "--optimizer", "adamw", "--max-steps", "2", "--ref-cache", "off")
    argv[0] = "sft"
    assert main(argv) == 0
    return out


def _peft_adapter(base, out, seed=0, **lora):
    """An adapter made with PEFT directly (random A and B, whole modules moved), saved naming `base`
    as its base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**lora))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.05)
            elif "modules_to_save" in n:  # a module trained whole: moved off the base's
                p.add_(torch.randn_like(p) * 0.05)
    model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(out)
    return out


def _peft_merged(base, *adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    for a in adapters:
        model = PeftModel.from_pretrained(model, a).merge_and_unload()
    return model


def _assert_same_model(out, want, atol=1e-6, logits=True):
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(out)
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k].to(a[k].dtype), atol=atol, rtol=0, msg=k)
    if logits:
        ids = torch.tensor([[1, 7, 30, 2, 99, 5]])
        with torch.no_grad():
            torch.testing.assert_close(got(ids).logits, want(ids).logits, atol=atol, rtol=0)
    return got


def test_merge_equals_peft_merge_and_unload(tiny_model, sft_adapter, tmp_path, monkeypatch):
    """Streamed into several shard files (a small shard limit): the same tensors as PEFT's merge,
    loadable with from_pretrained, with config, generation config and the tokenizer."""
    from transformers import AutoTokenizer

    from directpo.training import export

    want = _peft_merged(tiny_model, sft_adapter)
    base = _peft_merged(tiny_model)
    moved = max((want.state_dict()[k] - base.state_dict()[k]).abs().max().item() for k in base.state_dict())
    assert moved > 1e-3  # the adapter changes the model: a merge that forgot it would fail below
    monkeypatch.setattr(export, "MAX_SHARD_BYTES", 100_000)
    out = tmp_path / "merged"
    assert main(["merge", str(sft_adapter), "--out", str(out)]) == 0
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) > 1
    assert (out / "config.json").exists() and (out / "generation_config.json").exists()
    _assert_same_model(out, want)
    assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(tiny_model))
    assert json.loads((out / "merge_complete.json").read_text())["streamed"] is True
    assert main(["merge", str(sft_adapter), "--out", str(out)]) == 2  # a merged model is replaced only on request
    assert main(["merge", str(sft_adapter), "--out", str(out), "--overwrite"]) == 0
    _assert_same_model(out, want)


def test_merge_bf16(tiny_model, sft_adapter, tmp_path):
    import directpo

    out = tmp_path / "bf16"
    directpo.merge(adapter=str(sft_adapter), out=str(out), dtype="bf16")
    # the weights bit for bit (a model cast with .to() has bf16 rotary buffers too: logits not compared)
    got = _assert_same_model(out, _peft_merged(tiny_model, sft_adapter).to(torch.bfloat16), atol=0, logits=False)
    assert got.dtype == torch.bfloat16


def test_merge_arithmetic_variants_and_chains(tiny_model, tmp_path):
    """rsLoRA, alpha_pattern, LoRA on the embedding, a module trained whole (modules_to_save); and an
    adapter trained on another adapter's merged model (`train --model SFT --new-adapter`): both
    merged in turn."""
    import directpo

    first = _peft_adapter(tiny_model, tmp_path / "first", r=4, lora_alpha=8, use_rslora=True,
                          target_modules=["q_proj", "v_proj", "embed_tokens", "down_proj"],
                          alpha_pattern={"v_proj": 3.0}, modules_to_save=["lm_head"])
    second = _peft_adapter(tiny_model, tmp_path / "second", seed=1, r=2, lora_alpha=4,
                           target_modules=["o_proj", "up_proj"])
    config = json.loads((second / "adapter_config.json").read_text())
    (second / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(first)}))
    directpo.merge(adapter=str(first), out=str(tmp_path / "m1"))
    _assert_same_model(tmp_path / "m1", _peft_merged(tiny_model, first))
    record = directpo.merge(adapter=str(second), out=str(tmp_path / "m2"))
    assert record["chain"] == [str(first.resolve()), str(second.resolve())]
    _assert_same_model(tmp_path / "m2", _peft_merged(tiny_model, first, second))


def test_merge_tied_embeddings_in_memory(tiny_model, tmp_path):
    """A base with tied input/output embeddings is merged by PEFT in memory (written once, as
    save_pretrained does), and still equals merge_and_unload."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model)
    config.tie_word_embeddings = True
    tied = tmp_path / "tied"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tied)
    for f in tiny_model.glob("tokenizer*"):
        shutil.copy(f, tied / f.name)
    adapter = _peft_adapter(tied, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"])
    assert main(["merge", str(adapter), "--out", str(tmp_path / "m")]) == 0
    _assert_same_model(tmp_path / "m", _peft_merged(tied, adapter))
    assert json.loads((tmp_path / "m" / "merge_complete.json").read_text())["streamed"] is False


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_merge_refusals(tiny_model, sft_adapter, tmp_path, capsys):
    err = _one_line_error(capsys, ["merge", str(sft_adapter), "--out", str(sft_adapter)])
    assert "--out" in err and "ADAPTER_DIR" in err
    err = _one_line_error(capsys, ["merge", str(tiny_model), "--out", str(tmp_path / "x")])
    assert "not an adapter directory" in err
    err = _one_line_error(capsys, ["merge", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert "no such file or directory" in err and "nope" in err
    qlora = tmp_path / "qlora"  # an adapter that records a quantized base (no bitsandbytes needed)
    shutil.copytree(sft_adapter, qlora)
    config = json.loads((qlora / "adapter_config.json").read_text())
    (qlora / "adapter_config.json").write_text(json.dumps({**config, "quantization_config": {"load_in_4bit": True}}))
    err = _one_line_error(capsys, ["merge", str(qlora), "--out", str(tmp_path / "q")])
    assert "--dequantize" in err and "quantization_config" in err and not (tmp_path / "q").exists()
    assert main(["merge", str(qlora), "--out", str(tmp_path / "q"), "--dequantize"]) == 0  # its base is whole
    assert "quantization error" in capsys.readouterr().err  # said, as it merges into the whole base
    _assert_same_model(tmp_path / "q", _peft_merged(tiny_model, sft_adapter))
    quantized_base = tmp_path / "qbase"  # a base checkpoint saved quantized
    shutil.copytree(tiny_model, quantized_base)
    base_config = json.loads((quantized_base / "config.json").read_text())
    (quantized_base / "config.json").write_text(json.dumps({**base_config, "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True}}))
    on_qbase = tmp_path / "on-qbase"
    shutil.copytree(sft_adapter, on_qbase)
    (on_qbase / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(quantized_base)}))
    err = _one_line_error(capsys, ["merge", str(on_qbase), "--out", str(tmp_path / "q2")])
    assert "--dequantize" in err and str(quantized_base) in err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    err = _one_line_error(capsys, ["merge", str(sft_adapter), "--out", str(tmp_path / "taken")])
    assert "not empty" in err and (tmp_path / "taken" / "notes.txt").read_text() == "mine"
