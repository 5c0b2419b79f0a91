"""QLoRA (`--quantize`, issue #29): the base loaded through bitsandbytes, LoRA adapters on top, the
reference the same quantized network with its adapters disabled; refused where it cannot work."""
import json
import math
import sys

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from conftest import review_pairs, train_argv  # noqa: E402

from directpo.cli import main  # noqa: E402
from directpo.data import load_examples, make_collate, tokenize_examples  # noqa: E402
from directpo.logprobs import dataset_logps  # noqa: E402
from directpo.losses import get_loss  # noqa: E402
from directpo.models import load_tokenizer  # noqa: E402
from directpo.training import TrainConfig  # noqa: E402
from directpo.training.distributed import Dist  # noqa: E402
from directpo.training.lora import adapters_disabled, is_lora  # noqa: E402
from directpo.training.prepare import load_policy_and_reference, reference_tables  # noqa: E402

# bitsandbytes' CPU kernels on a tiny model: one thread is ~20× faster than two busy-waiting ones
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qlora(tiny_model, tmp_path_factory):
    """(settings, tokenizer, examples, the QLoRA nf4 policy as a run loads it, and its reference)."""
    data = review_pairs(tmp_path_factory.mktemp("q"), n_train=12)
    cfg = TrainConfig(model=str(tiny_model), data=str(data), output_dir=str(tmp_path_factory.mktemp("o")),
                      quantize="nf4", lora_r=4, lora_alpha=8, max_length=64, precision="fp32", ref_cache="off",
                      batch_size=4, micro_batch_size=4, progress=False).validate()
    tok = load_tokenizer(str(tiny_model))
    exs = tokenize_examples(load_examples(str(data)), tok, max_length=64)
    policy, ref = load_policy_and_reference(cfg, tok, torch.device("cpu"), get_loss("dpo"), empty=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adapters as after some training (B starts at 0: the adapters would be a no-op)
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return cfg, tok, exs, policy, ref


def _bnb_model(tiny_model, quant_type="nf4"):
    """The same base through plain transformers + bitsandbytes, nothing of directpo."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(tiny_model), quantization_config=q, dtype=torch.float32,
                                                device_map="cpu")


@torch.no_grad()
def _plain_logps(model, examples) -> torch.Tensor:
    """Σ log p(response token) per (example, response): `model(ids).logits`, log-softmax, gather;
    one unpadded sequence at a time (no packing, no fused LM head, no lean paths)."""
    out = torch.full((len(examples), 2), float("nan"))
    for i, ex in enumerate(examples):
        for k, resp in enumerate(ex.response_ids):
            ids = torch.tensor([ex.prompt_ids + resp])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
            out[i, k] = logp[len(ex.prompt_ids) - 1:].sum()
    return out


def test_quantized_policy_equals_transformers_and_bitsandbytes(qlora, tiny_model):
    """Our packed, fused log-probs of the QLoRA policy equal plain transformers + bitsandbytes on the
    same quantized weights and the same adapters, within 1e-4; the reference is the policy itself."""
    from peft import LoraConfig, get_peft_model

    cfg, tok, exs, policy, ref = qlora
    assert ref is policy and is_lora(policy)  # one copy of the quantized base
    assert type(policy.get_base_model().model.layers[0].mlp.down_proj.base_layer).__name__ == "Linear4bit"
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # the quantized base is frozen

    plain = _bnb_model(tiny_model)
    ours_sd = {k.replace(".base_layer", ""): v for k, v in policy.get_base_model().state_dict().items()}
    plain_sd = plain.state_dict()
    quantized = [k for k, v in plain_sd.items() if v.dtype == torch.uint8]
    assert len(quantized) > 14 and all(torch.equal(ours_sd[k], plain_sd[k]) for k in quantized)  # the same 4-bit codes

    collate = make_collate("packed", tok.pad_token_id)
    with adapters_disabled(policy):
        base = dataset_logps(policy, exs, collate)
    torch.testing.assert_close(base, _plain_logps(plain, exs), atol=1e-4, rtol=0)
    adapted = get_peft_model(plain, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    adapted.load_state_dict({k: v for k, v in policy.state_dict().items() if "lora_" in k}, strict=False)
    ours = dataset_logps(policy, exs, collate)
    torch.testing.assert_close(ours, _plain_logps(adapted, exs), atol=1e-4, rtol=0)
    assert (ours - base).abs().max() > 1e-2  # the adapters matter: the comparison above saw them


def test_the_reference_pass_is_the_adapter_disabled_policy_exactly(qlora):
    """The precomputed reference table (what a run trains against) equals the policy with its
    adapters disabled, bit for bit."""
    cfg, tok, exs, policy, ref = qlora
    collate = make_collate(cfg.layout, tok.pad_token_id)
    table, _ = reference_tables(cfg, Dist(), ref, exs, None, collate, torch.device("cpu"))
    with adapters_disabled(policy):
        disabled = dataset_logps(policy, exs, collate, cfg.micro_batch_size)
    assert torch.equal(table, disabled)
    assert not torch.allclose(table, dataset_logps(policy, exs, collate, cfg.micro_batch_size), atol=1e-3)


def test_qlora_dpo_trains_and_saves_the_adapter(tiny_model, tmp_path, capsys):
    """nf4 QLoRA DPO on the CLI: the first loss is log 2 (πref = the starting policy), the loss falls
    over 30 steps, and the artefact is the adapter, which loads on the unquantized base too."""
    out = tmp_path / "o"
    argv = train_argv(tiny_model, review_pairs(tmp_path), out, "--quantize", "nf4", "--lora-r", "8", "--lr", "1e-2",
                      "--optimizer", "adamw", "--max-steps", "30")
    assert main(argv) == 0
    assert "bitsandbytes' forward" not in capsys.readouterr().err  # nf4: the lean MLP and LoRA paths
    losses = [json.loads(x)["loss"] for x in open(out / "metrics.jsonl")]
    assert len(losses) == 30 and losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.05, losses
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    recorded = json.loads((out / "directpo_config.json").read_text())
    assert recorded["config"]["quantize"] == "nf4" if "config" in recorded else recorded["quantize"] == "nf4"
    from peft import AutoPeftModelForCausalLM

    assert is_lora(AutoPeftModelForCausalLM.from_pretrained(out))


@pytest.mark.parametrize("quantize", ["fp4", "int8"])
def test_fp4_and_int8_load_and_train_a_step(tiny_model, tmp_path, quantize):
    out = tmp_path / quantize
    assert main(train_argv(tiny_model, review_pairs(tmp_path), out, "--quantize", quantize, "--lora-r", "4",
                           "--lr", "1e-2", "--max-steps", "2", "--ref-cache", "off")) == 0
    losses = [json.loads(x)["loss"] for x in open(out / "metrics.jsonl")]
    # int8: LLM.int8 picks its fp16 outlier features per micro-batch, so the reference table (other
    # batches) and the first step's policy differ by ~1e-4; nf4/fp4 compute each token alike anywhere
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3 if quantize == "int8" else 1e-6)
    assert losses[1] != losses[0]


def test_qlora_live_reference_and_memory_budget(tiny_model, tmp_path, capsys):
    """--no-precompute-ref (πref live: the adapters disabled at each step) and --memory-budget
    (measured on the quantized model) work with --quantize."""
    out = tmp_path / "live"
    assert main(train_argv(tiny_model, review_pairs(tmp_path), out, "--quantize", "nf4", "--lora-r", "4",
                           "--lr", "1e-2", "--max-steps", "3", "--no-precompute-ref", "--memory-budget", "2GiB",
                           "--activation-checkpointing")) == 0
    assert "micro-batch" in capsys.readouterr().err
    losses = [json.loads(x)["loss"] for x in open(out / "metrics.jsonl")]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < losses[0]


@pytest.mark.parametrize("extra, says", [
    ([], "--quantize nf4: quantized weights do not train: add LoRA adapters with --lora-r"),
    (["--lora-r", "4", "--merge"], "--quantize nf4: merging the adapters into rounded quantized weights"),
    (["--lora-r", "4", "--fsdp"], "--quantize nf4: FSDP2 shards plain tensors"),
])
def test_combinations_that_cannot_work_are_one_line(tmp_path, capsys, extra, says):
    assert main(train_argv("m", tmp_path / "d.jsonl", tmp_path / "o", "--quantize", "nf4", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv, says", [
    (["--no-double-quant"], "--no-double-quant: only --quantize nf4 or fp4 reads it"),
    (["--quantize", "int8", "--lora-r", "4", "--no-double-quant"], "--no-double-quant is for the 4-bit formats"),
])
def test_bad_values_are_one_line(tmp_path, capsys, argv, says):
    assert main(train_argv("m", tmp_path / "d.jsonl", tmp_path / "o", *argv)) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1


def test_an_unknown_format_is_refused_on_the_command_line_and_in_yaml(tmp_path, capsys):
    from directpo.config import ConfigError, load_yaml

    with pytest.raises(SystemExit) as e:
        main(train_argv("m", tmp_path / "d.jsonl", tmp_path / "o", "--quantize", "nf3", "--lora-r", "4"))
    assert e.value.code == 2
    assert "argument --quantize: invalid choice: 'nf3' (choose from 'none', 'nf4', 'fp4', 'int8')" in \
        capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("quantize: q4\n")
    with pytest.raises(ConfigError, match="quantize") as e:
        load_yaml(str(tmp_path / "c.yaml"), TrainConfig)
    assert "q4" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv, flag", [(["--quantize", "nf4", "--lora-r", "4"], "--quantize nf4"),
                                        (["--optimizer", "adamw8bit"], "--optimizer adamw8bit")])
def test_without_bitsandbytes_the_error_names_the_extra(tmp_path, capsys, monkeypatch, argv, flag):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails as if not installed
    assert main(train_argv("m", tmp_path / "d.jsonl", tmp_path / "o", *argv)) == 2
    err = capsys.readouterr().err.strip()
    assert f"{flag} needs the bitsandbytes package: pip install 'directpo[quantize]'" in err
    assert len(err.splitlines()) == 1


def test_the_settings_are_flags_yaml_keys_and_api_keywords(tmp_path):
    import directpo
    from directpo.cli import make_parser
    from directpo.config import load_yaml

    (tmp_path / "c.yaml").write_text("quantize: fp4\ndouble_quant: false\nlora_r: 4\n")
    assert load_yaml(str(tmp_path / "c.yaml"), TrainConfig) == {"quantize": "fp4", "double_quant": False, "lora_r": 4}
    for command in ("train", "sft"):
        help_text = make_parser(command)._subparsers._group_actions[0].choices[command].format_help()
        assert "--quantize {none,nf4,fp4,int8}" in help_text and "--no-double-quant" in help_text
    from directpo.errors import UserError

    with pytest.raises(UserError, match="quantized weights do not train"):
        directpo.train(model="m", data="d", output_dir=str(tmp_path / "o"), quantize="nf4")


@pytest.mark.slow  # three fresh processes (~45 s here); the in-process stop/resume tests of test_optim.py are fast
def test_qlora_with_adamw8bit_killed_mid_checkpoint_resumes_bit_identical(tiny_model, tmp_path):
    """kill -9 while checkpoint 3 is written, then --resume: the adapter equals the uninterrupted
    run's, bit for bit (the quantized base is reloaded, the adapters and the 8-bit state restored)."""
    import signal
    import subprocess
    from pathlib import Path

    from safetensors.torch import load_file

    faults = Path(__file__).resolve().parents[1] / "faults" / "inject.py"
    data = review_pairs(tmp_path)

    def run(out, *extra, kill=None):
        argv = train_argv(tiny_model, data, out, "--quantize", "nf4", "--lora-r", "4", "--lr", "1e-2", "--optimizer",
                          "adamw8bit", "--max-steps", "5", "--save-every", "1", "--ref-cache", "off", *extra)
        cmd = [sys.executable, str(faults), "--kill-during-save", str(kill)] if kill else [sys.executable, "-m",
                                                                                              "directpo"]
        p = subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=300)
        return p.returncode, p.stderr[-2000:]

    rc, err = run(tmp_path / "full")
    assert rc == 0, err
    rc, _ = run(tmp_path / "killed", kill=3)
    assert rc == -signal.SIGKILL
    rc, err = run(tmp_path / "killed", "--resume")
    assert rc == 0 and "step 2" in err, err
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)


def test_qlora_from_an_sft_adapter_and_with_tr_dpo(tiny_model, tmp_path):
    """The adapter workflows on a quantized base: `--model SFT_ADAPTER` continues its adapter (πref
    the SFT model), and TR-DPO's reference adapter syncs on it; each starts at loss log 2 (πref =
    the starting policy) and trains."""
    data = review_pairs(tmp_path)
    common = ["--lr", "1e-2", "--max-steps", "3", "--ref-cache", "off"]
    assert main(["sft", *train_argv(tiny_model, data, tmp_path / "sft", "--lora-r", "4", *common)[1:]]) == 0
    runs = {"continue": train_argv(tmp_path / "sft", data, tmp_path / "continue", "--quantize", "nf4", *common),
            "trdpo": train_argv(tiny_model, data, tmp_path / "trdpo", "--quantize", "nf4", "--lora-r", "4",
                                "--ref-sync-every", "1", "--ref-sync-mix", "0.5", *common)}
    for name, argv in runs.items():
        assert main(argv) == 0, name
        losses = [json.loads(x)["loss"] for x in open(tmp_path / name / "metrics.jsonl")]
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and len(set(losses)) == 3, (name, losses)


def test_a_model_object_is_not_quantized_behind_the_users_back(tiny_model, tmp_path):
    import directpo
    from directpo.errors import UserError
    from directpo.models import load_model

    with pytest.raises(UserError, match="a model given as an object is used as it is"):
        directpo.train(model=load_model(str(tiny_model)), tokenizer=load_tokenizer(str(tiny_model)),
                       data=str(review_pairs(tmp_path)), output_dir=str(tmp_path / "o"), quantize="nf4", lora_r=4,
                       max_length=64, batch_size=4, micro_batch_size=4, max_steps=1, progress=False)
