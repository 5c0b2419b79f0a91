"""The CUDA paths against the CPU ones: run where a GPU is (skipped elsewhere, so on CI).

On CUDA the packed layout attends through one compiled FlexAttention call per layer with the
layout's block mask (`directpo.attention`), training runs bf16 under `--precision auto`, and the LM
head keeps its last chunk on the device. These tests check each against the per-segment SDPA
kernel and the CPU, which the rest of the suite covers in depth. `scripts/gpu_check.sh` runs them
on a lent GPU.
"""
import json

import pytest
import torch

from directpo.data import Example, collate_packed, tokenize_example
from directpo.logprobs import ONE_ROW, example_logps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _batch(tok, row_tokens):
    exs = [Example("Review of Kalo:", [" It was great, warm and fresh.", " It was dull."], "t", 0),
           Example("Hi", [" ok", " no thanks, it was messy and weak and flat.", " maybe", " sure!"], "t", 1),
           Example("Q", [" a b", " c"], "t", 2)]
    return collate_packed([tokenize_example(e, tok) for e in exs], tok.pad_token_id, row_tokens)


def _logps_and_grads(model, batch, kernel, monkeypatch, autocast=None):
    monkeypatch.setenv("DIRECTPO_SEGMENT_KERNEL", kernel)
    model.zero_grad()
    with torch.autocast("cuda", dtype=autocast or torch.float32, enabled=autocast is not None):
        lp = example_logps(model, batch)
    lp.nan_to_num().sum().backward()
    return lp.detach().cpu(), {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("row_tokens", [ONE_ROW, 24])
def test_flex_on_cuda_equals_per_segment_sdpa_and_the_cpu_with_gradients(tiny_tokenizer, monkeypatch, row_tokens):
    """Compiled FlexAttention with the block mask = per-segment SDPA on CUDA = the CPU, log-probs
    and every parameter's gradient (fp32; grouped keys/values, padding, a ranking of 4)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128)
    cpu_model = LlamaForCausalLM(cfg)
    batch = _batch(tiny_tokenizer, row_tokens)
    cpu_lp, cpu_grads = _logps_and_grads(cpu_model, batch, "sdpa", monkeypatch)
    model = cpu_model.to("cuda")
    gpu_batch = batch.to("cuda")
    for kernel in ("flex", "sdpa"):
        lp, grads = _logps_and_grads(model, gpu_batch, kernel, monkeypatch)
        assert torch.equal(lp.isnan(), cpu_lp.isnan())
        assert torch.allclose(lp.nan_to_num(), cpu_lp.nan_to_num(), atol=1e-4), kernel
        for n, g in grads.items():
            assert torch.allclose(g, cpu_grads[n], atol=1e-4, rtol=1e-3), (kernel, n)


def test_bf16_on_cuda_within_1e_2_of_fp32_per_sequence(tiny_model, tiny_tokenizer, monkeypatch):
    """bf16 autocast on the GPU (what `--precision auto` picks there): summed response log-probs
    within 1e-2 of fp32 per sequence, as on the CPU (tests/test_precision.py)."""
    from directpo.models import load_model

    model = load_model(str(tiny_model)).to("cuda")
    batch = _batch(tiny_tokenizer, ONE_ROW).to("cuda")
    fp32, _ = _logps_and_grads(model, batch, "auto", monkeypatch)
    bf16, _ = _logps_and_grads(model, batch, "auto", monkeypatch, autocast=torch.bfloat16)
    assert not torch.equal(bf16, fp32)  # bf16 did run
    assert (bf16 - fp32).nan_to_num().abs().max() < 1e-2


def test_a_cuda_run_follows_the_cpu_run(tiny_model, tmp_path, monkeypatch):
    """`directpo train --device cuda --precision fp32` for 3 steps: the same losses as on the CPU
    (within fp32 summation-order differences), and `auto` resolves to bf16 there and says why."""
    from directpo.toy import review_task, write_jsonl
    from directpo.training import TrainConfig, train

    monkeypatch.delenv("DIRECTPO_AUTO_PRECISION", raising=False)  # the suite pins auto to fp32 (conftest)
    data = tmp_path / "train.jsonl"
    write_jsonl(review_task(n_train=16, n_eval=4, seed=1)[0], data)
    losses, resolved = {}, {}
    for i, (device, precision) in enumerate((("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "auto"))):
        out = tmp_path / f"run{i}"
        train(TrainConfig(model=str(tiny_model), data=str(data), output_dir=str(out), batch_size=4, micro_batch_size=2,
                          max_steps=3, warmup_steps=0, lr=1e-3, progress=False, max_length=48, device=device,
                          precision=precision))
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[device, precision] = [r["loss"] for r in rows if r.get("split") == "train"]
        resolved[device, precision] = json.loads((out / "directpo_config.json").read_text())["precision_resolved"]
    assert len(losses["cpu", "fp32"]) == 3
    assert losses["cuda", "fp32"] == pytest.approx(losses["cpu", "fp32"], abs=1e-4)
    assert losses["cuda", "auto"] == pytest.approx(losses["cpu", "fp32"], abs=2e-2)
    assert resolved == {("cpu", "fp32"): "fp32", ("cuda", "fp32"): "fp32", ("cuda", "auto"): "bf16"}
