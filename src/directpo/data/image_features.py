"""A frozen vision side's image features, computed once per image and kept (issue #30, speed).

With the vision tower and its projector frozen (`--freeze-vision`, the default), what they make of
an image (the projector's output: the embeddings that replace the image's placeholder tokens) never
changes during training. Every forward given pixel tensors still runs the processor (~7 ms a
picture) and the tower. Here each example's image features are computed the first time a forward
needs them (in the precomputed reference pass when πref shares the policy's frozen tower, else in
the first epoch), kept, and later forwards get them through transformers' own
`mm_encoder_outputs` keyword instead of `pixel_values`: the model embeds the ids and scatters the
features at its image tokens itself (`get_placeholder_mask` + `masked_scatter`, Idefics3's
`inputs_merger`), so each family stays exact and the token embeddings keep their gradients.

Used only where it cannot change results:
* the families whose forward takes `mm_encoder_outputs` and were checked against the plain path
  (log-probs and gradients within 1e-5): Qwen2-VL, LLaVA, Idefics3 (`FAMILIES`);
* every parameter of the vision side frozen, no adapter in it, no dropout in it (a training-mode
  forward would draw new dropout masks every step);
* keyed by the example's image digest (`ImageInputs.digest`: the decoded pictures, the image
  processor's settings, the grids), a fingerprint of the vision side's weights and config (πref's
  tower may differ from the policy's) and the autocast dtype in force.

Features are computed one example at a time, so what is kept does not depend on which examples
shared a batch: a run whose cache was rebuilt (`--resume`: the cache is never saved) or was full
(new features then computed per batch as they are needed, not kept) gets the same numbers bit for
bit. Memory: bounded by `max_bytes` (`--image-feature-cache`); the features live on the model's
device.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import weakref

import torch
from torch import nn

from ..console import log
from ..memory import size_str

# Model types whose forward takes `mm_encoder_outputs` (transformers 5.x) and whose cached path is
# tested against the plain one (tests/test_image_features.py).
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "idefics3")


class FeatureCache:
    """Image features by (vision fingerprint, image digest, autocast dtype), at most `max_bytes`.
    One store may serve several models (the policy and πref): a key holds the fingerprint of the
    vision side that made it."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.computed = 0  # examples whose features were computed (the tower run)
        self.reused = 0  # examples whose features came from the store
        self._store: dict[tuple, torch.Tensor] = {}
        self._full_said = False

    def __len__(self) -> int:
        return len(self._store)

    def get(self, key: tuple) -> torch.Tensor | None:
        return self._store.get(key)

    def put(self, key: tuple, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if self.bytes + size > self.max_bytes:
            if not self._full_said:  # (once: then every new image is computed as it is needed)
                self._full_said = True
                log(f"image feature cache full ({size_str(self.bytes)}, {len(self._store)} images; "
                    "--image-feature-cache): the features of further images are computed whenever a batch needs them")
            return
        self._store[key] = features
        self.bytes += size


_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, _Attached]" = weakref.WeakKeyDictionary()


class _Attached:
    def __init__(self, model: nn.Module, cache: FeatureCache, side: dict[str, nn.Module]):
        self.cache, self.side = cache, side
        self.frozen = [p for m in side.values() for p in m.parameters()]
        self.rekey(model)

    def rekey(self, model: nn.Module) -> None:
        """The fingerprint of the vision weights as they are now, and their tensors' version counters
        (bumped by any in-place write: a checkpoint loaded, TR-DPO's πref ← α·πθ + (1−α)·πref), so that
        weights written since are fingerprinted again before their features are looked up."""
        self.fingerprint = vision_fingerprint(model, self.side)
        self.versions = self._versions()

    def _versions(self) -> list[int]:
        return [t._version for m in self.side.values() for t in (*m.parameters(), *m.buffers())]

    def current(self, model: nn.Module) -> "_Attached":
        if self._versions() != self.versions:
            self.rekey(model)
        return self


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The model inside a PEFT wrapper (as `models.unwrap_peft`, which `data` may not import: models
    imports data)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def why_not(model: nn.Module, side: dict[str, nn.Module]) -> str | None:
    """Why `model`'s image features cannot be kept (None: they can); `side`: its vision tower and
    projector (`vision.vision_modules`)."""
    inner = unwrap_peft(model)
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) not in FAMILIES:
        return f"not checked for {getattr(config, 'model_type', type(inner).__name__)} (only {', '.join(FAMILIES)})"
    if any(p.requires_grad for m in side.values() for p in m.parameters()):
        return "the vision tower or projector trains (--no-freeze-vision or LoRA on it)"
    if any(type(sub).__module__.startswith("peft") for m in side.values() for sub in m.modules()):
        return "an adapter sits in the vision tower or projector"
    vision_config = getattr(config, "vision_config", None)
    drop = [k for k, v in (vision_config.to_dict() if vision_config is not None else {}).items()
            if "dropout" in k and isinstance(v, (int, float)) and v > 0]
    if drop or any(isinstance(sub, nn.Dropout) and sub.p > 0 for m in side.values() for sub in m.modules()):
        return "the vision side has dropout (its features differ at every training-mode forward)"
    return None


def attach(model: nn.Module, cache: FeatureCache, side: dict[str, nn.Module]) -> str | None:
    """Let `token_logps` give `model` its images' cached features; returns why not where it cannot
    (the model then gets pixels as before). `side`: its vision tower and projector
    (`vision.vision_modules(model)`). Call it once the model is set up (frozen, adapted)."""
    reason = why_not(model, side)
    if reason is None:
        _ATTACHED[unwrap_peft(model)] = _Attached(model, cache, side)
    return reason


def detach(model: nn.Module) -> None:
    _ATTACHED.pop(unwrap_peft(model), None)


def vision_fingerprint(model: nn.Module, side: dict[str, nn.Module]) -> str:
    """Hash of the vision side's config and of every weight and buffer of its tower and projector."""
    inner = unwrap_peft(model)
    h = hashlib.blake2b(digest_size=16)
    config = inner.config.to_dict()
    for k in ("text_config", "_name_or_path", "transformers_version"):  # (not what makes the features)
        config.pop(k, None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, module in sorted(side.items()):
        for key, t in module.state_dict().items():
            h.update(f"{name}.{key}{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def pending_bytes(model: nn.Module, examples) -> int:
    """Bytes the cache of `model` would still grow by over `examples` (within its bound; 0 where it is
    not attached): each distinct example not kept yet, its image tokens × the language model's
    hidden size × the vision side's element size. For `--memory-budget`, whose measurement of the
    memory held now sees only what is kept already (all of it when the precomputed reference pass
    shared the policy's tower)."""
    attached = _ATTACHED.get(unwrap_peft(model))
    if attached is None:
        return 0
    config = unwrap_peft(model).config
    hidden = config.get_text_config().hidden_size
    size = attached.frozen[0].element_size() if attached.frozen else 4
    kept = {key[1] for key in attached.cache._store if key[0] == attached.fingerprint}
    seen, total = set(), 0
    for ex in examples:
        digest = getattr(ex.vision, "digest", None) if ex.vision else None
        if digest is None or digest in kept or digest in seen:
            continue
        seen.add(digest)
        total += sum(t == config.image_token_id for t in ex.prompt_ids) * hidden * size
    return min(total, max(0, attached.cache.max_bytes - attached.cache.bytes))


def forward_inputs(model: nn.Module, batch) -> dict | None:
    """The image keywords of `batch`'s forward through `model`: its cached image features
    (`mm_encoder_outputs`) and small tensors where `model` is attached and the batch allows it,
    else `batch.model_inputs` (the pixels, made now); None for a batch without images."""
    inputs = getattr(batch, "model_inputs", None)
    if not inputs:
        return None
    attached = _ATTACHED.get(unwrap_peft(model))
    small = inputs.small() if attached is not None and hasattr(inputs, "small") else None
    if small is None or any(getattr(ex.vision, "digest", None) is None for ex in inputs.examples()):
        return dict(inputs.tensors() if hasattr(inputs, "tensors") else inputs)
    if any(p.requires_grad for p in attached.frozen):  # unfrozen since: the cache no longer holds
        log("warning: the vision side is no longer frozen: its image features are computed at every step again")
        detach(model)
        return dict(inputs.tensors())
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    features = _features(model, attached.current(model), inputs.examples(), inputs.device)
    return {**small, "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features)}}


def _features(model: nn.Module, attached: _Attached, examples: list, device) -> list[torch.Tensor]:
    """Each example's features (kept ones, or computed now: once per distinct example here)."""
    cache = attached.cache
    dtype = torch.get_autocast_dtype(device.type if device is not None else "cpu") \
        if torch.is_autocast_enabled(device.type if device is not None else "cpu") else None
    made: dict[tuple, torch.Tensor] = {}
    out = []
    for ex in examples:
        key = (attached.fingerprint, ex.vision.digest, str(dtype))
        f = made.get(key)
        if f is None:
            f = cache.get(key)
            if f is None:
                f = made[key] = _compute(model, ex, device)
                cache.computed += 1
                cache.put(key, f)
            else:
                made[key] = f
                cache.reused += 1
        out.append(f if device is None else f.to(device))
    return out


@torch.no_grad()
def _compute(model: nn.Module, example, device) -> torch.Tensor:
    """One example's image features, (its image tokens, hidden), by the model's `get_image_features`
    on the processor's tensors of its images alone."""
    from .collate import merge_vision

    inner = unwrap_peft(model)
    pixels = merge_vision([[example]])
    accepted = inspect.signature(inner.get_image_features).parameters
    kwargs = {k: (v.to(device) if device is not None else v) for k, v in pixels.items() if k in accepted}
    out = inner.get_image_features(**kwargs, return_dict=True)
    return torch.cat(list(out.pooler_output), dim=0).detach()
