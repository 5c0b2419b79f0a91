"""`directpo plan`: counts from the config alone equal the real model's, and the arithmetic is the
module docstring's, checked against a hand-computed example."""
import dataclasses
import json

import pytest

from directpo.config import ConfigError
from directpo.training.plan import HEAD_CHUNK_BYTES, PlanConfig, Shape, memory_plan, model_shape, plan


def test_counts_from_the_config_equal_the_real_model(tiny_model):
    from directpo.models import load_model
    from directpo.training.lora import apply_lora

    s = model_shape(str(tiny_model))  # meta device: no weights read
    model = load_model(str(tiny_model))
    assert s.params == sum(p.numel() for p in model.parameters())
    assert s.head == model.lm_head.weight.numel() and not s.tied
    assert s.block == sum(p.numel() for p in model.model.layers[0].parameters())
    assert (s.layers, s.hidden) == (model.config.num_hidden_layers, model.config.hidden_size)
    lora = apply_lora(model, 4, 16.0, "all-linear", 0.0)
    assert 4 * s.lora_per_rank == sum(p.numel() for p in lora.parameters() if p.requires_grad)


HAND = Shape(params=1000, head=100, block=200, layers=4, hidden=8, q_dim=8, kv_dim=8, intermediate=16,
             lora_per_rank=10, tied=False)


def _cfg(**kw):
    base = dict(model="m", nproc=4, fsdp=True, optimizer="adamw", micro_batch_size=2, batch_size=8, max_length=10,
                memory_per_device=1.0)
    return PlanConfig(**{**base, **kw})


def test_a_hand_computed_fsdp_plan():
    p = memory_plan(HAND, _cfg())["parts"]
    # weights: the 1000 parameters (the 100 of the LM head among them) over 4 devices, 4 bytes each
    assert p["weights"] == 4 * 1000 / 4 == 1000
    assert p["gradients"] == 1000
    assert p["optimizer"] == 2 * 1000  # adamw: two states
    assert p["fsdp_gathered_blocks"] == 2 * 200 * 4  # two blocks, more than the head (fp32) and one block
    big_head = memory_plan(dataclasses.replace(HAND, head=500), _cfg())["parts"]
    assert big_head["fsdp_gathered_blocks"] == 4 * 500 + 4 * 200
    assert p["reference_model"] == 0  # precomputed
    # t = 2 pairs × 2 rows × 10 tokens = 40; per layer 2·h at 4 bytes (the residual stream twice: the
    # lean norms keep no normalised input) + (2h + 3q + kv + 2i) at 4 bytes (fp32: the two norms'
    # outputs, queries and the attention output twice, keys/values, gate and up)
    per_layer = 4 * 40 * (2 * 8) + 4 * 40 * (2 * 8 + 3 * 8 + 8 + 2 * 16)
    assert per_layer == 15360
    # the head's backward: one chunk of logits at a time (HAND has no vocabulary rows, so no head gradient)
    assert p["activations"] == 4 * per_layer + 2 * (4 * 40 * 8) + HEAD_CHUNK_BYTES
    assert p["bf16_weight_copies"] == 0


def test_hand_computed_variants():
    one = memory_plan(HAND, _cfg(fsdp=False, nproc=1, optimizer="rmsprop", precompute_ref=False))["parts"]
    assert (one["weights"], one["gradients"], one["optimizer"]) == (4000, 4000, 4000)
    assert one["fsdp_gathered_blocks"] == 0 and one["reference_model"] == 4000
    lora = memory_plan(HAND, _cfg(fsdp=False, nproc=1, lora_r=2, precompute_ref=False))["parts"]
    assert lora["weights"] == 4000 + 4 * 20 and lora["gradients"] == 80 and lora["optimizer"] == 160
    assert lora["reference_model"] == 0  # the reference is the network with its adapters off
    ac = memory_plan(HAND, _cfg(activation_checkpointing=True))["parts"]
    # each layer keeps its input (4·t·h bytes); one layer recomputed with the full MLP (4i)
    assert ac["activations"] == 4 * (4 * 40 * 8) + (4 * 40 * 32 + 4 * 40 * (16 + 24 + 8 + 64)) + 2 * 1280 + \
        HEAD_CHUNK_BYTES
    bf16 = memory_plan(HAND, _cfg(precision="bf16"))["parts"]
    assert bf16["fsdp_gathered_blocks"] == 2 * 200 * 2
    # bf16: five casts of the norm output, 3q, the keys cast once more (kv + kv/2), gate and up, at 2 bytes
    assert bf16["activations"] == 4 * (4 * 40 * 16 + 2 * 40 * (5 * 8 + 24 + 12 + 32)) + 2 * 1280 + \
        HEAD_CHUNK_BYTES
    assert bf16["bf16_weight_copies"] == 0  # FSDP gathers bf16 weights
    whole = memory_plan(HAND, _cfg(precision="bf16", fsdp=False, nproc=1))["parts"]
    assert whole["bf16_weight_copies"] == 2 * 4 * (200 - 8 * 16)  # all block weights but the down projection
    lora16 = memory_plan(HAND, _cfg(precision="bf16", fsdp=False, nproc=1, lora_r=2))["parts"]
    assert lora16["bf16_weight_copies"] == 2 * 4 * (200 - 8 * 16)  # LoRA's down projection runs lean too
    headed = dataclasses.replace(HAND, vocab=100)
    trains = memory_plan(headed, _cfg())["parts"]["activations"]
    assert trains - memory_plan(HAND, _cfg())["parts"]["activations"] == 4 * 100 * 8  # the head's gradient of this micro-batch
    assert memory_plan(headed, _cfg(lora_r=2))["parts"]["activations"] == \
        memory_plan(HAND, _cfg(lora_r=2))["parts"]["activations"]  # a frozen head has no gradient
    off = memory_plan(HAND, _cfg(fsdp_cpu_offload=True))  # every shard leaves the device, the head's too
    assert off["parts"]["weights"] == 0 and off["host"]["weights"] == 1000
    assert off["parts"]["optimizer"] == 0 and off["host"]["optimizer"] == 2 * 1000


def test_fit_the_largest_micro_batch_and_a_suggestion():
    """A budget that holds the fixed parts and the head's chunk plus the activations of 2 pairs but
    not of 4: the largest micro-batch is 2, and the suggestion is to use it."""
    cfg = _cfg(micro_batch_size=4, batch_size=16)
    fixed = 1000 + 1000 + 2000 + 1600 + HEAD_CHUNK_BYTES
    per_pair = (4 * 15360 + 2 * 1280) // 2  # activations of one pair, the chunk aside
    cfg.memory_per_device = (fixed + 3 * per_pair) / 0.9 / 1024 ** 3
    r = plan(cfg, shape=HAND)
    assert not r["plan"]["fits"] and r["plan"]["largest_micro_batch"] == 2
    assert r["suggestion"]["change"] == {"micro_batch_size": 2}


def test_fsdp_setup_needs_a_ranks_shards_not_the_model():
    """8 devices, SGD: no rank ever holds the whole model (4·P bytes): at setup a rank holds its
    shards (it reads its own rows of each tensor straight into them)."""
    big = Shape(**{**HAND.__dict__, "params": 10 ** 8, "head": 1000, "block": 10 ** 7})
    r = plan(_cfg(nproc=8, optimizer="sgd", memory_per_device=3e8 / 0.9 / 1024 ** 3), shape=big)
    p = r["plan"]
    assert p["setup_rank0"] == p["parts"]["weights"] == 4 * 10 ** 8 / 8
    assert p["setup_rank0"] <= p["total"] < 3e8 and p["fits"]


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="multiple of --micro-batch-size"):
        _cfg(micro_batch_size=3).validate()
    with pytest.raises(ValueError, match="tied"):
        memory_plan(Shape(**{**HAND.__dict__, "tied": True, "head": 0}), _cfg())


def test_the_command_prints_a_table_and_json(tiny_model, capsys):
    from directpo.cli import main

    argv = ["plan", "--model", str(tiny_model), "--memory-per-device", "1"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "total per device" in table and "fits: yes" in table
    assert main([*argv, "--json", "--nproc", "2", "--fsdp"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["plan"]["fits"] and result["shape"]["params"] > 0
    assert result["plan"]["parts"]["fsdp_gathered_blocks"] > 0
    assert main(["plan", "--model", str(tiny_model), "--fsdp-cpu-offload"]) == 2  # a one-line error
    assert "needs --fsdp" in capsys.readouterr().err


def test_small_parts_are_said_in_kib_not_as_zero_mib():
    """#27 item 9's sizes: a part below a tenth of a MiB (LoRA's gradients of a small model) was "0.00 MiB"."""
    from directpo.cli.plan import format_plan

    text = format_plan(plan(_cfg(fsdp=False, nproc=1, lora_r=2), shape=HAND))
    assert "gradients" in text and "KiB" in text and " 0.00 MiB" not in text


def test_the_plan_says_what_glibcs_default_heap_held_beyond_it_by_mode():
    """#29: on the CPU the plan is what a run holds with its heap bounded; under glibc's default a run
    held more, measured per mode (full < LoRA < QLoRA): the plan says the factor of its own mode."""
    from directpo.cli.plan import format_plan
    from directpo.training.plan import CPU_DEFAULT_HEAP

    factors = []
    for extra in ({}, {"lora_r": 2}, {"lora_r": 2, "quantize": "nf4"}):
        result = plan(_cfg(fsdp=False, nproc=1, **extra), shape=HAND)
        factors.append(result["cpu_default_heap_factor"])
        assert f"up to {factors[-1]:.2f}× it" in format_plan(result)
    assert factors == [CPU_DEFAULT_HEAP[k] for k in ("full", "lora", "qlora")] and factors == sorted(set(factors))


# ---- QLoRA and 8-bit optimizers (#29 items 1, 2) ----

def _held_bytes(model) -> int:
    """Bytes the model's parameters hold, with bitsandbytes' quantization state (absmaxes, code
    tables, offsets, row scales): every distinct storage once."""
    import torch

    seen = {}

    def add(t):
        if isinstance(t, torch.Tensor):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for p in model.parameters():
        add(p)
        qs = getattr(p, "quant_state", None)
        for part in (qs, getattr(qs, "state2", None)):
            for name in ("absmax", "code", "offset"):
                add(getattr(part, name, None))
        add(getattr(p, "SCB", None))
    return sum(seen.values())


@pytest.mark.parametrize("quantize, double_quant", [("nf4", True), ("nf4", False), ("fp4", True), ("int8", True)])
def test_quantized_weights_are_counted_as_bitsandbytes_holds_them(tiny_model, quantize, double_quant):
    """`plan --quantize`'s weights equal the bytes the loaded QLoRA model holds, exactly."""
    pytest.importorskip("bitsandbytes")
    from directpo.models import load_model
    from directpo.training.lora import apply_lora

    s = model_shape(str(tiny_model))
    cfg = PlanConfig(model="m", lora_r=4, quantize=quantize, double_quant=double_quant).validate()
    model = apply_lora(load_model(str(tiny_model), quantize=quantize, double_quant=double_quant), 4, 16.0,
                       "all-linear")
    assert memory_plan(s, cfg)["parts"]["weights"] == _held_bytes(model)
    whole = memory_plan(s, PlanConfig(model="m", lora_r=4))["parts"]["weights"]
    assert memory_plan(s, cfg)["parts"]["weights"] < whole  # (a tiny model: the embeddings dominate)


def test_four_bit_weights_by_the_stated_formula():
    """nf4 on one 128 × 128 layer (16384 weights): n/2 codes + n/64 absmax bytes + 4·⌈256/256⌉ for
    the absmaxes' absmax + 1092 of code tables and offset = 0.5 + 1/64 byte per weight + constants;
    without double quantization n/2 + 4·n/64 + 64; int8 n + 4·128."""
    shape = dataclasses.replace(HAND, params=16384 + 100, linears=[[128, 128, 1]])
    base = dict(model="m", lora_r=1, optimizer="sgd")

    def quantized(**kw):
        lora = 4 * 1 * HAND.lora_per_rank
        return memory_plan(shape, PlanConfig(**base, **kw))["parts"]["weights"] - 4 * 100 - lora

    assert quantized(quantize="nf4") == 8192 + 256 + 4 + 1092
    assert quantized(quantize="fp4", double_quant=False) == 8192 + 4 * 256 + 64
    assert quantized(quantize="int8") == 16384 + 4 * 128
    assert memory_plan(shape, PlanConfig(**base, quantize="nf4"))["parts"]["dequantized_weight"] == 4 * 16384


def test_a_4bit_base_keeps_the_lean_mlps_activations_int8_does_not():
    """nf4/fp4: the lean SwiGLU takes the 4-bit down projection (`directpo.fused`), so the activations
    are LoRA's; int8 runs op by op: 2 (tokens × intermediate) fp32 tensors more per layer."""
    def acts(**kw):
        return memory_plan(HAND, _cfg(fsdp=False, nproc=1, lora_r=2, **kw))["parts"]["activations"]

    assert acts(quantize="nf4") == acts(quantize="fp4") == acts()
    assert acts(quantize="int8") - acts() == 4 * 4 * 40 * 2 * 16  # layers × 4 bytes × t × 2i


@pytest.mark.parametrize("lora_r", [0, 4, 32])
def test_8bit_adamw_state_is_counted_as_bitsandbytes_holds_it(tiny_model, lora_r):
    """`plan --optimizer adamw8bit`'s optimizer state equals the state bitsandbytes holds after a
    step: full fine-tuning (8-bit moments for the large tensors, fp32 for those under 4096 values),
    LoRA r 4 (every adapter small: fp32) and r 32 (some 8-bit)."""
    pytest.importorskip("bitsandbytes")
    import torch

    from directpo.models import load_model
    from directpo.training.lora import apply_lora
    from directpo.training.optim import build_optimizer

    model = load_model(str(tiny_model))
    if lora_r:
        model = apply_lora(model, lora_r, 16.0, "all-linear")
    opt = build_optimizer(model.parameters(), "adamw8bit", 1e-3)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    opt.step()
    held = {}
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim():  # (the step counter aside)
                held[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    s = model_shape(str(tiny_model))
    planned = memory_plan(s, PlanConfig(model="m", lora_r=lora_r, optimizer="adamw8bit"))["parts"]["optimizer"]
    assert planned == sum(held.values())
    if not lora_r:  # ~2 bytes a parameter, well under adamw's 8
        assert planned < 0.5 * memory_plan(s, PlanConfig(model="m", optimizer="adamw"))["parts"]["optimizer"]


def test_quantize_in_plan_is_refused_where_it_cannot_work(tiny_model, capsys):
    from directpo.cli import main

    assert main(["plan", "--model", str(tiny_model), "--quantize", "nf4"]) == 2
    assert "--quantize nf4: quantized weights do not train: add --lora-r" in capsys.readouterr().err
    assert main(["plan", "--model", str(tiny_model), "--quantize", "int8", "--lora-r", "4",
                 "--no-double-quant"]) == 2
    assert "--no-double-quant: only --quantize nf4 or fp4 reads it" in capsys.readouterr().err
    assert main(["plan", "--model", str(tiny_model), "--lora-r", "4", "--quantize", "nf4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["quantize"] == "nf4" and out["plan"]["parts"]["dequantized_weight"] > 0


def test_plan_reads_a_vision_language_model(tmp_path):
    """`directpo plan --model VLM` (it was a traceback): the language model's blocks are the layers,
    every weight (vision tower included) is counted."""
    from transformers import AutoModelForImageTextToText

    from directpo.toy import build_tiny_vlm
    from directpo.training.plan import model_shape

    out = build_tiny_vlm(tmp_path / "vlm", "qwen2_vl", ["What colour is it? It is red."] * 8, layers=3)
    s = model_shape(str(out))
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert s.layers == 3 == model.config.text_config.num_hidden_layers
    assert s.params == sum(p.numel() for p in model.parameters())
    assert s.hidden == model.config.text_config.hidden_size
