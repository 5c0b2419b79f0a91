"""PEFT adapter directories (`adapter_config.json` + `adapter_model.safetensors`, e.g. the output of
`directpo sft --lora-r 16`) used as models: `--model ADAPTER_DIR`, `--ref ADAPTER_DIR` and
`directpo merge` (`training.merge`).

`--model ADAPTER_DIR` loads the adapter's base (`base_model_name_or_path`) and then either

* continues training that adapter (no `--lora-r`): πref is the adapter's own model, base + a frozen
  copy of the adapter loaded as a second adapter named "reference" (TRL's "load the adapter twice"),
  so πref = πSFT as the paper prescribes, with one copy of the base in memory; or
* with `--lora-r R` (`--new-adapter` says it explicitly) merges the adapter into the base in memory
  and trains a fresh LoRA on top: πref is the merged model, i.e. the new adapters disabled.

`--ref ADAPTER_DIR` loads that adapter as the "reference" adapter on the policy's own base (they
must share it): πref runs with it alone active (`reference_adapter_on`), the policy with its own.

An adapter directory may name another adapter directory as its base (a chain base → SFT adapter →
DPO adapter, e.g. saved by an earlier directpo): `AdapterDir.chain` lists the adapters below, and
they are merged in order. A new adapter trained on a merged one is saved folded with it into one
LoRA on the chain's root (`fold_onto_root`), because PEFT's loaders do not follow a chain.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from ..console import log
from ..errors import MissingPackageError, UserValueError
from ..models import (  # noqa: F401 (tokenizer_source: re-exported, its callers import it from here)
    ADAPTER_CONFIG,
    check_model_source,
    is_adapter_dir,
    tokenizer_source,
)

REFERENCE = "reference"  # the name of πref's adapter on the policy's base


@dataclass(frozen=True)
class AdapterDir:
    """An adapter directory as its config describes it."""

    path: str  # as given
    base: str  # base_model_name_or_path: a local directory (maybe another adapter's) or a hub id
    config: dict = field(repr=False)
    chain: tuple[AdapterDir, ...] = ()  # the adapters below this one (innermost first), when `base` is one

    @property
    def root(self) -> str:
        """The whole model at the bottom of the chain."""
        return self.chain[0].base if self.chain else self.base

    @property
    def quantized(self) -> bool:
        """The adapter was trained on a quantized base (its config records the quantization)."""
        return any(a.config.get("quantization_config") for a in (*self.chain, self))


def read_adapter_dir(name: str | None, flag: str = "--model", _seen: tuple = ()) -> AdapterDir | None:
    """The adapter directory `name` (None when it is not one: a whole model or a hub id), its base
    checked to exist, or a one-line error naming the adapter directory and the base it names."""
    if not is_adapter_dir(name):
        return None
    path = os.path.join(os.path.expanduser(name), ADAPTER_CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserValueError(f"{flag} {name}: {ADAPTER_CONFIG} cannot be read ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise UserValueError(f"{flag} {name}: not a LoRA adapter ({ADAPTER_CONFIG} says peft_type "
                             f"{config.get('peft_type') if isinstance(config, dict) else '?'}); directpo loads LoRA "
                             "adapters")
    base = config.get("base_model_name_or_path")
    if not base:
        raise UserValueError(f"{flag} {name}: its {ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    try:
        check_model_source(base)
    except (FileNotFoundError, UserValueError):
        raise FileNotFoundError(f"{flag} {name}: its base model {base} (base_model_name_or_path in {ADAPTER_CONFIG}) "
                                "does not exist; put the base there, or edit that field to where it is now") from None
    seen = (*_seen, base_key(name))
    if base_key(base) in seen:
        raise UserValueError(f"{flag} {name}: its chain of adapters comes back to {base} (base_model_name_or_path in "
                             f"{ADAPTER_CONFIG}): a base model must be a whole model at the end")
    inner = read_adapter_dir(base, flag, seen)  # an adapter trained on another, merged (`adapt_policy`)
    chain = (*inner.chain, inner) if inner is not None else ()
    return AdapterDir(name, base, config, chain)


def check_adapter_settings(cfg) -> None:
    """The adapter directories of a `TrainConfig` that cannot work, refused before anything loads,
    one line each: a base that is not there, --new-adapter without an adapter to merge, --fsdp, a
    reference adapter on another base than the policy's or on a merged one."""
    model, ref = read_adapter_dir(cfg.model, "--model"), read_adapter_dir(cfg.ref, "--ref")
    if model is not None and ref is not None and base_key(ref.path) in (base_key(model.path), base_key(model.base)):
        ref = None  # --ref naming the --model adapter (its default πref: `directpo pipeline`'s stage 2) or its base
    if cfg.new_adapter and model is None:
        raise UserValueError(f"--new-adapter: --model {cfg.model} is not an adapter directory (no {ADAPTER_CONFIG})")
    if cfg.fsdp and (model or ref):
        raise UserValueError(f"--fsdp does not load an adapter directory ({(model or ref).path}) yet: merge it first "
                             "(directpo merge) and train from the merged model")
    if cfg.ref_sync_every and (ref is not None or model is not None and not cfg.lora_r):
        raise UserValueError("--ref-sync-every moves πref towards the policy's own adapter: it does not combine with "
                             "a reference adapter (--ref ADAPTER_DIR, or --model ADAPTER_DIR continued); use "
                             "--new-adapter --lora-r R")
    if model is not None and cfg.lora_r and getattr(cfg, "quantize", "none") not in (None, "none"):
        raise UserValueError(f"--quantize {cfg.quantize} with --lora-r would merge --model's adapter into rounded "
                             "quantized weights: merge it first (directpo merge) and train from the merged model, or "
                             "drop --lora-r to train the adapter further")
    if ref is None:
        return
    if model is not None and cfg.lora_r:
        raise UserValueError(f"--ref {cfg.ref}: a reference adapter shares the policy's base weights, and with "
                             f"--lora-r the base in memory is --model's adapter merged in; give a whole model as --ref")
    policy_base = model.base if model is not None else cfg.model  # (with a chain, the adapters below merged)
    if base_key(ref.base) != base_key(policy_base):
        raise UserValueError(f"--ref {cfg.ref}: its base model is {ref.base}, the policy's is {policy_base}; a "
                             "reference adapter must sit on the policy's own base (or give a whole model as --ref)")


def base_key(name: str) -> str:
    """A model's identity for comparing bases: a local directory's real path, else the hub id."""
    path = os.path.expanduser(name)
    return os.path.realpath(path) if os.path.isdir(path) else name


def adapter_numel(path: str) -> int:
    """The parameters an adapter directory holds, from its safetensors header (no tensor read)."""
    from safetensors import safe_open

    file = os.path.join(os.path.expanduser(path), "adapter_model.safetensors")
    if not os.path.isfile(file):
        return 0  # (a pickled adapter_model.bin is not opened)
    with safe_open(file, "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (not iterable)


def _peft():
    try:
        import peft
    except ImportError:  # pragma: no cover - depends on the environment
        raise MissingPackageError("an adapter directory needs the `peft` package: pip install 'directpo[lora]'") \
            from None
    return peft


def merge_chain(model, adapter: AdapterDir):
    """`model` (the chain's root, loaded) with every adapter below `adapter` merged in, in order."""
    for inner in adapter.chain:
        model = _peft().PeftModel.from_pretrained(model, inner.path).merge_and_unload()
    return model


def adapt_policy(model, adapter: AdapterDir, lora_r: int):
    """The policy of `--model ADAPTER_DIR` on its loaded base (`adapter.root`): the adapter itself,
    trainable (continue training it); or with `lora_r` the adapter merged into the base, ready for a
    fresh LoRA (`lora.apply_lora`) whose recorded base is then the adapter directory. Says what πref is."""
    model = merge_chain(model, adapter)
    PeftModel = _peft().PeftModel
    if lora_r:
        merged = PeftModel.from_pretrained(model, adapter.path).merge_and_unload()
        # the new adapter belongs to the merged model: it names the adapter directory as its base
        merged.name_or_path = merged.config._name_or_path = os.path.abspath(os.path.expanduser(adapter.path))
        log(f"--model {adapter.path}: its adapter merged into its base {adapter.base} in memory; a new LoRA "
            f"(r {lora_r}) is trained on top; πref = the merged model (the adapter's model, πSFT: new adapters "
            f"disabled). The saved adapter folds both into one LoRA on {adapter.root} (`fold_onto_root`: "
            "loadable by PEFT's AutoPeftModelForCausalLM), or pass --merge for the merged model")
        return merged
    return PeftModel.from_pretrained(model, adapter.path, is_trainable=True)


def add_reference_adapter(policy, adapter: AdapterDir, policy_base: str, flag: str, continued: bool) -> None:
    """Load `adapter` as the "reference" adapter onto the policy's base (one copy of the base),
    frozen (its base checked first: `check_adapter_settings`)."""
    policy.load_adapter(adapter.path, adapter_name=REFERENCE, is_trainable=False)  # (not made active)
    what = "the adapter's own model (base + a frozen copy of the adapter: πSFT)" if continued else \
        f"base + the reference adapter {adapter.path}"
    log(f"{flag} {adapter.path}: πref = {what}, on the policy's base {policy_base} (one copy of the base)")


def has_reference_adapter(model) -> bool:
    return REFERENCE in (getattr(model, "peft_config", None) or {})


@contextlib.contextmanager
def reference_adapter_on(model):
    """The reference adapter alone active, the policy's adapter off, for πref's forward passes;
    every adapter's requires_grad as it was afterwards (PEFT's `set_adapter` changes them)."""
    tuner = model.base_model
    before = list(model.active_adapters)
    grads = [(p, p.requires_grad) for n, p in model.named_parameters() if "lora_" in n]
    tuner.set_adapter(REFERENCE, inference_mode=True)
    try:
        yield
    finally:
        tuner.set_adapter(before)
        for p, g in grads:
            p.requires_grad_(g)


def drop_reference_adapter(model) -> None:
    """Remove the reference adapter (before the policy is saved: its adapter alone is the artefact)."""
    if has_reference_adapter(model):
        model.delete_adapter(REFERENCE)


# ----------------------------------------------------------------------------------------------
# One LoRA on the true base: a new adapter trained on a merged one (`--model ADAPTER_DIR --lora-r R`)
# is saved folded with the adapters below it, because PEFT's loaders do not follow a chain of bases:
# `AutoPeftModelForCausalLM` would load the top adapter onto the SFT adapter's *base* without error
# and silently leave the SFT part out.

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$|"
                       r"^(?P<emodule>.+)\.(?P<epart>lora_embedding_A|lora_embedding_B)$")


def fold_onto_root(out) -> str | None:
    """When the adapter saved in `out` names another adapter directory as its base, rewrite its files
    as ONE LoRA on the chain's root, exactly: for each target module ΔW = Σ s_i·B_i·A_i =
    [s_1·B_1 | s_2·B_2 | …]·[A_1; A_2; …], a LoRA of rank Σ r_i with the scalings folded into B and
    lora_alpha = r (scaling 1; per-module ranks zero-padded to the largest, so no rank_pattern);
    `modules_to_save` as the last adapter saving the module left it, plus the LoRA deltas after it.
    Returns what was done for the log (None: nothing to fold)."""
    top = read_adapter_dir(str(out), "--model")
    if top is None or not top.chain:
        return None
    layers = [(a.path, a.config, _adapter_weights(a.path)) for a in (*top.chain, top)]
    lora: dict[str, list] = {}  # module → [(A, s·B)], innermost adapter first
    whole: dict[str, dict] = {}  # module → {parameter: tensor} (modules_to_save)
    for path, config, weights in layers:
        _check_foldable(path, config)
        blocks, saved = _split_weights(path, config, weights)
        for module, params in saved.items():
            lora.pop(module, None)  # its copy was made from the merged module: earlier deltas are in it
            whole[module] = params
        for module, (a, b, embedding) in blocks.items():
            scale = _scaling(config, module, a.shape[0])
            if module in whole:  # a LoRA on a module an earlier adapter saved whole: add its delta
                delta = scale * (b.double() @ a.double())
                w = whole[module]["weight"]
                w = w + (delta.T if embedding or config.get("fan_in_fan_out") else delta).to(w.dtype)
                whole[module] = {**whole[module], "weight": w}
            else:
                lora.setdefault(module, []).append((a, scale * b, embedding))
    rank = max((sum(a.shape[0] for a, _, _ in parts) for parts in lora.values()), default=0)
    if not rank:
        raise UserValueError(f"{out}: the folded adapter would hold no LoRA module; merge it instead (directpo merge)")
    tensors = {}
    for module, parts in lora.items():
        dtype = parts[-1][0].dtype  # (the trained adapter's)
        a = torch.cat([p[0].to(dtype) for p in parts], 0)
        b = torch.cat([p[1].to(dtype) for p in parts], 1)
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])], 0)  # zero blocks: rank made uniform
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], 1)
        names = ("lora_embedding_A", "lora_embedding_B") if parts[0][2] else ("lora_A.weight", "lora_B.weight")
        tensors[f"{_PREFIX}{module}.{names[0]}"], tensors[f"{_PREFIX}{module}.{names[1]}"] = \
            a.contiguous(), b.contiguous()
    for module, params in whole.items():
        for name, t in params.items():
            tensors[f"{_PREFIX}{module}.{name}"] = t.contiguous()
    root = top.root
    root = os.path.abspath(os.path.expanduser(root)) if os.path.isdir(os.path.expanduser(root)) else root
    config = {**top.config, "r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {},
              "alpha_pattern": {}, "target_modules": sorted(lora), "layers_to_transform": None,
              "layers_pattern": None, "exclude_modules": None, "modules_to_save": sorted(whole) or None,
              "base_model_name_or_path": root}
    from safetensors.torch import save_file

    save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    below = ", ".join(a.path for a in top.chain)
    return f"the adapter below it ({below}) folded in: one LoRA of rank {rank} on its base {root}"


def _adapter_weights(path: str) -> dict:
    from safetensors.torch import load_file

    file = os.path.join(os.path.expanduser(path), "adapter_model.safetensors")
    if not os.path.isfile(file):
        raise UserValueError(f"{path}: no adapter_model.safetensors to fold into the saved adapter (a pickled "
                             "adapter_model.bin is not read); save that adapter as safetensors")
    return load_file(file)


def _check_foldable(path: str, config: dict) -> None:
    """Plain LoRA only: a DoRA magnitude or an adapter bias does not add up across adapters."""
    why = ("DoRA (use_dora) rescales the merged weight: its adapters do not add up" if config.get("use_dora") else
           f"its bias {config.get('bias')!r} (only 'none' adds up)" if config.get("bias", "none") != "none" else
           "its LoRA bias (lora_bias)" if config.get("lora_bias") else
           "its trainable tokens (trainable_token_indices)" if config.get("trainable_token_indices") else None)
    if why:
        raise UserValueError(f"{path}: cannot be folded into one LoRA on its base: {why}; save with --merge (the "
                             "merged model) or merge it first (directpo merge) and train from the merged model")


def _split_weights(path: str, config: dict, weights: dict):
    """({module: (A, B, is_embedding)}, {module: {parameter: tensor}} of modules_to_save, or of base
    layers the adapter carries whole (they replace the base's: the same as a saved copy))."""
    blocks: dict[str, dict] = {}
    saved: dict[str, dict] = {}
    to_save = config.get("modules_to_save") or []
    for key, t in weights.items():
        name = key.removeprefix(_PREFIX)
        m = _LORA_KEY.match(name)
        if m:
            module, part = m["module"] or m["emodule"], (m["part"] or m["epart"])[-1]
            blocks.setdefault(module, {})[part] = (t, m["emodule"] is not None)
            continue
        module, _, param = name.rpartition(".")
        if module.endswith(".base_layer"):  # its base layer saved whole (PEFT's save_embedding_layers): a copy
            saved.setdefault(module[:-len(".base_layer")], {})[param] = t
            continue
        if not any(module == s or module.endswith("." + s) for s in to_save):
            raise UserValueError(f"{path}: cannot be folded into one LoRA on its base: it holds {key}, neither a "
                                 "LoRA weight nor a module of modules_to_save")
        saved.setdefault(module, {})[param] = t
    return {m: (p["A"][0], p["B"][0], p["A"][1]) for m, p in blocks.items()}, saved


def _scaling(config: dict, module: str, rank: int) -> float:
    """PEFT's scaling of `module` in that adapter: lora_alpha (or alpha_pattern's) over r, or over √r
    with rsLoRA (the rank read from the weights, which rank_pattern sized)."""
    from peft.utils.other import get_pattern_key

    pattern = config.get("alpha_pattern") or {}
    alpha = pattern.get(get_pattern_key(pattern.keys(), module), config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
