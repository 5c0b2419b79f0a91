"""Vision-language models in a training run (issue #30): which part of the network trains, and the
processor that goes with the model.

A VLM (`AutoModelForImageTextToText`: Qwen2-VL, LLaVA, Idefics3, ...) is a language model plus a
vision side: the vision tower that encodes an image's patches and the projector that maps them
into the language model's embedding space. Preference data says which *answer* is better; the
default (`--freeze-vision`, as TRL's and LLaVA's DPO recipes do) trains the language model alone:
the vision side is frozen, and LoRA's `all-linear` adapts the language model's linear layers only
(PEFT's own `all-linear` would also put adapters on the vision tower's). `--no-freeze-vision`
trains (or adapts) everything.
"""
from __future__ import annotations

import os

from torch import nn

from ..console import log
from ..data.errors import DataError
from ..errors import UserValueError
from ..models import unwrap_peft
from ..vision import language_model, vision_modules


def freeze_vision(model: nn.Module) -> int:
    """Freeze the vision side; returns how many parameters it holds."""
    n = 0
    for module in vision_modules(model).values():
        for p in module.parameters():
            p.requires_grad_(False)
            n += p.numel()
    return n


def lora_targets(model: nn.Module, target_modules: str, freeze: bool) -> str:
    """`--lora-target-modules` for a VLM: with the vision side frozen, resolved to the full names of
    the matching linear layers of the language model (a bare `q_proj` would also match a CLIP
    tower's); unchanged otherwise. A comma list of names, as `training.lora.apply_lora` takes."""
    if not freeze:
        return target_modules
    lm = language_model(model)
    prefix = next(name for name, m in unwrap_peft(model).named_modules() if m is lm)
    wanted = None if target_modules == "all-linear" else {t.strip() for t in target_modules.split(",")}
    names = [f"{prefix}.{name}" for name, m in lm.named_modules()
             if isinstance(m, nn.Linear) and name and (wanted is None or name.rsplit(".", 1)[-1] in wanted
                                                        or name in wanted)]
    if not names:
        raise UserValueError(f"--lora-target-modules {target_modules}: no linear layer of the language model matches")
    return ",".join(names)


def prepare_vision(model: nn.Module, freeze: bool) -> None:
    """Freeze the vision side of a VLM policy (or say that it trains)."""
    if freeze:
        n = freeze_vision(model)
        log(f"vision-language model: its vision tower and projector are frozen ({n / 1e6:.2f} M parameters; "
            "--no-freeze-vision trains them)")
    else:
        log("vision-language model: the vision tower and projector train with the language model (--no-freeze-vision)")


def cache_image_features(cfg, *models) -> None:
    """--image-feature-cache: the models' image features computed once per image and kept, where the
    vision side is frozen (`data.image_features`); one store for the policy and πref (its key holds
    the vision weights' fingerprint, so a πref with another tower gets its own features)."""
    if cfg.image_feature_cache == "off":
        return
    from ..data.image_features import FeatureCache, attach
    from ..memory import parse_size

    cache = FeatureCache(parse_size(cfg.image_feature_cache, "--image-feature-cache"))
    reasons = [attach(m, cache, vision_modules(m)) for m in dict.fromkeys(m for m in models if m is not None)]
    if all(r is None for r in reasons):
        log(f"image features: computed once per image and kept, up to {cfg.image_feature_cache} "
            "(--image-feature-cache)")
    else:
        log(f"image features: computed at every step ({next(r for r in reasons if r)})")


def check_sharded_rows(examples) -> None:
    """--fsdp with a VLM: every row must carry an image. The vision side is one FSDP unit, whose
    weights the ranks gather together (a collective) whenever the tower runs; a micro-batch without
    images skips the tower on its rank alone, and the ranks' collectives would no longer pair up
    (the processes abort or hang). Refused up front, naming the first such row."""
    bare = next((ex for ex in examples if not ex.images), None)
    if bare is not None:
        raise DataError(bare.source, bare.row, "images", "--fsdp with a vision-language model needs an image in "
                        "every row (the processes run the vision tower together); drop --fsdp (data parallelism "
                        "takes text-only rows) or remove the rows without images")


def run_processor(cfg, sources=None):
    """The processor of the run's model when it is a vision-language model (None for a text model,
    or a model given as an object): images in the data are then tokenized by it. (--fsdp loads a VLM
    too: `prepare.load_sharded`; its rows must all carry images: `check_sharded_rows`.)"""
    from ..models import is_adapter_dir
    from ..vision import is_vision_model, load_processor

    if sources is not None and sources.model is not None:
        return None
    source = cfg.model
    if is_adapter_dir(cfg.model):  # an adapter (say from `directpo sft --lora-r`): its base says
        from .adapters import read_adapter_dir

        source = read_adapter_dir(cfg.model).root
    if not is_vision_model(source, cfg.trust_remote_code):
        return None
    # (an adapter directory saved by directpo holds the processor too; else its base's)
    has_own = source == cfg.model or any(os.path.exists(os.path.join(os.path.expanduser(cfg.model), f))
                                         for f in ("processor_config.json", "preprocessor_config.json"))
    return load_processor(cfg.model if has_own else source, cfg.trust_remote_code)

