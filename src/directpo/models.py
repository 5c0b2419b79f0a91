"""Loading Hugging Face causal LMs and tokenizers (hub id or local directory)."""
from __future__ import annotations

import contextlib

import torch


def quiet_transformers() -> None:
    """Our own progress bar is enough: silence transformers' per-load/per-save bars and info logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def unwrap_peft(model):
    """The adapted model inside a PEFT wrapper (LoRA layers injected), or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_ctx(device: torch.device | str, precision: str):
    """bf16 autocast on `device` for precision 'bf16'; a no-op context otherwise (fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_tokenizer(name_or_dir: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    quiet_transformers()

    tok = AutoTokenizer.from_pretrained(name_or_dir, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        # Padding positions are masked out of attention and labels, so any id will do; EOS is the
        # conventional choice and keeps the vocabulary unchanged.
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_dir: str, device: torch.device | str = "cpu", trust_remote_code: bool = False,
               dtype: torch.dtype = torch.float32, empty: bool = False):
    """A causal LM in `dtype` (fp32 master weights by default), on `device`.

    empty=True: the same architecture on the `meta` device, weights not read and no storage
    allocated (FSDP ranks > 0: rank 0 broadcasts the weights into their shards)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if empty:
        config = AutoConfig.from_pretrained(name_or_dir, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)

    # safetensors only: a pickled checkpoint (pytorch_model.bin) can run arbitrary code when loaded.
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_dir, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     use_safetensors=True)
    except OSError as e:
        if "safetensors" in str(e).lower() or ".bin" in str(e):
            raise OSError(f"{name_or_dir}: no safetensors weights found; directpo loads only safetensors (pickled "
                          f".bin checkpoints can run code). Convert it with `save_pretrained` first. ({e})") from e
        raise

    return model.to(device)


def freeze(model):
    """A model used only for inference (the reference): no grads, eval mode."""
    model.eval()
    model.requires_grad_(False)
    return model


def autocast_ctx(device: torch.device | str, precision: str):
    """bf16 autocast of matmuls (fp32 master weights) for precision 'bf16', else nothing."""
    import contextlib

    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
