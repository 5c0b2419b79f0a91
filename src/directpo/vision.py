"""Vision-language models (issue #30): whatever `AutoModelForImageTextToText` and `AutoProcessor`
load, from safetensors only, with the one-line errors of `directpo.models` (a missing folder, a hub
id that cannot be reached, remote code not allowed)."""
from __future__ import annotations

import os

import torch

from torch import nn

from .errors import UserValueError
from .models import (_hub_error, built_on_meta, check_model_source, from_pretrained_checked, give_pad_token,
                     load_config, remote_code_explained, unwrap_peft)
from .quantized import quantization_config, quantized_for_training, read_not_mapped


# The families whose log-probs are tested exact (tests/test_vision_logprobs.py: the tiny models of
# `toy.VLM_FAMILIES`); others that `AutoModelForImageTextToText` loads are run as they come.
TESTED_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next", "idefics3")
# Families known not to work yet, by model type and processor class: SmolVLM's processor needs
# torchvision (its video processor, read even for images) and num2words, which directpo does not require.
NOT_YET = {"smolvlm": "SmolVLMProcessor"}


def check_family(model_type: str | None = None, processor_class: str | None = None) -> None:
    """A one-line refusal of a family in `NOT_YET`, by its model type or its processor's class."""
    for family, processor in NOT_YET.items():
        if model_type == family or processor_class == processor:
            raise UserValueError(f"{family} is not supported yet (issue #30): supported: {', '.join(TESTED_FAMILIES)}")


def is_vision_model(name_or_dir: str, trust_remote_code: bool = False) -> bool:
    """Whether the model's config is an image-text-to-text one (it has a vision tower)."""
    from transformers.models.auto import modeling_auto

    config = load_config(name_or_dir, trust_remote_code)
    return getattr(config, "vision_config", None) is not None \
        or config.model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def load_vision_model(name_or_dir: str, device: torch.device | str = "cpu", trust_remote_code: bool = False,
                      dtype: torch.dtype = torch.float32, quantize: str | None = None, precision: str = "fp32",
                      double_quant: bool = True):
    """A vision-language model (`AutoModelForImageTextToText`) in `dtype`, on `device`; safetensors
    only, as `load_model`. `quantize` (nf4, fp4, int8: QLoRA, as `models.load_model`): the language
    model's linear layers through bitsandbytes; the vision tower, its projector and the LM head stay
    in `dtype` (small, and what the picture's features are made of)."""
    from transformers import AutoModelForImageTextToText

    check_model_source(name_or_dir)
    check_family(_saved_field(name_or_dir, "config.json", "model_type"))
    if quantize in (None, "none"):
        return from_pretrained_checked(AutoModelForImageTextToText, name_or_dir, dtype=dtype,
                                       trust_remote_code=trust_remote_code).to(device)
    config = load_config(name_or_dir, trust_remote_code)
    with torch.device("meta"):  # the module names, to leave the vision side unquantized
        shape = AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    names = {id(m): n for n, m in shape.named_modules()}
    keep = [names[id(m)] for m in vision_modules(shape).values()] + ["lm_head"]
    qc = quantization_config(quantize, precision, double_quant)
    qc.llm_int8_skip_modules = keep
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    with read_not_mapped():
        model = from_pretrained_checked(AutoModelForImageTextToText, name_or_dir, dtype=dtype,
                                        trust_remote_code=trust_remote_code, quantization_config=qc,
                                        device_map={"": str(dev)})
    return quantized_for_training(model, quantize)


def empty_vision_model(name_or_dir: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32):
    """A vision-language model (`AutoModelForImageTextToText`) with its parameters on the meta device
    and its buffers real: `models.empty_model` for a VLM (FSDP's meta loading; the same parameter
    registration hook, so the buffers are what `from_pretrained` makes and no weight is read)."""
    from transformers import AutoModelForImageTextToText

    config = load_config(name_or_dir, trust_remote_code)
    check_family(config.model_type)
    return built_on_meta(AutoModelForImageTextToText, config, name_or_dir, dtype, trust_remote_code)


def _inner(model: nn.Module) -> nn.Module:
    """The VLM's inner model (`model.model`: vision side + language model), below any PEFT wrapper."""
    m = unwrap_peft(model)
    return getattr(m, "model", m)


def language_model(model: nn.Module) -> nn.Module:
    """The language model (decoder) of a VLM."""
    inner = _inner(model)
    for name in ("language_model", "text_model"):
        if isinstance(getattr(inner, name, None), nn.Module):
            return getattr(inner, name)
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    if decoder is None or decoder is inner:
        raise UserValueError(f"{type(unwrap_peft(model)).__name__}: its language model cannot be told from its vision "
                             "side (no language_model/text_model); train it with --no-freeze-vision")
    return decoder


def vision_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The vision side: every child of the inner model but the language model (the vision tower and
    its projector: `visual`; `vision_tower` + `multi_modal_projector`; `vision_model` + `connector`)."""
    inner, lm = _inner(model), language_model(model)
    return {name: child for name, child in inner.named_children() if child is not lm}




def load_processor(name_or_dir: str, trust_remote_code: bool = False):
    """The model's processor (`AutoProcessor`: image processor + tokenizer + chat template), its
    tokenizer given a pad token where it has none (EOS, as `models.load_tokenizer` does: padding is
    masked out, so any id will do).

    Qwen2-VL's processor also holds a video processor, which transformers builds only with
    torchvision installed; without it, the same processor is built for images alone."""
    processor = _load_processor(name_or_dir, trust_remote_code)
    give_pad_token(processor.tokenizer)
    return processor


def _load_processor(name_or_dir: str, trust_remote_code: bool):
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    check_model_source(name_or_dir)
    name = _processor_class(name_or_dir)
    check_family(processor_class=name)
    if not is_torchvision_available() and name in IMAGE_ONLY:
        from transformers import AutoImageProcessor, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name_or_dir)
        images = AutoImageProcessor.from_pretrained(name_or_dir)
        return image_only_qwen2_vl_processor(images, tok, tok.chat_template, name)
    try:
        with remote_code_explained(name_or_dir):
            return AutoProcessor.from_pretrained(name_or_dir, trust_remote_code=trust_remote_code)
    except OSError as e:
        if not os.path.isdir(os.path.expanduser(name_or_dir)):
            raise _hub_error(name_or_dir, e) from e
        raise


def _processor_class(name_or_dir: str) -> str | None:
    return _saved_field(name_or_dir, "processor_config.json", "processor_class")


def _saved_field(name_or_dir: str, file: str, key: str) -> str | None:
    """`key` of a model folder's JSON `file` (None: no such local file, or no such key)."""
    import json

    path = os.path.join(os.path.expanduser(name_or_dir), file)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get(key)


# The processors that hold a video processor (built by transformers only with torchvision), which
# `image_only_qwen2_vl_processor` builds for images alone: Qwen2-VL's and Qwen2.5-VL's.
IMAGE_ONLY = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")


def image_only_qwen2_vl_processor(image_processor, tokenizer, chat_template: str | None = None,
                                  name: str = "Qwen2VLProcessor"):
    """A `Qwen2VLProcessor` (or `name`, one of `IMAGE_ONLY`) without its video processor (which needs
    torchvision): images and text only. Saved, it names itself `name`, so `AutoProcessor` loads it
    where torchvision is."""
    import transformers
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(getattr(transformers, name)):
        # `ProcessorMixin` takes its sub-processors from `__init__`'s parameters: no video_processor here.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    processor = ImageOnlyQwen2VLProcessor(image_processor, tokenizer, chat_template)
    processor.saved_as = name
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
