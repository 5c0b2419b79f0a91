"""DPO on vision-language models (issue #30): which part trains, the processor saved with the model,
the refusals, and the colour task (the preference depends on the image) learnt on the CPU."""
import json

import pytest
import torch

from directpo.errors import UserValueError
from directpo.toy import COLOURS, build_tiny_vlm, colour_image_task
from directpo.training import TrainConfig
from directpo.training.vlm import freeze_vision, language_model, lora_targets, run_processor, vision_modules
from directpo.vision import load_vision_model

TEXTS = [f"What colour is this picture? It is {c}." for c in COLOURS] * 8


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("qwen2_vl"), "qwen2_vl", TEXTS, seed=0)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("llava"), "llava", TEXTS, seed=0)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return colour_image_task(tmp_path_factory.mktemp("colours"), n_train=64, n_eval=32, seed=0)


def test_vision_side_and_language_model_are_told_apart(llava):
    model = load_vision_model(str(llava))
    lm = language_model(model)
    assert lm is model.model.language_model
    assert set(vision_modules(model)) == {"vision_tower", "multi_modal_projector"}
    n = freeze_vision(model)
    assert n == sum(p.numel() for p in model.model.vision_tower.parameters()) + \
        sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    assert all(p.requires_grad for p in lm.parameters()) and model.lm_head.weight.requires_grad


def test_lora_targets_the_language_model_alone(llava):
    """CLIP's attention has q_proj/v_proj as the language model's does: a bare name would adapt both."""
    from directpo.training.lora import apply_lora

    model = load_vision_model(str(llava))
    targets = lora_targets(model, "q_proj,v_proj", freeze=True)
    assert all(t.startswith("model.language_model.") for t in targets.split(","))
    assert len(targets.split(",")) == 2 * model.config.text_config.num_hidden_layers
    peft_model = apply_lora(model, 4, 8, targets)
    adapted = {n.split(".lora_A")[0] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert adapted and all(".language_model." in n for n in adapted)
    everything = lora_targets(model, "all-linear", freeze=False)
    assert everything == "all-linear"  # --no-freeze-vision: PEFT's own all-linear, the vision side included
    with pytest.raises(UserValueError, match="no linear layer of the language model matches"):
        lora_targets(model, "nonexistent", freeze=True)


def _accuracy(result) -> float:
    return result.eval["rewards/accuracies"]


def test_dpo_on_images_trains_the_language_model_and_saves_the_processor(qwen, colours, tmp_path):
    from transformers import AutoModelForImageTextToText

    import directpo
    from directpo.vision import load_processor

    train, held_out = colours
    before = load_vision_model(str(qwen))
    out = tmp_path / "run"
    directpo.train(model=str(qwen), data=str(train), eval_data=str(held_out), output_dir=str(out), batch_size=8,
                   micro_batch_size=8, max_steps=3, lr=1e-3, optimizer="adamw", warmup_steps=0, threads=1,
                   progress=False, ref_cache="off")
    after = AutoModelForImageTextToText.from_pretrained(out)
    assert load_processor(str(out)) is not None  # the processor went with the model
    moved = {n for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters()) if not torch.equal(a, b)}
    assert moved and all(".visual." not in f".{n}" for n in moved), sorted(moved)[:5]
    assert any("language_model" in n for n in moved)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/rewards/accuracies" in line or "rewards/accuracies" in line for line in lines)


def test_lora_on_a_vlm_saves_language_model_adapters_only(qwen, colours, tmp_path):
    import directpo

    train, held_out = colours
    out = tmp_path / "lora"
    directpo.train(model=str(qwen), data=str(train), output_dir=str(out), batch_size=8, micro_batch_size=8,
                   max_steps=2, lr=1e-3, optimizer="adamw", warmup_steps=0, threads=1, progress=False,
                   ref_cache="off", lora_r=4)
    from safetensors.torch import load_file

    names = list(load_file(out / "adapter_model.safetensors"))
    assert names and all("language_model" in n for n in names), names[:4]
    assert (out / "processor_config.json").exists() or (out / "preprocessor_config.json").exists()


def _swap_images(rows_file, out_file):
    """Each held-out row with the picture of another row whose colour is this row's *rejected*
    answer: the text now names the wrong colour as chosen."""
    rows = [json.loads(line) for line in open(rows_file)]
    colour_of = {r["chosen"][0]["content"]: r["images"] for r in rows}
    swapped = [{**r, "images": colour_of[r["rejected"][0]["content"]]} for r in rows]
    out_file.write_text("".join(json.dumps(r) + "\n" for r in swapped))
    return out_file


def _held_out_accuracy(policy_dir, ref_dir, data):
    from directpo.data import load_examples, make_collate
    from directpo.data.vision_tokenize import tokenize_vision_examples
    from directpo.logprobs import dataset_logps
    from directpo.vision import load_processor

    processor = load_processor(str(ref_dir))
    examples, _ = tokenize_vision_examples(load_examples(str(data)), processor, 128)
    collate = make_collate("packed", processor.tokenizer.pad_token_id)
    pol = dataset_logps(load_vision_model(str(policy_dir)), examples, collate)
    ref = dataset_logps(load_vision_model(str(ref_dir)), examples, collate)
    margin = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
    return (margin > 0).float().mean().item()


@pytest.mark.slow
def test_colour_task_reaches_held_out_reward_accuracy(qwen, colours, tmp_path):
    """The acceptance of #30: the chosen answer names the picture's colour; DPO on 64 pairs reaches
    held-out implicit-reward accuracy ≥ 0.9. The control: the same held-out pairs with each picture
    replaced by one of the rejected answer's colour are mostly ranked the other way round (≤ 0.25;
    a model blind to the picture would sit near 0.5: P(≤ 8 of 32 | p = 0.5) ≈ 0.004), so the model reads the picture (the texts alone carry no signal: every colour is chosen over every
    other as often as the reverse)."""
    import directpo

    train, held_out = colours
    out = tmp_path / "run"
    result = directpo.train(model=str(qwen), data=str(train), eval_data=str(held_out), output_dir=str(out),
                            batch_size=16, micro_batch_size=16, max_steps=30, lr=3e-3, optimizer="adamw",
                            warmup_steps=0, beta=0.1, threads=2, progress=False, ref_cache="off")
    assert _accuracy(result) >= 0.9
    assert _held_out_accuracy(out, qwen, held_out) >= 0.9  # (the library's own computation agrees)
    assert _held_out_accuracy(out, qwen, _swap_images(held_out, held_out.parent / "swapped.jsonl")) <= 0.25


def _cli(argv):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "directpo", *argv], capture_output=True, text=True, timeout=600)
    return p.returncode, p.stderr


def _vlm_argv(model, data, out, steps, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--lr", "1e-3",
            "--optimizer", "adamw", "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", str(steps),
            "--warmup-steps", "1", "--save-every", "1", "--no-progress", "--threads", "1", "--ref-cache", "off",
            *extra]


def test_a_vlm_run_resumes_bit_identical(qwen, colours, tmp_path):
    """Stopped after 2 of 4 steps and resumed, a VLM run ends with the weights of an uninterrupted one."""
    from safetensors.torch import load_file

    train, _ = colours
    rc, err = _cli(_vlm_argv(qwen, train, tmp_path / "full", 4))
    assert rc == 0, err
    rc, err = _cli(_vlm_argv(qwen, train, tmp_path / "cut", 2))
    assert rc == 0, err
    rc, err = _cli(_vlm_argv(qwen, train, tmp_path / "cut", 4, "--resume"))
    assert rc == 0, err
    assert "resumed from" in err
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_vlm_trains_over_two_processes(qwen, colours, tmp_path):
    """DDP (`--nproc 2`): each process computes its share of the reference table and of every batch;
    the result equals one process's run up to float re-association."""
    from safetensors.torch import load_file

    train, _ = colours
    rc, err = _cli(_vlm_argv(qwen, train, tmp_path / "one", 3))
    assert rc == 0, err
    rc, err = _cli(_vlm_argv(qwen, train, tmp_path / "two", 3, "--nproc", "2"))
    assert rc == 0, err
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


@pytest.mark.parametrize("lora", [[], ["--lora-r", "2"]], ids=["full", "lora"])
def test_the_papers_pipeline_on_a_vlm(qwen, colours, tmp_path, lora):
    """`directpo pipeline`: Preferred-FT on the chosen answers (with their pictures), then DPO from and
    against that SFT model; the SFT stage's folder carries the processor the DPO stage loads."""
    train, _ = colours
    argv = ["pipeline", "--model", str(qwen), "--data", str(train), "--output-dir", str(tmp_path / "p"),
            "--lr", "1e-3", "--optimizer", "adamw", "--batch-size", "8", "--micro-batch-size", "8",
            "--max-steps", "2", "--sft-max-steps", "2", "--warmup-steps", "0", "--no-progress", "--threads", "1",
            "--ref-cache", "off", *lora]
    rc, err = _cli(argv)
    assert rc == 0, err
    stages = sorted(p.name for p in (tmp_path / "p").iterdir() if p.is_dir())
    assert len(stages) >= 2
    for stage in stages:
        assert (tmp_path / "p" / stage / "run_complete.json").exists(), stages
        if not lora:
            load_vision_model(str(tmp_path / "p" / stage))  # each stage's model loads as a VLM


def test_memory_budget_counts_the_image_tokens(qwen, colours, tmp_path):
    """--memory-budget measures the activations of real micro-batches, images and their tokens included:
    the planned longest micro-batch is the collated batch of the longest pairs, image tokens counted."""
    train, _ = colours
    rc, err = _cli(_vlm_argv(qwen, train, tmp_path / "b", 1, "--memory-budget", "4GiB", "--batch-size", "8"))
    assert rc == 0, err
    import re

    line = next(x for x in err.splitlines() if "--memory-budget" in x and "micro-batch" in x)
    tokens = int(re.search(r"micro-batch, (\d+) tokens", line).group(1))
    from directpo.data import load_examples, make_collate
    from directpo.data.vision_tokenize import tokenize_vision_examples
    from directpo.vision import load_processor

    processor = load_processor(str(qwen))
    examples, _ = tokenize_vision_examples(load_examples(str(train)), processor, 512)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert sum(ex.prompt_ids.count(image_id) for ex in examples[:8]) > 0
    longest = sorted(examples, key=lambda ex: ex.num_tokens, reverse=True)[:8]
    assert tokens == make_collate("packed", processor.tokenizer.pad_token_id)(longest).input_ids.numel()


def test_adapter_workflows_on_a_vlm(qwen, colours, tmp_path):
    """SFT with LoRA, then DPO from that adapter (πref = the SFT model: the first step's loss is ln 2),
    a new adapter on it (--lora-r), and the SFT adapter as a separate reference (--ref ADAPTER_DIR)."""
    import math

    train, _ = colours
    rc, err = _cli(_vlm_argv(qwen, train, tmp_path / "sft", 2, "--lora-r", "2", "--loss", "sft", "--lr", "1e-2"))
    assert rc == 0, err
    for name, model, extra in [("continued", tmp_path / "sft", ()), ("new", tmp_path / "sft", ("--lora-r", "2")),
                               ("ref", qwen, ("--lora-r", "2", "--ref", str(tmp_path / "sft")))]:
        rc, err = _cli(_vlm_argv(model, train, tmp_path / name, 1, *extra))
        assert rc == 0, (name, err)
        first = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
        if name != "ref":  # policy = πref at step 1
            assert abs(first["loss"] - math.log(2)) < 1e-5, (name, first["loss"])
        else:  # the base against the SFT adapter: they differ
            assert abs(first["loss"] - math.log(2)) > 1e-4, first["loss"]


def test_qlora_on_a_vlm_quantizes_the_language_model_alone(qwen, colours, tmp_path):
    """--quantize nf4 --lora-r: the language model's linear layers 4-bit, the vision tower, its
    projector and the LM head as they were; adapters on the language model; the run trains."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    import directpo
    from directpo.vision import load_vision_model as load

    model = load(str(qwen), quantize="nf4")
    four_bit = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit and all(n.startswith("model.language_model.") for n in four_bit)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.model.visual.modules())
    assert type(model.lm_head) is torch.nn.Linear
    train, _ = colours
    out = tmp_path / "q"
    result = directpo.train(model=str(qwen), data=str(train), output_dir=str(out), batch_size=8, micro_batch_size=8,
                            max_steps=2, lr=1e-3, optimizer="adamw", warmup_steps=0, threads=1, progress=False,
                            ref_cache="off", lora_r=4, quantize="nf4")
    assert result.train["loss"] > 0
    from safetensors.torch import load_file

    names = list(load_file(out / "adapter_model.safetensors"))
    assert names and all("language_model" in n for n in names)


def test_fixed_length_is_refused_for_image_rows(qwen, colours, tmp_path, capsys):
    """--fixed-length reads plain text rows; a VLM's rows are conversations (one line, exit 2, nothing written)."""
    from directpo.cli import main

    train, _ = colours
    assert main(_vlm_argv(qwen, train, tmp_path / "run", 1, "--fixed-length")) == 2
    assert "--fixed-length reads plain text rows" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert main(["score", "--model", str(qwen), "--data", str(train), "--out", str(tmp_path / "s.jsonl"),
                 "--fixed-length"]) == 2
    assert "--fixed-length reads plain text rows" in capsys.readouterr().err and not (tmp_path / "s.jsonl").exists()
