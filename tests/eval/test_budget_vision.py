"""`--memory-budget` of sampling with image prompts (issue #30): the probe prefills image prompts, so
their image tokens, pixel tensors and the vision tower's transient forward are counted: the batch
chosen is smaller than for the same text without pictures, and a real run at it stays under the
budget. And the K samples of an image prompt share its keys and values in place, as a text
prompt's do (no copy per sample), with the samples unchanged."""
import dataclasses
import json

import pytest
import torch
from PIL import Image

from directpo.data.images import image_ref
from directpo.data.prompts import PromptItem
from directpo.eval import sampling
from directpo.eval.budget import live_bytes
from directpo.eval.sample import encode_image_samples
from directpo.eval.sampling import generate_completions, measure_costs, plan_batch, sample_batch
from directpo.toy import COLOURS, build_tiny_vlm
from directpo.vision import load_processor, load_vision_model
from conftest import spread_weights

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [f"What colour is this picture? It is {c}. Compare the two pictures: both are {c}." for c in COLOURS] * 8
QUESTIONS = ["What colour?", "What colour is this picture, please?", "Colour", "Name the colour of this picture."]
K, T = 4, 8


@pytest.fixture(scope="module", params=["qwen2_vl", "llava"])
def vlm(request, tmp_path_factory):
    """(family, model, processor, image prompt items, the same prompts without their pictures): a
    tower of 2 blocks of width 64 and pictures of 64 (Qwen2-VL, 224 px) or 16 (LLaVA) image tokens."""
    tmp = tmp_path_factory.mktemp(f"budget_{request.param}")
    size = 224 if request.param == "qwen2_vl" else 56
    out = build_tiny_vlm(tmp / "m", request.param, TEXTS, image_size=size, vision_layers=2, vision_hidden=64)
    model, processor = load_vision_model(str(out)).eval(), load_processor(str(out))
    spread_weights(model)
    images, texts = [], []
    for i, (colour, question) in enumerate(zip(COLOURS, QUESTIONS)):
        path = tmp / f"{i}.png"
        Image.new("RGB", (size, size), COLOURS[colour]).save(path)
        content = [{"type": "image"}, {"type": "text", "text": question}]
        images.append(PromptItem([{"role": "user", "content": content}], None, "p.jsonl", i,
                                 [image_ref(str(path), None, "p.jsonl", i, "images[0]")]))
        texts.append(PromptItem([{"role": "user", "content": content[1:]}], None, "p.jsonl", i, []))
    return request.param, model, processor, images, texts


def _encoded(processor, items):
    vision = encode_image_samples(processor, items, K)
    return [v.prompt_ids for v in vision], vision


def test_image_prompts_get_a_smaller_batch_than_their_text(vlm):
    _, model, processor, images, texts = vlm
    pad = processor.tokenizer.pad_token_id
    ids, vision = _encoded(processor, images)
    text_ids, _ = _encoded(processor, texts)
    assert all(len(a) > len(b) for a, b in zip(ids, text_ids))  # the image tokens
    costs = measure_costs(model, ids, T, 1.0, pad, vision)
    text_costs = dataclasses.replace(measure_costs(model, text_ids, T, 1.0, pad), held=costs.held)
    # the tower and the pixels: a row of the image prefill costs more than its tokens alone would
    assert costs.prefill[1] > text_costs.prefill[1] * len(ids[0]) / len(text_ids[0])
    budget = plan_batch(model, ids, T, 1.0, pad, 10 ** 12, costs, vision)  # (room for every row: its need)
    budget = plan_batch(model, ids, T, 1.0, pad, costs.held + (budget["total"] - costs.held) // 3, costs, vision)
    text = plan_batch(model, text_ids, T, 1.0, pad, budget["budget"], text_costs)
    assert 1 <= budget["batch_size"] < text["batch_size"]


def test_a_real_run_at_the_chosen_batch_stays_under_the_budget(vlm):
    """The tensors a real sampling run of image prompts makes (pixels, the tower, the prefill, the
    shared cache, the decode), counted while they live, peak under what the plan gives them."""
    _, model, processor, images, _ = vlm
    pad, tok = processor.tokenizer.pad_token_id, processor.tokenizer
    ids, vision = _encoded(processor, images)
    costs = measure_costs(model, ids, T, 1.0, pad, vision)
    whole = plan_batch(model, ids, T, 1.0, pad, 10 ** 12, costs, vision)
    plan = plan_batch(model, ids, T, 1.0, pad, costs.held + (whole["total"] - costs.held) * 2 // 3, costs, vision)
    assert 1 < plan["batch_size"] < len(ids)
    with live_bytes() as live:
        generate_completions(model, tok, ids, T, 1.0, seed=0, batch_size=plan["batch_size"], vision=vision)
    allowed = plan["total"] - costs.held
    assert live.peak <= allowed, (live.peak, plan)
    assert live.peak >= 0.5 * allowed, (live.peak, plan)  # and not loose by much


def test_k_samples_of_an_image_prompt_share_its_keys_in_place(vlm, monkeypatch):
    """K = 4 samples of 4 image prompts: each layer keeps the prompts' keys and values once (4 rows,
    the prefill's own tensors, not 16 copies), the samples are those of an unshared prefill, and the
    run's tensors peak lower than with the keys copied to each sample."""
    _, model, processor, images, _ = vlm
    tok = processor.tokenizer
    ids, vision = _encoded(processor, images)
    caches = []
    real = sampling._new_cache

    def recording(capacity):
        caches.append(real(capacity))
        return caches[-1]

    monkeypatch.setattr(sampling, "_new_cache", recording)
    u = torch.rand(len(ids), T, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    args = (T, 1.0, 1.0, None, tok.pad_token_id)  # (no EOS: every row decoded to the end, no reordering)
    with live_bytes() as shared_bytes:
        shared = sample_batch(model, ids, *args, uniforms=u, vision=vision)
    layers = caches[-1].layers
    for layer in layers:
        keys, values = layer.prefix
        assert keys.shape[0] == values.shape[0] == len(images)  # one row a prompt
        assert keys.shape[2] == max(map(len, ids)) and layer._k.shape[0] == len(ids)  # each row's own new tokens
    with live_bytes() as copied_bytes:
        copied = sample_batch(model, ids, *args, uniforms=u, vision=vision, share_prefix=False)
    assert not hasattr(caches[-1].layers[0], "prefix")
    assert shared == copied and len({tuple(c) for c in shared}) > len(images)
    per_layer = sum(t.untyped_storage().nbytes() for t in layers[0].prefix)  # one prompt set's keys and values
    assert copied_bytes.peak - shared_bytes.peak >= (K - 1) * per_layer * len(layers) // 2, \
        (copied_bytes.peak, shared_bytes.peak)


def test_sample_hands_image_prompts_to_the_budget(vlm, monkeypatch):
    """`draw_samples` (sample, bon) with image prompts and a budget: the planner is given the image
    prompts (their ids with the image tokens, and their pictures), and the batch it chooses is the
    batch sampled with."""
    from directpo.eval import sample

    _, model, processor, images, _ = vlm
    seen = []

    def planner(model_, tok, prompt_ids, max_new, top_p, batch_size, budget, vision=None):
        seen.append((len(prompt_ids), vision is not None and len(vision) == len(prompt_ids), budget))
        return 3

    monkeypatch.setattr(sample, "sampling_batch_size", planner)
    s = sample.draw_samples(model, processor.tokenizer, images, K, T, 1.0, 1.0, 0, 16, memory_budget="1GiB",
                            processor=processor)
    assert seen == [(len(images) * K, True, "1GiB")] and s.batch_size == 3
