"""`directpo merge ADAPTER_DIR --out DIR`: a LoRA adapter merged into its base, written as an ordinary
Hugging Face model folder (safetensors shards, config.json, generation config, tokenizer) that
`AutoModelForCausalLM.from_pretrained` loads.

Streamed: the base is never loaded whole. The output's tensors are planned from the base's
architecture on the meta device (no storage), then written shard file by shard file through the
FSDP export's writer (`export.export_model`), each tensor read from the base's safetensors when
its turn comes, its adapter delta added, cast, appended and dropped: one base tensor in memory at
a time, plus the adapter (small). The arithmetic is PEFT's `merge_and_unload`, in its order:
W ← W + (B·A)·s (s = α/r, α/√r with rsLoRA), in the base weight's dtype, each adapter of a chain
in turn (an adapter trained on a merged one: base → SFT adapter → DPO adapter).

What the stream does not cover is merged in memory by PEFT itself, said in the log: tied
input/output embeddings (written once, as `save_pretrained` does), LoRA variants (DoRA, adapter
biases), and a quantized base (`--dequantize`: its weights dequantized first; it needs
bitsandbytes).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import check_settings, setting
from ..console import log
from ..diskio import write_text
from ..errors import UserValueError
from ..models import empty_model, load_config, load_model, load_tokenizer
from ..outputs import LOCK_FILE, RunLock, check_output_dir
from .adapters import AdapterDir, read_adapter_dir, tokenizer_source
from .distributed import Dist
from .export import export_model

MERGE_COMPLETE = "merge_complete.json"
MERGE_MARKERS = (MERGE_COMPLETE, LOCK_FILE)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class MergeConfig:
    """A LoRA adapter merged into its base"""

    adapter: str = setting(None, "the adapter directory (adapter_config.json + adapter_model.safetensors, e.g. from "
                                 "`directpo sft --lora-r`)", required=True, positional=True, metavar="ADAPTER_DIR",
                           input=True)
    out: str = setting(None, "the folder to write the merged model into (safetensors, config, tokenizer)",
                       required=True)
    dtype: str = setting("auto", "the merged weights' dtype: auto (the base checkpoint's own), bf16 or fp32",
                         choices=["auto", "bf16", "fp32"])
    dequantize: bool = setting(False, "merge although the base is quantized (a quantization_config in its config or "
                                      "the adapter's): into its dequantized weights; the merged model then differs "
                                      "from the one trained by the quantization error")
    overwrite: bool = setting(False, "write into a folder that already holds a merged model", switch="--overwrite")
    trust_remote_code: bool = setting(False, "allow the base model's repo to run its own Python code")

    def validate(self) -> MergeConfig:
        check_settings(self)
        return self


def merge(cfg: MergeConfig) -> dict:
    """Merge as `cfg` says; returns what merge_complete.json records."""
    cfg.validate()
    adapter = read_adapter_dir(cfg.adapter, "merge")
    if adapter is None:
        if not Path(cfg.adapter).exists():
            raise UserValueError(f"merge: {cfg.adapter}: no such file or directory (give the adapter's folder: the "
                                 "run's output directory or a checkpoint holding adapter_config.json)")
        raise UserValueError(f"merge: {cfg.adapter} is not an adapter directory (no adapter_config.json)")
    check_output_dir(cfg.out, {"ADAPTER_DIR": cfg.adapter, "its base": adapter.root,
                               **{f"the adapter {a.path}": a.path for a in adapter.chain}},
                     cfg.overwrite, flag="--out", markers=MERGE_MARKERS, what="merged model")
    if (Path(cfg.out) / MERGE_COMPLETE).exists() and not cfg.overwrite:
        raise UserValueError(f"--out {cfg.out} holds a merged model already: pass --overwrite to replace it")
    base_config = _base_config(adapter.root, cfg.trust_remote_code)
    quantized = _quantized(adapter, base_config)
    if quantized and not cfg.dequantize:
        raise UserValueError(f"merge: the base is quantized ({quantized}): merging into rounded weights gives another "
                             "model than the one trained; pass --dequantize to merge into its dequantized weights")
    if quantized:
        log(f"warning: merge: the base is quantized ({quantized}); --dequantize: merged into its whole weights, the "
            "merged model differs from the one trained by the quantization error")
    dtype = DTYPES.get(cfg.dtype) or _checkpoint_dtype(base_config)
    with RunLock(cfg.out, "merge"):
        out = Path(cfg.out)
        (out / MERGE_COMPLETE).unlink(missing_ok=True)  # a merge replaced half-way is not complete
        why = _not_streamable(adapter, base_config) or ("a quantized checkpoint" if base_config.get(
            "quantization_config") else None)
        if why:
            log(f"merge: {why}: merged in memory (PEFT's merge_and_unload)")
            _merge_in_memory(adapter, out, dtype, cfg.trust_remote_code)
        else:
            _merge_streamed(adapter, out, dtype, cfg.trust_remote_code)
        load_tokenizer(tokenizer_source(cfg.adapter), trust_remote_code=cfg.trust_remote_code).save_pretrained(out)
        record = {"adapter": os.path.abspath(cfg.adapter), "base": adapter.root,
                  "chain": [os.path.abspath(a.path) for a in (*adapter.chain, adapter)],
                  "dtype": str(dtype).removeprefix("torch."), "streamed": not why}
        write_text(out / MERGE_COMPLETE, json.dumps(record, indent=1) + "\n")  # last: the merge is whole
    log(f"merged {cfg.adapter} into its base {adapter.root}: {out} ({record['dtype']})")
    return {"out": str(out), **record}


def _base_config(root: str, trust_remote_code: bool) -> dict:
    return load_config(root, trust_remote_code).to_dict()


def _quantized(adapter: AdapterDir, base_config: dict) -> str | None:
    """Where a quantized base is recorded, or None."""
    if base_config.get("quantization_config"):
        return f"quantization_config in {adapter.root}/config.json"
    found = next((a for a in (*adapter.chain, adapter) if a.config.get("quantization_config")), None)
    return f"quantization_config in {found.path}/adapter_config.json" if found else None


def _checkpoint_dtype(base_config: dict) -> torch.dtype:
    name = base_config.get("dtype") or base_config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _not_streamable(adapter: AdapterDir, base_config: dict) -> str | None:
    """Why the stream cannot merge this adapter (then PEFT merges in memory), or None."""
    text = base_config.get("text_config") or base_config
    if text.get("tie_word_embeddings", base_config.get("tie_word_embeddings")):
        return "tied input/output embeddings"
    for a in (*adapter.chain, adapter):
        c = a.config
        variant = next((k for k in ("use_dora", "lora_bias", "use_qalora") if c.get(k)), None)
        if variant or c.get("layer_replication"):
            return f"{a.path} uses {variant or 'layer_replication'}"
    return None


def _merge_in_memory(adapter: AdapterDir, out: Path, dtype: torch.dtype, trust_remote_code: bool) -> None:
    from peft import PeftModel

    model = load_model(adapter.root, trust_remote_code=trust_remote_code)
    if getattr(model, "is_quantized", False) or getattr(model, "quantization_method", None):
        model = model.dequantize()
    for a in (*adapter.chain, adapter):
        model = PeftModel.from_pretrained(model, a.path).merge_and_unload()
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.to(dtype).save_pretrained(out)


def _merge_streamed(adapter: AdapterDir, out: Path, dtype: torch.dtype, trust_remote_code: bool) -> None:
    from safetensors import safe_open

    from ..models import safetensors_index

    model = empty_model(adapter.root, trust_remote_code=trust_remote_code, dtype=dtype)
    files = safetensors_index(adapter.root)
    deltas = [_adapter_deltas(a) for a in (*adapter.chain, adapter)]
    keys = set(model.state_dict())
    unknown = sorted({k for level in deltas for k in level} - keys)
    if unknown:
        raise UserValueError(f"merge: {adapter.path} adapts {unknown[0]}, which its base {adapter.root} does not have")

    def tensor(name: str, key: str) -> torch.Tensor:
        if name not in files:
            raise UserValueError(f"merge: {adapter.root} holds no tensor {name}")
        with safe_open(files[name], framework="pt") as f:
            w = f.get_tensor(name)
        with torch.no_grad():
            for level in deltas:
                if key in level:
                    w = level[key](w)
        return w.to(dtype)

    export_model(model, out, Dist(), tensor=tensor)


def _adapter_deltas(a: AdapterDir) -> dict:
    """{state key of a base tensor: w -> w merged with this adapter}, from its safetensors file:
    LoRA on linear layers (A, B) and embeddings (PEFT's lora_embedding_A/B, delta transposed), and
    whole tensors the adapter saved in place of the base's (`modules_to_save`)."""
    from safetensors.torch import load_file

    path = Path(os.path.expanduser(a.path)) / "adapter_model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"merge: {a.path} has no adapter_model.safetensors (directpo reads safetensors only)")
    weights = load_file(str(path))
    out = {}
    for name, t in weights.items():
        key = name.removeprefix("base_model.model.")
        for a_part, b_part, embedding in ((".lora_A.weight", ".lora_B.weight", False),
                                          (".lora_embedding_A", ".lora_embedding_B", True)):
            if key.endswith(a_part):
                module = key.removesuffix(a_part)
                b = weights[name.removesuffix(a_part) + b_part]
                transpose = embedding or bool(a.config.get("fan_in_fan_out"))
                out[f"{module}.weight"] = _add_delta(t, b, _scaling(a.config, module, t.shape[0]), transpose)
        if ".lora_" not in key:  # a whole tensor the adapter holds (modules_to_save, or an adapted embedding's
            # base, saved by PEFT with it): it replaces the base's
            out[key.replace(".modules_to_save", "").replace(".base_layer", "")] = lambda w, new=t: new.to(w.dtype)
    return out


def _scaling(c: dict, module: str, r: int) -> float:
    """PEFT's s for `module`: its alpha (alpha_pattern, else lora_alpha) over its rank (√rank with rsLoRA)."""
    alpha = c.get("lora_alpha", 8)
    for pattern, value in (c.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            alpha = value
            break
    return alpha / (r ** 0.5 if c.get("use_rslora") else r)


def _add_delta(a: torch.Tensor, b: torch.Tensor, scale: float, transpose: bool):
    """w -> w + (B·A)·s as PEFT merges it: `get_delta_weight` (fp16/bf16 factors multiplied in fp32;
    PEFT loads them in fp32 anyway), added into the base weight in its own dtype."""
    def merged(w: torch.Tensor) -> torch.Tensor:
        delta = b.float() @ a.float() if a.dtype in (torch.float16, torch.bfloat16) else b @ a
        return w.clone().add_((delta.T if transpose else delta) * scale)
    return merged
