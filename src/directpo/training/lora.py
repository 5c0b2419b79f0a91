"""LoRA adapters (PEFT). The reference model is the same network with the adapters disabled, so a
LoRA run holds one copy of the base weights, not two (torchtune's recipe)."""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

from ..errors import MissingPackageError, UserValueError

# `--quantize`: the base weights as bitsandbytes holds them (`quantized.quantization_config`); here, not
# there, because the settings read it to build `--help`, which loads no torch.
QUANTIZE = ("none", "nf4", "fp4", "int8")


def check_quantize(cfg) -> None:
    """The `--quantize` settings of a `TrainConfig` that cannot work, refused before anything
    loads, one line each; a missing bitsandbytes names the extra to install."""
    from ..config import ConfigError

    q = cfg.quantize
    if q == "none" or not q:
        if not cfg.double_quant:
            raise ConfigError("--no-double-quant: only --quantize nf4 or fp4 reads it (there is nothing quantized)")
        return
    if q not in QUANTIZE:
        raise ConfigError(f"--quantize {q!r}: choose {', '.join(QUANTIZE)}")
    from ..models import is_adapter_dir

    adapters = cfg.lora_r or is_adapter_dir(cfg.model)  # (--model ADAPTER_DIR: its adapter trains on)
    why = ("quantized weights do not train: add LoRA adapters with --lora-r (QLoRA trains the adapters alone)"
           if not adapters else
           "FSDP2 shards plain tensors, not bitsandbytes' quantized weights; drop --fsdp" if cfg.fsdp else
           "merging the adapters into rounded quantized weights saves a model other than the one trained; drop "
           "--merge (the adapters are saved) and merge them into the unquantized base" if cfg.merge else
           "--no-double-quant is for the 4-bit formats (int8 has one scale per row)"
           if q == "int8" and not cfg.double_quant else None)
    if why:
        raise ConfigError(f"--quantize {q}: {why}")
    from ..quantized import require_bitsandbytes

    require_bitsandbytes(f"--quantize {q}")


def quantize_kwargs(cfg) -> dict:
    """`models.load_model`'s keywords for the run's `--quantize` (none: {})."""
    if getattr(cfg, "quantize", "none") in ("none", None):
        return {}
    return {"quantize": cfg.quantize, "precision": cfg.precision, "double_quant": cfg.double_quant}


def apply_lora(model, r: int, alpha: float, target_modules: str, dropout: float = 0.0):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:  # pragma: no cover - depends on the environment
        raise MissingPackageError("LoRA needs the `peft` package: pip install 'directpo[lora]'") from None
    targets = target_modules if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",")]
    if targets != "all-linear":
        check_lora_targets(model, targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # PEFT reads transformers' deprecated `is_gradient_checkpointing`: not the user's to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def check_lora_targets(model, targets: list[str]) -> None:
    """Every name of `--lora-target-modules` matches a module (PEFT's rule: the whole dotted name or
    its tail), else one line naming the misses and the model's linear layers. PEFT itself raises only
    when no name matches: a misspelt name beside a right one would silently adapt fewer layers."""
    import torch

    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in targets if not t or not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserValueError(f"--lora-target-modules: {', '.join(repr(t) for t in missing)} match no module of the "
                             f"model; its linear layers are {', '.join(linear)}: give a comma list of those, or "
                             "all-linear")


def apply_lora_to_empty(model, r: int, alpha: float, target_modules: str, dropout: float = 0.0):
    """LoRA on a model whose parameters are on the meta device (FSDP's meta loading): (the adapted
    model, all on meta; {name in the inner model: the adapters' initial values, on the CPU}).

    PEFT creates and initialises adapters on the CPU, then moves them to their base layer's device,
    so on meta the random values would be lost (though drawn). Here each meta parameter is stood in
    for by a CPU tensor of its shape with one element of storage (a broadcast view), so PEFT keeps the
    adapters on the CPU: the same random draws, in the same order, as `apply_lora` on the loaded
    model, i.e. the same values under the same seed on every rank. The adapters are small (r × width
    per target); the stand-ins go back to meta afterwards."""
    import torch

    standin: dict[int, torch.nn.Parameter] = {}  # by identity: tied parameters stay tied
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in standin:
                    standin[id(p)] = torch.nn.Parameter(torch.zeros((), dtype=p.dtype).expand(p.shape),
                                                        requires_grad=p.requires_grad)
                m._parameters[name] = standin[id(p)]
    model = apply_lora(model, r, alpha, target_modules, dropout)
    inner = model.get_base_model()
    initial = {n: p.detach().clone() for n, p in inner.named_parameters() if p.requires_grad}
    # parameters only: `model.to("meta")` would also lose the buffers `empty_model` made real
    meta: dict[int, torch.nn.Parameter] = {}
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None and not p.is_meta:
                if id(p) not in meta:
                    meta[id(p)] = torch.nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
                m._parameters[name] = meta[id(p)]
    return model, initial


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def adapters_disabled(model):
    """Context in which `model` computes πref: adapters off for a LoRA model (or, when it holds a
    reference adapter, `--ref ADAPTER_DIR`, that adapter alone on: `adapters`), else as it is."""
    from .adapters import has_reference_adapter, reference_adapter_on

    if has_reference_adapter(model):
        return reference_adapter_on(model)
    return model.disable_adapter() if is_lora(model) else contextlib.nullcontext()


def record_base_path(model) -> None:
    """Make the base model that `adapter_config.json` names loadable from any working directory: a
    base given as an existing local directory (maybe relative) is recorded as its absolute path; a
    hub id stays as given."""
    for config in getattr(model, "peft_config", {}).values():
        base = getattr(config, "base_model_name_or_path", None) or getattr(model.get_base_model(), "name_or_path", None)
        if base and Path(base).is_dir():
            config.base_model_name_or_path = str(Path(base).resolve())


def save_policy(model, out, merge: bool = False, state_dict: dict | None = None):
    """Adapters (adapter_model.safetensors + adapter_config.json, naming the base model by its
    absolute path when it is a local directory), or with merge=True the merged full model, loadable
    by AutoModelForCausalLM.from_pretrained. `state_dict`: gathered weights of a sharded model.

    Written into a temporary folder inside `out` and moved into place when whole (`diskio.staging_dir`):
    a full disk leaves `out` as it was and is one line naming the disk and the space it needed; a
    warning comes first when the disk looks too small.

    Adapters load with `AutoPeftModelForCausalLM.from_pretrained(out)`, or
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)`."""
    from ..diskio import staging_dir, tensor_bytes, warn_if_short
    from .export import remove_stale_weights

    from .adapters import drop_reference_adapter

    drop_reference_adapter(model)  # πref's adapter (--ref ADAPTER_DIR) is no part of the trained policy
    if is_lora(model) and merge:
        model = model.merge_and_unload()
    elif is_lora(model):
        record_base_path(model)
    if state_dict is not None:
        needed = tensor_bytes(state_dict)
    elif is_lora(model):  # the adapters alone are saved
        needed = tensor_bytes([p for p in model.parameters() if p.requires_grad])
    else:
        needed = tensor_bytes(model.state_dict())
    warn_if_short(out, needed, f"the final model ({out})")
    with staging_dir(out, needed, f"; the final model was not written (the files in {out} are as they were)") as tmp:
        if state_dict is not None:
            model.save_pretrained(tmp, state_dict=state_dict)
        else:
            model.save_pretrained(tmp)
        if is_lora(model) and state_dict is None:
            from ..console import log
            from .adapters import fold_onto_root

            # a new adapter on a merged --model adapter: saved as one LoRA on the true base
            folded = fold_onto_root(tmp)
            if folded:
                log(f"{out}: {folded}")
        # weight files of an earlier save into `out` that this one does not rewrite (another shard count)
        remove_stale_weights(Path(out), [f.name for f in tmp.iterdir()])
