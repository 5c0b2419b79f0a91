"""Quantized base weights (QLoRA, `--quantize nf4|fp4|int8`): bitsandbytes through transformers'
loader, the checkpoint read tensor by tensor while it is quantized, and what PEFT's
`prepare_model_for_kbit_training` does that a directpo run needs (`models.load_model` and
`vision.load_vision_model` load through it)."""
from __future__ import annotations

import contextlib

import torch

from .errors import MissingPackageError, UserValueError
from .memory import trim_heap

QUANTIZE_EXTRA = "pip install 'directpo[quantize]'"


def require_bitsandbytes(what: str) -> None:
    """A one-line `MissingPackageError` naming the extra to install when bitsandbytes is missing
    (said when the settings are checked, before anything loads)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MissingPackageError(f"{what} needs the bitsandbytes package: {QUANTIZE_EXTRA}") from None


def quantization_config(quantize: str, precision: str = "fp32", double_quant: bool = True):
    """transformers' `BitsAndBytesConfig` for `--quantize`: nf4/fp4 are QLoRA's 4-bit blocks (64
    weights share an absmax; `double_quant` quantizes those absmaxes to 8 bits too, as the QLoRA
    paper does), dequantized for each matmul into `precision`'s dtype; int8 is LLM.int8 (a scale
    per output row). The LM head is left unquantized (transformers' default)."""
    from transformers import BitsAndBytesConfig

    require_bitsandbytes(f"--quantize {quantize}")
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantize not in ("nf4", "fp4"):
        raise UserValueError(f"--quantize {quantize!r}: choose nf4, fp4 or int8")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=torch.bfloat16 if precision == "bf16" else torch.float32)


def quantized_load_kwargs(quantize: str, precision: str, device, double_quant: bool = True) -> dict:
    """`from_pretrained`'s keywords for a quantized load onto `device` (bitsandbytes quantizes each
    weight where it is placed, so the whole-precision model never exists there)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return {"quantization_config": quantization_config(quantize, precision, double_quant),
            "device_map": {"": str(dev)}}


@contextlib.contextmanager
def read_not_mapped():
    """Within the block, transformers reads safetensors tensor by tensor with pread(2) instead of
    memory-mapping the files (the `pread` backend of `safetensors.safe_open`, which transformers
    itself picks on Windows and MPS): for a quantized load. Mapped, every page of the fp32
    checkpoint that quantization reads stays in the process's resident set until the load ends
    (clean file pages, but counted: a Qwen2-0.5B-shaped model peaked at 3.5 GiB to hold 0.7); read,
    each fp32 tensor is a buffer of its own, freed once bitsandbytes has quantized it (the same
    bytes, so the same 4-bit codes). Where transformers opens files otherwise (another version),
    nothing changes: mapped as before."""
    try:
        import transformers.modeling_utils as loader
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - depends on the environment
        yield
        return
    if getattr(loader, "safe_open", None) is not safe_open:
        yield
        return

    def pread_open(*args, **kwargs):
        return safe_open(*args, **{**kwargs, "backend": "pread"})

    loader.safe_open = pread_open
    try:
        yield
    finally:
        loader.safe_open = safe_open


def _mapped_ranges() -> list[tuple[int, int]] | None:
    """[start, end) of this process's memory-mapped safetensors files (/proc/self/maps); None where
    that cannot be read."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            lines = [line.split() for line in f]
    except OSError:
        return None
    return [tuple(int(a, 16) for a in w[0].split("-")) for w in lines if w[-1].endswith(".safetensors")]


def quantized_for_training(model, quantize: str):
    """What PEFT's `prepare_model_for_kbit_training` does that a directpo run needs, and no more.

    * Every base weight is frozen: the LoRA adapters added next are the only trainable tensors.
    * No fp32 up-cast of every norm, embedding and the LM head: they are loaded in fp32 already
      (directpo's master weights, `load_model`'s dtype); PEFT's cast is for checkpoints loaded in
      fp16/bf16, and would here copy nothing, or under another dtype double their memory for
      frozen weights that autocast casts anyway.
    * No input-gradient hook on the embedding: PEFT adds it for reentrant activation checkpointing,
      whose recomputed blocks would otherwise see no input that needs a gradient; directpo's is
      non-reentrant (`enable_activation_checkpointing`) and needs none. Nor is checkpointing
      switched on here: `--activation-checkpointing` decides.

    The lean MLP and LoRA forwards (`directpo.fused`) take plain and 4-bit (nf4, fp4) base layers,
    not LLM.int8's: with int8 they run bitsandbytes' own forward, said once with what it costs."""
    from .console import log

    model.requires_grad_(False)
    # Mapped (not `read_not_mapped`), the unquantized weights on the CPU (embeddings, norms, LM head)
    # are views of the checkpoint's mapping, and they keep all of it alive: every page quantization
    # read, the fp32 source of the quantized layers too, stays resident (`base`, nf4: +65 MiB).
    # Their own copies let the mapping go. Read with pread they are buffers of their own already
    # (a copy would only double the embedding for a moment).
    mapped = _mapped_ranges()  # (None: not known, so copy every one)
    copied: set[int] = set()
    with torch.no_grad():
        for p in model.parameters():
            if type(p) is torch.nn.Parameter and p.device.type == "cpu" and id(p) not in copied:
                copied.add(id(p))  # (once: tied weights stay one tensor)
                if mapped is None or any(a <= p.data_ptr() < b for a, b in mapped):
                    p.data = p.data.clone()
    trim_heap()  # the freed fp32 tensors of the load sit between the kept 4-bit ones
    if quantize == "int8":  # bitsandbytes logs the fp16 cast at every matmul: said once, here
        import logging

        logging.getLogger("bitsandbytes.autograd._functions").addFilter(
            lambda record: "inputs will be cast" not in record.getMessage())
        log("--quantize int8: LLM.int8 computes each quantized matmul from fp16 inputs, and the outlier features "
            "it keeps in fp16 are chosen per micro-batch, so a response's log-prob depends slightly (~1e-4) on the "
            "examples beside it")
        log("--quantize int8: the blocks' linear layers run bitsandbytes' forward, not directpo's lean MLP and "
            "LoRA paths (directpo.fused takes plain and 4-bit weights): each MLP keeps 4 (tokens × intermediate) "
            "activations instead of 2; the norms and the LM head keep their lean paths")
    return model


