"""`directpo plan` on a vision-language model (issue #30): an image of --image-size becomes the image
tokens the processor makes of it, the pixels the processor makes, and the vision tower's transient
forward over the micro-batch's images as measured; the frozen vision side has no gradients."""
import json

import pytest
import torch
from PIL import Image

from directpo.cli import main
from directpo.config import ConfigError
from directpo.eval.budget import live_bytes
from directpo.toy import COLOURS, build_tiny_vlm
from directpo.training.plan import PlanConfig, image_bytes, model_shape, plan
from directpo.vision import load_processor, load_vision_model, vision_modules

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [f"What colour is this picture? It is {c}." for c in COLOURS] * 8
SIZES = [(56, 56), (112, 84), (224, 224), (84, 252)]


@pytest.fixture(scope="module", params=["qwen2_vl", "llava"])
def vlm(request, tmp_path_factory):
    """A tiny VLM with a tower of 2 blocks of width 64; Qwen2-VL's processor keeping images of 4 to 400
    tokens (the toy's makes every picture the same size), so the image size matters."""
    out = build_tiny_vlm(tmp_path_factory.mktemp(request.param) / "m", request.param, TEXTS, vision_layers=2,
                         vision_hidden=64)
    if request.param == "qwen2_vl":
        path = out / "processor_config.json"
        config = json.loads(path.read_text())
        config["image_processor"]["size"] = {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 400}
        path.write_text(json.dumps(config))
    return request.param, out


def _processed(processor, h, w, n=1):
    """The processor's output for a prompt with n images of h × w pixels."""
    content = [{"type": "image"}] * n + [{"type": "text", "text": "What colour?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [Image.new("RGB", (w, h), (200, 30 + 40 * i, 30)) for i in range(n)]
    return processor(text=[text], images=[images], return_tensors="pt")


def test_image_tokens_pixels_and_tower_tokens_are_the_processors(vlm):
    family, out = vlm
    processor, model = load_processor(str(out)), load_vision_model(str(out)).eval()
    seen = set()
    for h, w in SIZES:
        v = model_shape(str(out), image_size=f"{h}x{w}").vision
        enc = _processed(processor, h, w)
        assert v["image_size"] == [h, w]
        assert v["image_tokens"] == int((enc["input_ids"] == processor.image_token_id).sum()), (h, w)
        assert v["pixel_bytes"] == enc["pixel_values"].numel() * 4
        with torch.no_grad():  # the tokens the tower's blocks see: its last hidden state's
            tower = model.model.visual if family == "qwen2_vl" else model.model.vision_tower
            args = (enc["pixel_values"], enc["image_grid_thw"]) if family == "qwen2_vl" else (enc["pixel_values"],)
            hidden = tower(*args).last_hidden_state
        assert v["tower_tokens"] == hidden.shape[-2] * (1 if hidden.ndim == 2 else hidden.shape[0])
        seen.add(v["image_tokens"])
    # Qwen2-VL: more pixels, more tokens; LLaVA crops every picture to its tower's size
    assert len(seen) == (len(SIZES) if family == "qwen2_vl" else 1)


def test_default_image_size_is_the_processors(vlm):
    family, out = vlm
    v = model_shape(str(out)).vision
    # Qwen2-VL: the largest image it keeps (√max_pixels square: 560² = 400 tokens); LLaVA: its crop
    assert v["image_size"] == ([560, 560] if family == "qwen2_vl" else [56, 56])
    processor = load_processor(str(out))
    assert v["image_tokens"] == int((_processed(processor, *v["image_size"])["input_ids"]
                                     == processor.image_token_id).sum())


def test_tower_transient_is_what_its_forward_makes(vlm):
    """The planned `vision_tower` part for a micro-batch of 3 pairs of 2 images each is what the
    tower's no-grad forward over those 6 images creates at its peak (`live_bytes`), within 5 %."""
    family, out = vlm
    processor, model = load_processor(str(out)), load_vision_model(str(out)).eval()
    cfg = PlanConfig(model=str(out), image_size="112x112", images=2, micro_batch_size=3, batch_size=3)
    s = model_shape(str(out), image_size=cfg.image_size)
    planned = image_bytes(s, cfg, 3)
    encs = [_processed(processor, 112, 112, 2) for _ in range(3)]
    pixels = torch.cat([e["pixel_values"] for e in encs])
    extra = {"image_grid_thw": torch.cat([e["image_grid_thw"] for e in encs])} if family == "qwen2_vl" else {}
    assert planned["pixels"] == pixels.numel() * 4
    with torch.no_grad(), live_bytes() as live:
        model.model.get_image_features(pixel_values=pixels, **extra)
    assert 0.95 * planned["vision_tower"] <= live.peak <= planned["vision_tower"], (live.peak, planned)


def test_total_grows_with_the_image_size_and_the_frozen_side_has_no_gradients(vlm):
    family, out = vlm
    totals = [plan(PlanConfig(model=str(out), image_size=f"{h}x{w}", max_length=1024))["plan"]["total"]
              for h, w in SIZES]
    if family == "qwen2_vl":
        assert totals[0] < totals[1] < totals[2] and totals[3] < totals[2]
    else:  # every picture cropped to the tower's 56 px: the same cost
        assert len(set(totals)) == 1
    result = plan(PlanConfig(model=str(out), image_size="56x56", max_length=1024))
    with torch.device("meta"):
        from transformers import AutoConfig, AutoModelForImageTextToText

        meta = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(out))
    frozen = sum(p.numel() for m in vision_modules(meta).values() for p in m.parameters())
    assert frozen > 0 and result["shape"]["vision"]["params"] == frozen
    assert result["plan"]["parts"]["gradients"] == 4 * (result["shape"]["params"] - frozen)
    assert result["images"]["text_tokens_left"] == 1024 - result["images"]["image_tokens"]


def test_the_printed_plan_says_what_an_image_becomes(vlm, capsys):
    _, out = vlm
    assert main(["plan", "--model", str(out), "--image-size", "56x56", "--max-length", "64"]) == 0
    text = capsys.readouterr().out
    n = model_shape(str(out), image_size="56x56").vision["image_tokens"]
    assert f"an image of 56x56 becomes {n} image tokens" in text and f"{64 - n} tokens left for text" in text
    assert "vision tower" in text and "pixels" in text
    assert main(["plan", "--model", str(out), "--image-size", "56x56", "--max-length", str(n)]) == 0
    assert f"more than --max-length {n} holds" in capsys.readouterr().out


def test_a_bad_image_size_is_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--image-size '448'"):
        PlanConfig(model="m", image_size="448").validate()
    assert main(["plan", "--model", str(tmp_path), "--image-size", "0x5"]) == 2
    assert "give height x width in pixels" in capsys.readouterr().err


def test_images_0_plans_without_pictures(vlm):
    """--images 0: no image part, the processor not read (a VLM whose processor plan cannot count)."""
    _, out = vlm
    with_images = plan(PlanConfig(model=str(out), image_size="56x56"))
    without = plan(PlanConfig(model=str(out), images=0))
    assert "images" not in without and "image_tokens" not in without["shape"]["vision"]
    assert set(with_images["plan"]["parts"]) - set(without["plan"]["parts"]) == {"pixels", "vision_tower"}
    assert without["plan"]["parts"]["gradients"] == with_images["plan"]["parts"]["gradients"]
