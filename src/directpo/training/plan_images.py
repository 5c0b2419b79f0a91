"""What a vision-language model's images cost, for `directpo plan` (`training.plan`): the vision
side's shape (`vision_shape`) and, for an image of a given size, its image tokens in the language
model, the tokens its tower sees and its pixel tensors' bytes, by the model's processor's own
arithmetic (`image_costs`). The formulas they feed are in `training.plan`'s docstring."""
from __future__ import annotations

from ..config import ConfigError
from ..errors import UserValueError


def image_hw(text: str) -> tuple[int, int]:
    """(H, W) of an --image-size such as '448x448'."""
    try:
        h, w = (int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        h = w = 0
    if h < 1 or w < 1:
        raise ConfigError(f"--image-size {text!r}: give height x width in pixels, e.g. 448x448")
    return h, w


def default_image_size(image_processor) -> tuple[int, int]:
    """The processor's own image size: its crop (CLIP) or fixed height × width; a longest (or
    shortest) edge, square; Qwen2-VL's pixel counts (`merge_size`): the largest image it keeps,
    √max_pixels square (a bound: smaller pictures are fewer tokens)."""
    import math

    size = dict(getattr(image_processor, "size", None) or {})
    crop = dict(getattr(image_processor, "crop_size", None) or {})
    if getattr(image_processor, "do_center_crop", False) and "height" in crop:
        return crop["height"], crop["width"]
    if "height" in size:
        return size["height"], size["width"]
    if getattr(image_processor, "merge_size", None) is not None:
        pixels = getattr(image_processor, "max_pixels", None) or size["longest_edge"]
        return (math.isqrt(pixels),) * 2
    edge = size.get("longest_edge") or size.get("shortest_edge")
    if edge is None:
        raise UserValueError(f"{type(image_processor).__name__}: no default image size to plan with; "
                             "give --image-size HxW")
    return edge, edge


def vision_shape(model) -> dict:
    """A vision-language model's vision side as the plan reads it: its parameters (the tower and its
    projector), the tower's blocks, width d and MLP width i, its patch, and whether it adds a class
    token (a crop model's tower sees (S/p)² + 1 tokens a crop)."""
    from ..vision import vision_modules

    c = model.config.vision_config
    width = getattr(c, "embed_dim", None) or c.hidden_size  # (Qwen2-VL: embed_dim; hidden_size is the LM's)
    side = vision_modules(model)
    names = [n for m in side.values() for n, _ in m.named_parameters()]
    return {"params": sum(p.numel() for m in side.values() for p in m.parameters()),
            "layers": getattr(c, "depth", None) or c.num_hidden_layers, "hidden": width,
            "intermediate": getattr(c, "intermediate_size", None) or int(width * getattr(c, "mlp_ratio", 4)),
            "patch": c.patch_size, "temporal_patch": getattr(c, "temporal_patch_size", 1) or 1,
            "channels": getattr(c, "in_channels", None) or getattr(c, "num_channels", 3),
            "crop": getattr(c, "image_size", None), "class_token": any(n.endswith("class_embedding") for n in names)}


def image_costs(name_or_dir: str, tower: dict, image_size: str | None, trust_remote_code: bool = False) -> dict:
    """What one image of `image_size` (HxW; default: `default_image_size`) costs, by the model's
    processor's own arithmetic (`_get_num_multimodal_tokens`): its image tokens in the language
    model, the tokens its tower sees and the bytes of its pixel tensors (module docstring)."""
    from ..vision import load_processor

    processor = load_processor(name_or_dir, trust_remote_code)
    h, w = image_hw(image_size) if image_size else default_image_size(processor.image_processor)
    count = getattr(processor, "_get_num_multimodal_tokens", None)
    if count is None:
        raise UserValueError(f"{type(processor).__name__}: plan cannot count its image tokens (no "
                             "_get_num_multimodal_tokens); give --images 0 to plan without them")
    made = count(image_sizes=[[h, w]])
    tokens, patches = int(made["num_image_tokens"][0]), int(made["num_image_patches"][0])
    if getattr(processor.image_processor, "merge_size", None) is not None:  # Qwen2-VL: the tower reads its patches
        tower_tokens = patches
        pixels = patches * tower["channels"] * tower["temporal_patch"] * tower["patch"] ** 2
    else:  # crops of the tower's size: `patches` of them
        tower_tokens = patches * ((tower["crop"] // tower["patch"]) ** 2 + tower["class_token"])
        pixels = patches * tower["channels"] * tower["crop"] ** 2
    return {"image_size": [h, w], "image_tokens": tokens, "tower_tokens": tower_tokens, "pixel_bytes": 4 * pixels}
