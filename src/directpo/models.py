"""Loading Hugging Face causal LMs and tokenizers (hub id or local directory)."""
from __future__ import annotations

import contextlib
import os

import torch

from .data.readers import HUB_ID, hub_went_offline, offline_if_unreachable
from .errors import MissingPackageError, UserValueError
from .precision import limit_onednn_cache, resolve_precision
from .quantized import quantized_for_training, quantized_load_kwargs, read_not_mapped


def quiet_transformers() -> None:
    """Our own progress bar is enough: silence transformers' per-load/per-save bars and info logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def unwrap_peft(model):
    """The adapted model inside a PEFT wrapper (LoRA layers injected), or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ---- A token the model never emits (`--fixed-length`) ----
# Fixed-length completions (issue #31 item 4) suppress EOS until --max-new-tokens. The policy that
# samples them is π' = π renormalised over the vocabulary without EOS at every step, so every
# log-prob of such a completion (training, the reference, the KL estimate, PPO's ratios and
# entropy) must be π''s, not π's: log π'(y_t) = log π(y_t) − log(1 − π(EOS)). The model carries
# the suppressed token on its LM head (`suppress_token`) and every reader of its logits masks that
# column (`mask_suppressed_`): one mark, so no path can sample from π' and score with π.

_SUPPRESSED = "directpo_suppressed_token"


def _head(model):
    model = unwrap_peft(model)
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else model


def suppress_token(model, token_id: int | None) -> None:
    """Mark `token_id` as never emitted by `model` (None: clear the mark). Not saved with the weights."""
    head = _head(model)
    if token_id is None:
        head.__dict__.pop(_SUPPRESSED, None)
    else:
        setattr(head, _SUPPRESSED, int(token_id))


def suppressed_token(model_or_head) -> int | None:
    """The token `suppress_token` marked on this model (or on this LM head), or None."""
    found = getattr(model_or_head, _SUPPRESSED, None)
    return found if found is not None else getattr(_head(model_or_head), _SUPPRESSED, None)


def mask_suppressed_(logits: torch.Tensor, token_id: int | None) -> torch.Tensor:
    """`logits` (…, vocab) with the suppressed token's column at the dtype's lowest finite value, in
    place: its probability is exactly 0, the others renormalise among themselves, and 0 × that
    value stays 0 where −inf would make an entropy NaN."""
    if token_id is not None:
        logits[..., token_id] = torch.finfo(logits.dtype).min
    return logits


def suppress_eos(model, tokenizer, on: bool = True) -> None:
    """`--fixed-length`: mark the tokenizer's EOS as never emitted by `model` (a causal LM; others,
    e.g. a reward model, read no next-token distribution and are left as they are)."""
    if not on or model is None or getattr(unwrap_peft(model), "get_output_embeddings", lambda: None)() is None:
        return
    if tokenizer.eos_token_id is None:
        raise UserValueError("--fixed-length: the tokenizer has no EOS token, so there is nothing to suppress; its "
                             "completions already run to --max-new-tokens unless the model stops otherwise")
    suppress_token(model, tokenizer.eos_token_id)


def attention_widths(config) -> tuple[int, int, int]:
    """(query heads, key-value heads, head width) of a causal LM's config (a vision-language model's:
    its language model's)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    return heads, getattr(text, "num_key_value_heads", None) or heads, \
        getattr(text, "head_dim", None) or text.hidden_size // heads


def pick_device(device: str | None = None) -> torch.device:
    """The requested device (checked: it must exist in this torch build), or cuda when available."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserValueError(f"--device {device!r}: not a device name (cpu, cuda, cuda:1, mps, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU is visible"
        raise UserValueError(f"--device {device}: no CUDA device here (torch {torch.__version__} is {build}); use --device "
                             "cpu or leave --device out")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def autocast_ctx(device: torch.device | str, precision: str):
    """bf16 autocast on `device` for precision 'bf16'; a no-op context for 'fp32'. 'auto' is
    resolved here for callers that did not settle it first (`directpo.precision`)."""
    device = torch.device(device)
    if precision == "auto":
        precision = resolve_precision(precision, device)[0]
    if precision != "bf16":
        return contextlib.nullcontext()
    if device.type == "cpu":
        limit_onednn_cache()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def check_model_source(name_or_dir: str) -> None:
    """A local directory that exists, or a name shaped like a hub id (`name`, `owner/name`). A
    local-looking path that does not exist is refused at once, instead of after a minute of hub
    retries and a message about repo ids."""
    path = os.path.expanduser(name_or_dir)
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise UserValueError(f"{name_or_dir}: is a file; give the model's directory (with config.json) or a hub id")
    first = name_or_dir.split("/")[0]
    local_looking = name_or_dir.startswith(("/", "./", "../", "~", "\\")) or name_or_dir.count("/") > 1 \
        or not HUB_ID.fullmatch(name_or_dir) or ("/" in name_or_dir and os.path.isdir(first))
    if local_looking:
        raise FileNotFoundError(f"{name_or_dir}: no such model directory")
    offline_if_unreachable()


def remote_code_error(name_or_dir: str, e: Exception) -> ValueError | None:
    """One line for a model or tokenizer whose own Python code transformers refused to run (its
    `auto_map` names modules the checkpoint ships): the flag that allows it, and where that code is
    (the local folder and its .py files, or the hub page); None when `e` is another error."""
    if not isinstance(e, ValueError) or "trust_remote_code" not in str(e):
        return None
    path = os.path.expanduser(name_or_dir)
    if os.path.isdir(path):
        code = sorted(n for n in os.listdir(path) if n.endswith(".py"))
        where = f"its own Python code in the folder {os.path.abspath(path)}" + (f" ({', '.join(code)})" if code else "")
    else:
        where = f"its own Python code (see https://huggingface.co/{name_or_dir})"
    return UserValueError(f"{name_or_dir}: loading it runs {where}; directpo runs such code only with "
                          "--trust-remote-code (read the code first: it runs with your permissions)")


@contextlib.contextmanager
def remote_code_explained(name_or_dir: str):
    try:
        yield
    except ValueError as e:
        explained = remote_code_error(name_or_dir, e)
        if explained is None:  # transformers refusing the model's own files (config.json, ...)
            raise UserValueError(str(e) if name_or_dir in str(e) else f"{name_or_dir}: {e}") from e
        raise explained from None


# A tokenizer's vocabulary: one of these files (or `*.model`, `*.tiktoken`), or a tokenizer_config.json
# whose `auto_map` names the checkpoint's own tokenizer code.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "merges.txt")


def check_tokenizer_files(name_or_dir: str) -> None:
    """A local model folder holds tokenizer files, or a one-line FileNotFoundError (transformers
    would otherwise try to build a tokenizer from nothing and ask to install sentencepiece)."""
    import json

    path = os.path.expanduser(name_or_dir)
    if not os.path.isdir(path):
        return
    names = set(os.listdir(path))
    if names.intersection(TOKENIZER_FILES) or any(n.endswith((".model", ".tiktoken")) for n in names):
        return
    config = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config):
        try:
            with open(config, encoding="utf-8") as f:
                if "auto_map" in json.load(f):
                    return
        except (OSError, ValueError):
            pass  # unreadable: said below, with what is missing
        found = "; it has tokenizer_config.json but no vocabulary"
    else:
        found = ""
    raise FileNotFoundError(f"no tokenizer files in {name_or_dir.rstrip('/')}/ (expected tokenizer.json or "
                            f"tokenizer_config.json + vocab files{found})")


def _hub_error(name_or_dir: str, e: OSError) -> OSError:
    """One line for a hub id that could not be loaded (offline, no such repo, gated)."""
    if hub_went_offline():
        from huggingface_hub import constants

        return OSError(f"{name_or_dir}: not a local directory, and not in the local Hugging Face cache "
                       f"({constants.HF_HUB_CACHE}); the hub ({constants.ENDPOINT}) cannot be reached from this "
                       "machine. Give a local model folder, or copy the model into the cache on a machine with network")
    first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return OSError(f"{name_or_dir}: not a local directory, and the Hugging Face hub could not provide it ({first})")


def load_config(name_or_dir: str, trust_remote_code: bool = False):
    """The model's `AutoConfig`, its failures in one line: a folder that holds no config.json
    (transformers would say "Should have a `model_type` key in its config.json"), a hub id that
    cannot be reached, remote code not allowed."""
    from transformers import AutoConfig

    check_model_source(name_or_dir)
    path = os.path.expanduser(name_or_dir)
    if os.path.isdir(path) and not is_adapter_dir(name_or_dir) and \
            not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{name_or_dir}: no config.json in this folder, so it is no model folder (one holds "
                                "config.json, the *.safetensors weights and the tokenizer files); is it the right "
                                "folder, or an incomplete copy or download?")
    quiet_transformers()
    try:
        with remote_code_explained(name_or_dir):
            return AutoConfig.from_pretrained(name_or_dir, trust_remote_code=trust_remote_code)
    except OSError as e:
        if os.path.isdir(path):
            raise
        raise _hub_error(name_or_dir, e) from e


def load_tokenizer(name_or_dir: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    name_or_dir = tokenizer_source(name_or_dir)  # an adapter directory without tokenizer files: its base's
    check_model_source(name_or_dir)
    check_tokenizer_files(name_or_dir)
    quiet_transformers()

    try:
        with remote_code_explained(name_or_dir):
            tok = AutoTokenizer.from_pretrained(name_or_dir, trust_remote_code=trust_remote_code)
    except OSError as e:
        if os.path.isdir(os.path.expanduser(name_or_dir)):
            raise
        raise _hub_error(name_or_dir, e) from e
    give_pad_token(tok)
    return tok


def give_pad_token(tok) -> None:
    """A pad token for a tokenizer that has none. Padding positions are masked out of attention and
    labels, so any id will do; EOS is the conventional choice and keeps the vocabulary unchanged. A
    tokenizer without EOS either gets BOS, UNK or token 0 (a None pad id broke every collator)."""
    if tok.pad_token_id is not None:
        return
    tok.pad_token = next((t for t in (tok.eos_token, tok.bos_token, tok.unk_token) if t is not None),
                         None) or tok.convert_ids_to_tokens(0)


def from_pretrained_checked(auto_class, name_or_dir: str, **kwargs):
    """`auto_class.from_pretrained` from safetensors only (a pickled checkpoint, pytorch_model.bin,
    can run arbitrary code when loaded), its failures said in one line: a folder without
    safetensors, a hub id that cannot be reached, remote code not allowed."""
    try:
        with remote_code_explained(name_or_dir):
            return auto_class.from_pretrained(name_or_dir, use_safetensors=True, **kwargs)
    except OSError as e:
        explained = safetensors_only_error(name_or_dir, e)
        if explained is not None:
            raise explained from e
        if not os.path.isdir(os.path.expanduser(name_or_dir)):
            raise _hub_error(name_or_dir, e) from e
        raise


def load_model(name_or_dir: str, device: torch.device | str = "cpu", trust_remote_code: bool = False,
               dtype: torch.dtype = torch.float32, empty: bool = False, quantize: str | None = None,
               precision: str = "fp32", double_quant: bool = True):
    """A causal LM in `dtype` (fp32 master weights by default), on `device`.

    empty=True: the same architecture on the `meta` device, weights not read and no storage
    allocated (FSDP ranks > 0: rank 0 broadcasts the weights into their shards).
    quantize: nf4, fp4 or int8 (`--quantize`): the linear layers of the blocks loaded through
    bitsandbytes, frozen (`quantized_for_training`), computing in `precision`'s dtype."""
    from transformers import AutoModelForCausalLM

    check_model_source(name_or_dir)
    quantized = quantize not in (None, "none")
    if quantized and empty:
        raise UserValueError("--quantize: a quantized model cannot be built empty (FSDP's meta loading); drop --fsdp")
    if empty:
        config = load_config(name_or_dir, trust_remote_code)
        with remote_code_explained(name_or_dir), torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)

    # safetensors only: a pickled checkpoint (pytorch_model.bin) can run arbitrary code when loaded.
    with read_not_mapped() if quantized else contextlib.nullcontext():
        model = from_pretrained_checked(AutoModelForCausalLM, name_or_dir, dtype=dtype,
                                        trust_remote_code=trust_remote_code,
                                        **(quantized_load_kwargs(quantize, precision, device, double_quant)
                                           if quantized else {}))

    if quantized:  # already on `device` (bitsandbytes places the weights as it quantizes them)
        return quantized_for_training(model, quantize)
    return model.to(device)


# ----------------------------------------------------------------------------------------------
# PEFT adapter directories (`adapter_config.json`) read as models for inference: sample, eval, score,
# best-of-n, plan, inspect. Here, in the bottom layer, because eval/ and inspect/ may not import
# training/ (whose `adapters` module reads them for training, with these at its root).

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(name: str | None) -> bool:
    return bool(name) and os.path.isfile(os.path.join(os.path.expanduser(name), ADAPTER_CONFIG))


def adapter_base(name: str) -> str:
    """The base model an adapter directory names (`base_model_name_or_path`), or a one-line error."""
    import json

    try:
        with open(os.path.join(os.path.expanduser(name), ADAPTER_CONFIG), encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as e:
        raise UserValueError(f"{name}: {ADAPTER_CONFIG} cannot be read ({e})") from None
    if not base:
        raise UserValueError(f"{name}: its {ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    return base


def tokenizer_source(name: str, _depth: int = 0) -> str:
    """Where model `name`'s tokenizer is: an adapter directory's own tokenizer files when it has them
    (a `directpo sft` run saves them), else its base's (down a chain); a whole model itself."""
    path = os.path.expanduser(name)
    if not is_adapter_dir(name) or _depth > 16:
        return name
    if any(os.path.exists(os.path.join(path, f)) for f in (*TOKENIZER_FILES, "tokenizer_config.json")) or \
            any(f.endswith(".model") for f in os.listdir(path)):
        return name
    return tokenizer_source(adapter_base(name), _depth + 1)


def load_model_or_adapter(name_or_dir: str, device: torch.device | str = "cpu", trust_remote_code: bool = False,
                          dtype: torch.dtype = torch.float32, _seen: tuple = ()):
    """`load_model`, or for an adapter directory its base with the adapter merged in (PEFT's
    `merge_and_unload`; a chain of adapters on adapters followed): the model it stands for, to run."""
    if not is_adapter_dir(name_or_dir):
        return load_model(name_or_dir, device, trust_remote_code=trust_remote_code, dtype=dtype)
    base = adapter_base(name_or_dir)
    seen = (*_seen, os.path.realpath(os.path.expanduser(name_or_dir)))
    if os.path.realpath(os.path.expanduser(base)) in seen:
        raise UserValueError(f"{name_or_dir}: its chain of adapters comes back to {base} (base_model_name_or_path in "
                             f"{ADAPTER_CONFIG}): a base model must be a whole model at the end")
    if not os.path.isdir(os.path.expanduser(base)) and not HUB_ID.fullmatch(base):
        raise FileNotFoundError(f"{name_or_dir}: its base model {base} (base_model_name_or_path in {ADAPTER_CONFIG}) "
                                "does not exist; put the base there, or edit that field to where it is now")
    model = load_model_or_adapter(base, "cpu", trust_remote_code, dtype, seen)
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - depends on the environment
        raise MissingPackageError(f"{name_or_dir} is an adapter directory: it needs the `peft` package: pip install "
                                  "'directpo[lora]'") from None
    return PeftModel.from_pretrained(model, os.path.expanduser(name_or_dir)).merge_and_unload().to(device)


def empty_model(name_or_dir: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32):
    """The architecture of `name_or_dir` with its parameters on the meta device (no storage, weights
    not read) but its buffers real, on the CPU: FSDP's meta loading (`Dist.shard_model(weights=...)`).

    Buffers a checkpoint does not hold (rotary `inv_freq`, ...) are made by each module's own
    constructor, on the CPU, exactly as `from_pretrained` makes them: a global parameter-registration
    hook sends every parameter to meta as it is registered, so the constructors run unchanged and
    no per-architecture re-initialisation is needed (a whole-model CPU copy for the buffers would
    defeat the point). Each parameter exists on the CPU only between its allocation (untouched
    pages) and its registration. Initialisers then run on meta tensors: no random numbers drawn."""
    from transformers import AutoModelForCausalLM

    config = load_config(name_or_dir, trust_remote_code)
    return built_on_meta(AutoModelForCausalLM, config, name_or_dir, dtype, trust_remote_code)


def built_on_meta(auto_class, config, name_or_dir: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """`auto_class.from_config(config)` with every parameter sent to the meta device as it is
    registered (buffers real): `empty_model`'s construction, for causal and vision-language models."""
    def to_meta(module, name, param):
        if param is None or param.is_meta:
            return None
        return torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    hook = torch.nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        with remote_code_explained(name_or_dir):
            return auto_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    finally:
        hook.remove()


def safetensors_index(name_or_dir: str) -> dict[str, str]:
    """{tensor name: the safetensors file holding it} of a checkpoint: sharded
    (`model.safetensors.index.json`) or a single `model.safetensors`; a hub id is downloaded (or
    taken from the cache) first, safetensors and their index only. (The files: `safetensors_io`.)"""
    from .safetensors_io import weight_map

    path = os.path.expanduser(name_or_dir)
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(name_or_dir, allow_patterns=["*.safetensors", "*.safetensors.index.json"])
        except OSError as e:
            raise _hub_error(name_or_dir, e) from e
    return weight_map(path, name_or_dir)


def check_vocab(tokenizer, model, name: str, ref=None, ref_name: str | None = None) -> None:
    """Refuse a tokenizer with ids past the model's embedding (an IndexError deep in a forward
    otherwise); with `ref`, the same for the reference, and policy and reference must have the
    same vocabulary size (their log-probs are compared token by token)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise UserValueError(f"{name}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has only "
                             f"{rows} rows: they do not belong together")
    if ref is None:
        return
    ref_name = ref_name or "the reference"
    check_vocab(tokenizer, ref, ref_name)

    def logits_width(m) -> int:  # rows of the output embedding (else the input one, else the config)
        for get in ("get_output_embeddings", "get_input_embeddings"):
            emb = getattr(m, get, lambda: None)()
            if emb is not None and getattr(emb, "weight", None) is not None:
                return emb.weight.shape[0]
        return m.config.vocab_size

    if logits_width(model) != logits_width(ref):
        raise UserValueError(f"{ref_name}: policy and reference have different vocabulary sizes ({name}: "
                             f"{logits_width(model)}, {ref_name}: {logits_width(ref)}); the reference must share "
                             "the policy's tokenizer")


def safetensors_only_error(name_or_dir: str, e: OSError) -> OSError | None:
    """`load_model`'s explanation when `name_or_dir` has no safetensors weights (a `.bin`-only
    checkpoint), for other loaders that read safetensors only; None when `e` is another error."""
    if "safetensors" in str(e).lower() or ".bin" in str(e):
        path = os.path.expanduser(name_or_dir)
        if os.path.isdir(path) and not any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in os.listdir(path)):
            return OSError(f"{name_or_dir}: no weights in this folder (no *.safetensors file, nor any other); "
                           "copy or download them into it, or give the folder that holds them")
        return OSError(f"{name_or_dir}: no safetensors weights found; directpo loads only safetensors (pickled "
                       f".bin checkpoints can run code). Convert it with `save_pretrained` first. ({e})")
    return None


def enable_activation_checkpointing(model) -> None:
    """Recompute each transformer block's activations in the backward instead of storing them
    (`--activation-checkpointing`): Hugging Face's per-layer checkpointing, non-reentrant, which
    replays the block's forward under the saved RNG state, so gradients equal the stored path's.
    It checkpoints the layer's `forward`, not its `__call__`, so FSDP2's hooks stay outside the
    recomputation (no second all-gather for it)."""
    inner = unwrap_peft(model)  # the adapters sit inside the blocks: they are recomputed with them
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise UserValueError(f"--activation-checkpointing: {type(inner).__name__} does not support activation "
                             "checkpointing; drop the flag")
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns there
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def freeze(model):
    """A model used only for inference (the reference): no grads, eval mode."""
    model.eval()
    model.requires_grad_(False)
    return model
