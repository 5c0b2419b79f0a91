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
written atomically (temporary file + rename): a killed run never leaves a half-written table, and a
full disk leaves none either: the run goes on uncached, with a one-line warning naming the disk (so
does a cache folder that cannot be one: `DIRECTPO_CACHE` naming a file, or an unwritable folder). Each
file carries a checksum of its table and the key it was written under; a file whose numbers no
longer match (edited, damaged, copied under another name) is recomputed, with a warning.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .console import log as console_log
from .diskio import replacing, tensor_bytes, write_error
from .precision import cache_folder_problem, cache_root

CACHE_VERSION = "2"  # 2: tables carry a checksum


def default_cache_dir() -> Path:
    """ref_logps/ under directpo's user cache folder (`precision.cache_root`: $DIRECTPO_CACHE, ...)."""
    return cache_root()[0] / "ref_logps"


def usable_cache_dir(cache_dir: str | Path | None, log) -> Path | None:
    """`cache_dir`, or None (with a one-line warning naming what set it, e.g. 'DIRECTPO_CACHE=/x is
    a file, not a folder') when no table can be cached there: the run goes on uncached."""
    if cache_dir is None:
        return None
    problem = cache_folder_problem(Path(cache_dir))
    if problem is None:
        return Path(cache_dir)
    if problem not in _warned:  # once per process, not once per table
        _warned.add(problem)
        log(f"warning: reference log-probs not cached: {problem}; going on without the cache")
    return None


_warned: set[str] = set()


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


def table_checksum(table: torch.Tensor) -> str:
    return hashlib.sha256(table.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def read_cached(path: Path, key: str, n: int, log) -> torch.Tensor | None:
    """The cached table at `path` if it is whole and unchanged, else None (with a warning)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta, table = f.metadata() or {}, f.get_tensor("logps")
    except Exception as e:  # noqa: BLE001 - a damaged cache file is recomputed, not trusted
        log(f"warning: reference log-probs: ignoring unreadable cache file {path} ({e}); recomputing")
        return None
    if meta.get("key") != key or meta.get("sha256") != table_checksum(table) or table.shape[0] != n:
        log(f"warning: reference log-probs: cache file {path} does not match its checksum (edited or damaged); "
            "recomputing")
        return None
    return table


def reference_logps(ref_model, examples, compute, precision: str = "fp32", cache_dir: str | Path | None = None,
                    model_fp: str | None = None, log=None) -> tuple[torch.Tensor, bool]:
    """The (len(examples), K) reference table and whether it came from the cache.

    `compute(ref_model, examples)` produces the table when it is not cached. `cache_dir=None`
    disables the cache.
    """
    log = log or console_log
    cache_dir = usable_cache_dir(cache_dir, log)
    if cache_dir is None:
        return compute(ref_model, examples), False
    key = cache_key(model_fp or model_fingerprint(ref_model), examples, precision)
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.exists():
        table = read_cached(path, key, len(examples), log)
        if table is not None:
            log(f"reference log-probs: cache hit {path}")
            return table, True
    table = compute(ref_model, examples).contiguous()
    metadata = {"examples": str(len(examples)), "precision": precision, "key": key, "sha256": table_checksum(table)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path, tensor_bytes(table)) as tmp:
            save_file({"logps": table}, str(tmp), metadata=metadata)
    except OSError as e:  # a cache: the run has its table, it only loses the saving for the next one
        log(f"warning: reference log-probs not cached: {write_error(e, path) or e}; going on without the cache")
        return table, False
    log(f"reference log-probs: computed and cached at {path}")
    return table, False
