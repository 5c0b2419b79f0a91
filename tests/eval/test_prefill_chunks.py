"""Chunked prefill (issue #32): text prompts longer than `PREFILL_CHUNK` columns are fed in chunks
through the cache. The same computation as one forward: the cache's keys and values at every prompt
token and the last logits equal the one-shot prefill's (left padding, rows whose first chunks are all
padding, no NaN), seeded samples are unchanged (plain and shared-prompt decoding), image prompts
still go in one forward, and the memory probe measures the chunked prefill."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from directpo.eval import sampling
from directpo.eval.budget import live_bytes
from directpo.eval.sampling import generate_completions, measure_costs
from directpo.models import load_model, load_tokenizer

from conftest import spread_weights

pytestmark = pytest.mark.usefixtures("one_thread")
FORWARD = sampling._forward


def _count_forwards(monkeypatch) -> list[int]:
    """The columns of each forward the sampler makes from now on (one entry per call)."""
    calls: list[int] = []
    monkeypatch.setattr(sampling, "_forward", lambda m, **kw: calls.append(kw["input_ids"].shape[1]) or FORWARD(m, **kw))
    return calls


def _small(kind: str):
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    if kind == "qwen2":  # (biases on q, k, v)
        return spread_weights(Qwen2ForCausalLM(Qwen2Config(**common))).eval()
    return spread_weights(LlamaForCausalLM(LlamaConfig(**common))).eval()


def _prefill(model, prompts, chunk, monkeypatch, share_prefix=False):
    monkeypatch.setattr(sampling, "PREFILL_CHUNK", chunk)
    calls = _count_forwards(monkeypatch)
    with torch.no_grad():
        got = sampling._prefill(model, prompts, 0, max(map(len, prompts)) + 4, share_prefix, sampling._cache_kw(model))
    return got, calls


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_chunked_prefill_is_the_one_shot_prefill(kind, monkeypatch):
    """Chunks of 4 columns over prompts of 1 to 11 tokens (a row padded through its first two
    chunks, one through all but its last): every real position's keys and values and the last
    logits equal one forward's within fp32 rounding, and nothing anywhere in the cache is NaN."""
    model = _small(kind)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 97, (n,), generator=gen).tolist() for n in (11, 3, 7, 1, 9)]
    (c1, l1, p1, m1, _), one = _prefill(model, prompts, 1000, monkeypatch)
    (c4, l4, p4, m4, _), chunks = _prefill(model, prompts, 4, monkeypatch)
    assert one == [11] and chunks == [4, 4, 3]
    real = m1.bool()  # (rows, P): the prompt tokens, not the padding
    for a, b in zip(c1.layers, c4.layers):
        assert a.length == b.length == 11
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            assert torch.isfinite(y).all()
            torch.testing.assert_close(y.transpose(1, 2)[real], x.transpose(1, 2)[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(l4, l1, rtol=0, atol=1e-5)
    assert torch.equal(p4, p1) and torch.equal(m4, m1)


def test_prompts_that_fit_one_chunk_go_in_one_forward(monkeypatch):
    """No chunks where one holds the prompts; unpadded prompts (no mask: the causal one after the cache) chunk exactly."""
    model = _small("llama")
    _, calls = _prefill(model, [[5, 6, 7], [8, 9]], 3, monkeypatch)
    assert calls == [3]
    (_, want, _, _, _), _ = _prefill(model, [[5, 6, 7, 8, 9, 10, 11]], 7, monkeypatch)
    (_, got, _, _, _), calls = _prefill(model, [[5, 6, 7, 8, 9, 10, 11]], 3, monkeypatch)  # (unpadded: no mask)
    assert calls == [3, 3, 1]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_shared_prompts_are_prefilled_once_in_chunks(monkeypatch):
    """K repeats of a prompt: its distinct rows are prefilled, chunked, and the decode shares them."""
    model = _small("llama")
    prompts = [p for p in ([3, 4, 5, 6, 7, 8, 9], [10, 11]) for _ in range(3)]
    (cache, logits, _, _, sharing), calls = _prefill(model, prompts, 3, monkeypatch, share_prefix=True)
    (_, want, _, _, _), _ = _prefill(model, prompts, 100, monkeypatch, share_prefix=True)
    assert calls == [3, 3, 1] and sharing is not None and cache.layers[0].prefix[0].shape[0] == 2
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("lean", [True, False])
def test_seeded_samples_are_unchanged_by_chunking(tiny_model, monkeypatch, k, lean):
    """Prompts of different lengths (padding), K samples a prompt (shared keys at K = 4), through the
    lean decode step or the model's forward: the same samples with 3-column chunks as in one forward."""
    model, tok = load_model(str(tiny_model)).eval(), load_tokenizer(str(tiny_model))
    if not lean:
        monkeypatch.setattr(sampling, "lean_decoder", lambda m: None)
    texts = ("Review of Kalo:", "A long review of Mirento, the film, and of its sequel:", "Sa")
    rows = [tok(t)["input_ids"] for t in texts for _ in range(k)]
    assert max(map(len, rows)) > 6
    calls = _count_forwards(monkeypatch)
    one = generate_completions(model, tok, rows, 12, 1.0, 1.0, seed=5, batch_size=len(rows))
    assert max(calls) > 3
    monkeypatch.setattr(sampling, "PREFILL_CHUNK", 3)
    calls.clear()
    chunked = generate_completions(model, tok, rows, 12, 1.0, 1.0, seed=5, batch_size=len(rows))
    assert calls[:2] == [3, 3]  # (the prefill went in chunks)
    assert chunked == one and len({tuple(r) for r in one}) > len(texts) // 2


def test_the_memory_probe_measures_the_chunked_prefill(monkeypatch):
    """`measure_costs` probes the sampler's own prefill: with chunks its measured forward per row is
    smaller than one forward over the whole prompt's (the temporaries scale with the chunk), and the
    tensors of a real chunked prefill of that many rows stay under what the probe's line gives them."""
    model = _small("llama")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 97, (96,), generator=gen).tolist() for _ in range(4)]
    whole = measure_costs(model, prompts, 4, 1.0, 0)
    monkeypatch.setattr(sampling, "PREFILL_CHUNK", 16)
    chunked = measure_costs(model, prompts, 4, 1.0, 0)
    assert chunked.prefill[1] < 0.6 * whole.prefill[1]
    with live_bytes() as live, torch.no_grad():
        cache, *_ = sampling._prefill(model, prompts, 0, 100, False, sampling._cache_kw(model))
    made = live.peak - sum(t.untyped_storage().nbytes() for layer in cache.layers for t in (layer._k, layer._v))
    assert made <= chunked.prefill[0] + 4 * chunked.prefill[1]


def test_image_prompts_are_prefilled_in_one_forward(tmp_path, monkeypatch):
    """A vision-language model's image prompts (Qwen2-VL: M-RoPE, image placeholder tokens) are never
    cut, whatever `PREFILL_CHUNK` says: one prefill forward, and the same samples as before."""
    from PIL import Image

    from directpo.data.images import image_ref
    from directpo.data.prompts import PromptItem
    from directpo.eval.sample import encode_image_samples
    from directpo.toy import COLOURS, build_tiny_vlm
    from directpo.vision import load_processor, load_vision_model

    texts = [f"What colour is this picture? It is {c}." for c in COLOURS] * 4
    out = build_tiny_vlm(tmp_path / "m", "qwen2_vl", texts, image_size=56, vision_layers=1, vision_hidden=32)
    model, processor = spread_weights(load_vision_model(str(out)).eval()), load_processor(str(out))
    items = []
    for i, (colour, question) in enumerate(zip(COLOURS, ["What colour?", "Name the colour of this picture."])):
        Image.new("RGB", (56, 56), COLOURS[colour]).save(tmp_path / f"{i}.png")
        content = [{"type": "image"}, {"type": "text", "text": question}]
        items.append(PromptItem([{"role": "user", "content": content}], None, "p.jsonl", i,
                                [image_ref(str(tmp_path / f"{i}.png"), None, "p.jsonl", i, "images[0]")]))
    vision = encode_image_samples(processor, items, 2)
    ids, tok = [v.prompt_ids for v in vision], processor.tokenizer
    args = (tok, ids, 6, 1.0, 1.0, 5, len(ids))
    want = generate_completions(model, *args, vision=vision)
    monkeypatch.setattr(sampling, "PREFILL_CHUNK", 2)
    calls = _count_forwards(monkeypatch)
    assert generate_completions(model, *args, vision=vision) == want
    assert calls[0] == max(map(len, ids)) > 2  # the prefill: every column at once
