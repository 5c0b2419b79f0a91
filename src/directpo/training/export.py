"""The final model of a sharded (FSDP) run as an ordinary Hugging Face directory, streamed: no
process ever holds more than one whole tensor of it.

`get_model_state_dict(full_state_dict=True)` + `save_pretrained` would gather every weight onto
rank 0's host memory first. Here the shard files are planned up front from the parameters' shapes
and dtypes alone (`plan_shards`, huggingface_hub's grouping rule), so every rank knows the order.
For each file rank 0 writes the safetensors header first (it needs only names, dtypes and shapes:
`safetensors_io.SafetensorsStream`), then each parameter is gathered whole in turn (a collective:
every rank calls, in the file's data order), rank 0 appends its bytes and drops it. Rank 0 therefore holds one
gathered tensor at a time, whatever the model's size.

What lands on disk is what `save_pretrained` writes for the same model, byte for byte in each
safetensors file (tested): the same tensor names (after transformers' reverse key conversion), the
same grouping into `model.safetensors` or `model-0000i-of-0000N.safetensors` with
`model.safetensors.index.json`, safetensors metadata {"format": "pt"}, `config.json` and
`generation_config.json`; the dtype is the parameters' own (fp32 master weights under mixed
precision). Non-persistent buffers are not saved, as in HF.
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch

from ..diskio import replacing, warn_if_short
from ..errors import UserValueError
from ..safetensors_io import INDEX_NAME, WEIGHTS_NAME, SafetensorsStream, data_order
from .distributed import Dist

# transformers 5's `save_pretrained(max_shard_size="50GB")`, in huggingface_hub's decimal units
MAX_SHARD_BYTES = 50 * 10**9
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Tensor names (with their sizes in bytes, in saving order) grouped into shard files by
    huggingface_hub's `split_torch_state_dict_into_shards` rule, so the files match `save_pretrained`'s:
    a tensor is never split; a new file starts when adding a tensor would pass `max_bytes`; a tensor
    larger than `max_bytes` gets a file of its own, placed before the file still being filled."""
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, size in sizes:
        if size > max_bytes:
            shards.append([name])
            continue
        if used + size > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        shards.append(current)
    return shards


def shard_files(n: int) -> list[str]:
    """The file names of `n` shards, as transformers names them."""
    return [WEIGHTS_NAME] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def whole_tensor(t: torch.Tensor) -> torch.Tensor:
    """One tensor whole, on its process group's device. A sharded one (a DTensor: duck-typed, so that
    `distributed` stays the one module importing torch.distributed) is all-gathered: a collective,
    which every rank must call for the same tensors in the same order."""
    if hasattr(t, "full_tensor"):
        if t.device.type != t.device_mesh.device_type:  # --fsdp-cpu-offload: gather where the group runs,
            t = t.to(t.device_mesh.device_type)           # as torch's own full state dict does
        t = t.full_tensor()
    return t.detach()


@torch.no_grad()
def export_model(model, out, d: Dist, max_shard_bytes: int | None = None, tensor=None) -> None:
    """Write `model` (a whole-weights model, sharded by FSDP or not) into directory `out` as
    `save_pretrained` would, gathering one tensor at a time; only rank 0 writes. Every rank must call.
    `max_shard_bytes`: the largest shard file (default `MAX_SHARD_BYTES`, read at call time).
    `tensor(name, key)`: the tensor written under file name `name` for the model's state key `key`,
    of that entry's dtype and shape (default: the model's own, gathered whole); `directpo merge`
    streams a meta-device model's tensors this way from the base's files (`training.merge`)."""
    limit = MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    state = model.state_dict()  # this rank's shards (DTensors) and whole tensors: references, no copies
    order = _save_order(model, state)
    key = dict(order)
    shards = plan_shards([(name, _nbytes(state[k])) for name, k in order], limit)
    files = shard_files(len(shards))
    out = Path(out)
    total = sum(_nbytes(state[k]) for _, k in order)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        warn_if_short(out, total, f"the final model ({out})")
        remove_stale_weights(out, files)
        _save_configs(model, state, out)
    for file, names in zip(files, shards):
        entries = sorted(((name, state[key[name]]) for name in names), key=lambda e: data_order(e[0], e[1].dtype))
        writer = SafetensorsStream([(n, t.dtype, tuple(t.shape)) for n, t in entries]) if d.main else None
        with contextlib.ExitStack() as stack:
            if writer is not None:  # a full disk: one line with what this file needs (`diskio`)
                stack.enter_context(_replaced(out / file, writer.open, sum(_nbytes(t) for _, t in entries)))
            for name, t in entries:
                whole = whole_tensor(t) if tensor is None else tensor(name, key[name])  # every rank: it gathers
                if writer is not None:
                    writer.append(whole)
                del whole  # one gathered tensor alive at a time, on every rank
    if d.main and len(files) > 1:
        _write_index(out, model, {name: file for file, names in zip(files, shards) for name in names}, total)


def _write_index(out: Path, model, weight_map: dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json, as `save_pretrained` writes it; written after the shards, so an
    index on disk names only complete files."""
    index = {"metadata": {"total_parameters": _num_parameters(model), "total_size": total_size},
             "weight_map": weight_map}
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    _replace(out / INDEX_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def gather_trainable(model, d: Dist) -> dict | None:
    """The trainable parameters of a sharded model (LoRA's adapters: small) whole on rank 0, gathered
    one at a time; None on the other ranks. Every rank must call. The frozen base weights are never
    gathered: an adapter save only keeps the adapters anyway."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    kept = {}
    for name, t in model.state_dict().items():
        if name in names:
            whole = whole_tensor(t)
            if d.main:
                kept[name] = whole.cpu()
    return kept if d.main else None


def _save_order(model, state: dict) -> list[tuple[str, str]]:
    """(name in the files, key in `state`) in the order `save_pretrained` writes them: the model's
    `_keys_to_ignore_on_save` left out, then transformers' reverse weight conversion applied to meta
    stand-ins of the tensors (it renames keys, and sorts them for a model from `from_pretrained`).
    A conversion that makes new tensors (several merged into one) could not be streamed tensor by
    tensor, and tied weights would be written twice (safetensors refuses aliases): both refused."""
    inp, outp = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if inp and outp and inp() is not None and outp() is not None and inp().weight is outp().weight:
        raise UserValueError("cannot stream a model with tied input/output embeddings (FSDP refuses them too)")
    ignore = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    standins = {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in state.items() if k not in ignore}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5 renames nothing on save
        reverted = dict(standins)
    else:
        reverted = revert_weight_conversion(model, dict(standins))
    source = {id(t): k for k, t in standins.items()}
    if len(reverted) != len(standins) or any(id(t) not in source for t in reverted.values()):
        raise UserValueError(f"{type(model).__name__}: transformers converts its weights on save (several tensors "
                             "into one); the final model cannot be written one tensor at a time")
    return [(name, source[id(t)]) for name, t in reverted.items()]


def _save_configs(model, state: dict, out: Path) -> None:
    """config.json (with the dtype and architecture `save_pretrained` records) and, for a model that
    generates, generation_config.json."""
    config = model.config
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), None)
    if dtype is not None:
        config.dtype = str(dtype).split(".")[1]
    config.architectures = [type(model).__name__.removeprefix("FSDP")]  # FSDP2 renames the class it wraps
    config.save_pretrained(out)
    can_generate = getattr(model, "can_generate", None)
    if can_generate is not None and can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)


def remove_stale_weights(out: Path, files: list[str]) -> None:
    """Weight files of an earlier save into `out` that this one does not rewrite (another shard count),
    and its index, removed first: a mix of old and new files must never read as one model."""
    for f in out.iterdir():
        if f.name == INDEX_NAME or (f.name not in files and (f.name == WEIGHTS_NAME or _SHARD_NAME.fullmatch(f.name))):
            f.unlink()


def _replace(path: Path, write) -> None:
    """`write(temporary path)`, fsynced, then renamed onto `path`: a crash mid-write never leaves a
    half-written file under the final name."""
    with _replaced(path, lambda tmp: write(str(tmp))):
        pass


@contextlib.contextmanager
def _replaced(path: Path, start, needed: int | None = None):
    """`start(temporary path)` on entry, the caller writes, then the file is fsynced and renamed onto
    `path` on a clean exit (`start` may return a closer called first); any error removes it, and an
    I/O error is one line naming `path` (`diskio.replacing`)."""
    with replacing(path, needed) as tmp:
        close = start(tmp)
        try:
            yield
        except BaseException:
            if callable(close):  # the body failed: release the file (its own complaint would hide the cause)
                with contextlib.suppress(Exception):
                    close()
            raise
        if callable(close):
            close()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()  # a DTensor's numel is the whole tensor's


def _num_parameters(model) -> int:
    count = getattr(model, "num_parameters", None)
    return count() if count is not None else sum(p.numel() for p in model.parameters())
