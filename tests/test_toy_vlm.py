"""Tiny vision-language models built on the spot (`directpo.toy.build_tiny_vlm`), their loading
(`directpo.models`), and the synthetic colour task (issue #30)."""
import json
import time
from collections import Counter

import pytest
import torch
from PIL import Image

from directpo.errors import UserValueError
from directpo.vision import is_vision_model, load_processor, load_vision_model
from directpo.toy import COLOURS, MROPE_FAMILIES, VLM_FAMILIES, build_tiny_vlm, colour_image_task

TEXTS = [f"What colour is this picture? It is {c}." for c in COLOURS] * 8
PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this picture?"}]}]


@pytest.fixture(scope="module", params=VLM_FAMILIES)
def vlm_dir(request, tmp_path_factory):
    start = time.perf_counter()
    out = build_tiny_vlm(tmp_path_factory.mktemp(request.param), request.param, TEXTS, seed=0)
    assert time.perf_counter() - start < 30  # "builds in a few seconds" (generous on a loaded CPU)
    return request.param, out


# (width, height): square, wide, tall; the families resize them differently (Qwen2-VL keeps the aspect).
SIZES = [(56, 56), (90, 40), (30, 70)]


def _encode(processor, sizes=SIZES):
    text = processor.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    images = [[Image.new("RGB", size, COLOURS["red"])] for size in sizes]
    return processor(text=[text] * len(sizes), images=images, return_tensors="pt", padding=True)


def test_builds_saves_and_reloads_offline(vlm_dir, monkeypatch):
    from transformers import AutoModelForImageTextToText

    family, out = vlm_dir
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.config.model_type == family
    assert is_vision_model(str(out))
    processor = load_processor(str(out))
    assert processor.chat_template is not None and processor.image_processor is not None


def test_auto_processor_loads_the_saved_processor(vlm_dir):
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    family, out = vlm_dir
    if family in MROPE_FAMILIES and not is_torchvision_available():
        # transformers builds Qwen2VLProcessor's video processor only with torchvision; the saved
        # folder names the stock class, and `load_processor` builds it for images alone.
        name = json.loads((out / "processor_config.json").read_text())["processor_class"]
        assert name == {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}[family]
        assert type(load_processor(str(out))).__mro__[1].__name__ == name
        return
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor) is type(load_processor(str(out)))
    assert processor.chat_template == load_processor(str(out)).chat_template


def test_same_seed_same_weights(vlm_dir, tmp_path):
    family, out = vlm_dir
    again = build_tiny_vlm(tmp_path / "a", family, TEXTS, seed=0)
    other = build_tiny_vlm(tmp_path / "b", family, TEXTS, seed=1)
    a, b, c = (load_vision_model(str(d)).state_dict() for d in (out, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_prompt_with_image_and_forward(vlm_dir):
    _, out = vlm_dir
    model, processor = load_vision_model(str(out)), load_processor(str(out))
    text = processor.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert text.count(processor.image_token) == 1  # the template's placeholder, before expansion
    enc = _encode(processor)
    assert "pixel_values" in enc and enc["pixel_values"].numel() > 0
    n_image = (enc["input_ids"] == model.config.image_token_id).sum(dim=1)
    # The placeholder expanded to as many image tokens as the processor says each image needs.
    expected = processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in SIZES])["num_image_tokens"]
    assert n_image.tolist() == list(expected) and min(expected) > 1
    # Every image token is filled by one vision feature: the model checks the counts agree.
    features = model.get_image_features(**{k: v for k, v in enc.items()
                                           if k in ("pixel_values", "image_grid_thw", "image_sizes")})
    pooled = getattr(features, "pooler_output", features)
    n_features = sum(f.shape[0] for f in pooled) if isinstance(pooled, (list, tuple)) else pooled.shape[:-1].numel()
    assert n_features == int(n_image.sum())
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (*enc["input_ids"].shape, model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    assert len(processor.tokenizer) <= model.config.text_config.vocab_size  # every token id has an embedding


def test_qwen2_vl_mrope_has_three_position_streams(tmp_path):
    out = build_tiny_vlm(tmp_path, "qwen2_vl", TEXTS)
    model, processor = load_vision_model(str(out)), load_processor(str(out))
    enc = _encode(processor)
    positions, _ = model.model.get_rope_index(enc["input_ids"], mm_token_type_ids=enc["mm_token_type_ids"],
                                              image_grid_thw=enc["image_grid_thw"],
                                              attention_mask=enc["attention_mask"])
    assert positions.shape == (3, *enc["input_ids"].shape)
    image = enc["input_ids"][0] == model.config.image_token_id
    # On image tokens the height and width streams differ (a 2-D grid); on text all three agree.
    assert not torch.equal(positions[1, 0, image], positions[2, 0, image])
    assert torch.equal(positions[0, 0, ~image], positions[1, 0, ~image])


def test_loading_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        load_vision_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        load_processor(str(tmp_path / "missing"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserValueError, match="is a file"):
        is_vision_model(str(tmp_path / "f"))


def test_text_model_is_not_a_vision_model(tiny_model):
    assert not is_vision_model(str(tiny_model))


def test_colour_image_task(tmp_path):
    train, held_out = colour_image_task(tmp_path, n_train=16, n_eval=8, seed=3)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    eval_rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    assert (len(rows), len(eval_rows)) == (16, 8)
    named = Counter()
    for row in rows + eval_rows:
        (image,) = row["images"]
        path = train.parent / image
        assert not image.startswith("/") and path.is_file()
        assert row["prompt"][0]["content"][0] == {"type": "image"}
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen != rejected
        colour = next(c for c in COLOURS if c in chosen)
        named[colour] += 1
        # The named colour is the picture's dominant one.
        pixels = Image.open(path).convert("RGB").getdata()
        nearest = Counter(min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(p, COLOURS[c])))
                          for p in pixels)
        assert nearest.most_common(1)[0][0] == colour
    assert set(named) == set(COLOURS) and max(named.values()) - min(named.values()) <= 1
    again, _ = colour_image_task(tmp_path / "again", n_train=16, n_eval=8, seed=3)
    assert again.read_text() == train.read_text()


def test_a_processor_that_cannot_be_reached_is_one_line(monkeypatch):
    """A hub id offline: one line saying so (it was a NameError, a bug, before)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError) as e:
        load_processor("someone/no-such-vlm")
    assert "\n" not in str(e.value) and "someone/no-such-vlm" in str(e.value)
