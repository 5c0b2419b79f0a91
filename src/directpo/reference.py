"""Reference log-probs log πref(y|x): computed once per dataset and cached on disk.

πref never changes during DPO, so its log-probs are a fixed table (examples × responses). We
compute the table in one no-grad pass, free the reference model, and store the table under a key
that hashes everything the numbers depend on:

* the reference weights (every parameter's bytes) and its config,
* the token ids of every prompt and response — which captures the data, the tokenizer and the
  truncation settings at once (a tokenizer change that leaves the ids alone cannot change a log-prob),
* the precision the table was computed in.

A second run with the same inputs (or another epoch) reads the table and runs no reference
forward; change any of the above and the key changes, so the table is recomputed. Files are
written atomically (temporary file + rename): a killed run never leaves a half-written table.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CACHE_VERSION = "1"


def default_cache_dir() -> Path:
    if os.environ.get("DIRECTPO_CACHE"):
        return Path(os.environ["DIRECTPO_CACHE"]) / "ref_logps"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "directpo" / "ref_logps"


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the config and every parameter/buffer: any changed weight changes it."""
    h = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    if config is not None:
        h.update(config.to_json_string(use_diff=False).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(examples) -> str:
    h = hashlib.blake2b(digest_size=16)
    for ex in examples:
        h.update(json.dumps([ex.prompt_ids, ex.response_ids], separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


def cache_key(model_fp: str, examples, precision: str) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(f"v{CACHE_VERSION}|{model_fp}|{data_fingerprint(examples)}|{precision}".encode())
    return h.hexdigest()


def reference_logps(ref_model, examples, compute, precision: str = "fp32", cache_dir: str | Path | None = None,
                    model_fp: str | None = None, log=None) -> tuple[torch.Tensor, bool]:
    """The (len(examples), K) reference table and whether it came from the cache.

    `compute(ref_model, examples)` produces the table when it is not cached. `cache_dir=None`
    disables the cache.
    """
    log = log or (lambda msg: print(f"[directpo] {msg}", file=sys.stderr, flush=True))
    if cache_dir is None:
        return compute(ref_model, examples), False
    key = cache_key(model_fp or model_fingerprint(ref_model), examples, precision)
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.exists():
        try:
            table = load_file(str(path))["logps"]
            if table.shape[0] == len(examples):
                log(f"reference log-probs: cache hit {path}")
                return table, True
        except Exception as e:  # noqa: BLE001 - a damaged cache file is recomputed, not trusted
            log(f"reference log-probs: ignoring unreadable cache file {path} ({e})")
    table = compute(ref_model, examples)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"logps": table.contiguous()}, str(tmp), metadata={"examples": str(len(examples)),
                                                                  "precision": precision})
    os.replace(tmp, path)
    log(f"reference log-probs: computed and cached at {path}")
    return table, False
