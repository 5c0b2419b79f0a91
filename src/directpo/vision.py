"""Vision-language models (issue #30): whatever `AutoModelForImageTextToText` and `AutoProcessor`
load, from safetensors only, with the one-line errors of `directpo.models` (a missing folder, a hub
id that cannot be reached, remote code not allowed)."""
from __future__ import annotations

import os

import torch

from .models import check_model_source, from_pretrained_checked, remote_code_explained


def is_vision_model(name_or_dir: str, trust_remote_code: bool = False) -> bool:
    """Whether the model's config is an image-text-to-text one (it has a vision tower)."""
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto

    check_model_source(name_or_dir)
    with remote_code_explained(name_or_dir):
        config = AutoConfig.from_pretrained(name_or_dir, trust_remote_code=trust_remote_code)
    return getattr(config, "vision_config", None) is not None \
        or config.model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def load_vision_model(name_or_dir: str, device: torch.device | str = "cpu", trust_remote_code: bool = False,
                      dtype: torch.dtype = torch.float32):
    """A vision-language model (`AutoModelForImageTextToText`) in `dtype`, on `device`; safetensors
    only, as `load_model`."""
    from transformers import AutoModelForImageTextToText

    check_model_source(name_or_dir)
    return from_pretrained_checked(AutoModelForImageTextToText, name_or_dir, dtype=dtype,
                            trust_remote_code=trust_remote_code).to(device)


def load_processor(name_or_dir: str, trust_remote_code: bool = False):
    """The model's processor (`AutoProcessor`: image processor + tokenizer + chat template).

    Qwen2-VL's processor also holds a video processor, which transformers builds only with
    torchvision installed; without it, the same processor is built for images alone."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    check_model_source(name_or_dir)
    if not is_torchvision_available() and _processor_class(name_or_dir) == "Qwen2VLProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name_or_dir)
        images = AutoImageProcessor.from_pretrained(name_or_dir)
        return image_only_qwen2_vl_processor(images, tok, tok.chat_template)
    try:
        with remote_code_explained(name_or_dir):
            return AutoProcessor.from_pretrained(name_or_dir, trust_remote_code=trust_remote_code)
    except OSError as e:
        if not os.path.isdir(os.path.expanduser(name_or_dir)):
            raise _hub_error(name_or_dir, e) from e
        raise


def _processor_class(name_or_dir: str) -> str | None:
    import json

    path = os.path.join(os.path.expanduser(name_or_dir), "processor_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("processor_class")


def image_only_qwen2_vl_processor(image_processor, tokenizer, chat_template: str | None = None):
    """A `Qwen2VLProcessor` without its video processor (which needs torchvision): images and text
    only. Saved, it names itself `Qwen2VLProcessor`, so `AutoProcessor` loads it where torchvision is."""
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        # `ProcessorMixin` takes its sub-processors from `__init__`'s parameters: no video_processor here.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    processor = ImageOnlyQwen2VLProcessor(image_processor, tokenizer, chat_template)
    processor.saved_as = "Qwen2VLProcessor"
    return processor


def save_processor(processor, out_dir) -> None:
    """`processor.save_pretrained(out_dir)`, naming the class `AutoProcessor` should load: the
    family's own (`image_only_qwen2_vl_processor` saves as `Qwen2VLProcessor`)."""
    import json
    from pathlib import Path

    processor.save_pretrained(out_dir)
    name = getattr(processor, "saved_as", None)
    if name is None:
        return
    for f in ("processor_config.json", "tokenizer_config.json"):
        path = Path(out_dir) / f
        if path.exists():
            data = json.loads(path.read_text())
            if "processor_class" in data:
                data["processor_class"] = name
                path.write_text(json.dumps(data, indent=2) + "\n")
