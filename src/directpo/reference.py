"""Reference log-probs log πref(y|x): computed once and cached on disk, row by row.

πref never changes during DPO, so its log-probs are a fixed table (examples × responses). We
compute the table in no-grad passes, free the reference model, and keep the rows on disk: one file
per reference model and precision (its name hashes the reference weights — every parameter's
bytes — its config and the precision), a row per example keyed by a hash of the example's prompt
and response token ids, which captures the data, the tokenizer and the truncation settings at once
(a tokenizer change that leaves the ids alone cannot change a log-prob).

A later run with the same reference reads the rows it needs and computes only the others: another
epoch or an identical run computes nothing, a `--max-steps` run that drew a few rows leaves them
for the whole run after it, and an edited data set costs only its changed rows. Change the weights
or the precision and it is another file. Files are written atomically (temporary file + rename): a
killed run never leaves a half-written table, and a full disk leaves none either: the run goes on
uncached, with a one-line warning naming the disk (so does a cache folder that cannot be one:
`DIRECTPO_CACHE` naming a file, or an unwritable folder). Each file carries a checksum of its rows
and keys and the key it was written under; a file whose numbers no longer match (edited, damaged,
copied under another name) is recomputed, with a warning.

A row served from the cache may differ in the last bits from the one a fresh pass would give: its
micro-batch companions then differed, and with them the matmul shapes (float re-association,
~1e-7 relative), as between one process and several.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .console import log as console_log
from .diskio import replacing, tensor_bytes, write_error
from .models import suppressed_token
from .precision import cache_folder_problem, cache_root

CACHE_VERSION = "3"  # 2: tables carry a checksum; 3: one file per model and precision, rows keyed by example
KEY_BYTES = 16


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
    banned = suppressed_token(model)  # --fixed-length: πref' is another distribution (none: as before)
    if banned is not None:
        h.update(f"suppressed token {banned}".encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def row_keys(examples) -> torch.Tensor:
    """(len(examples), 16) uint8: a hash of each example's prompt and response token ids (and of its
    image tensors, as the processor made them), the key of its row in the cache (the ids capture
    the data, the tokenizer and the truncation at once)."""
    out = bytearray()
    for ex in examples:
        h = hashlib.blake2b(json.dumps([ex.prompt_ids, ex.response_ids], separators=(",", ":")).encode(),
                            digest_size=KEY_BYTES)
        # an image row: its pixels too (the same text about another picture is another row)
        vision = getattr(ex, "vision", None)
        if getattr(vision, "digest", None) is not None:  # made on demand: the hash of its images and settings
            h.update(vision.digest)
        for name, t in sorted((vision or {}).items() if isinstance(vision, dict) else ()):
            h.update(name.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        out += h.digest()
    return torch.tensor(list(out), dtype=torch.uint8).reshape(-1, KEY_BYTES)


def cache_key(model_fp: str, precision: str) -> str:
    """The name of one reference model's table, in one precision: its rows are keyed by example."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"v{CACHE_VERSION}|{model_fp}|{precision}".encode())
    return h.hexdigest()


def table_checksum(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RowCache:
    """One reference model's log-probs in one precision, a row per example ever computed, keyed by
    the example's token ids (`row_keys`): a run reads the rows it needs and computes only the
    others, so a `--max-steps 3` run's few rows serve a later whole run, and a data set that grew
    or changed in a few rows costs only those rows. The file holds `logps` (rows × the widest
    ranking, NaN past an example's responses) and `keys`, with the model key and a checksum of both
    in its header: an edited, damaged or renamed file is recomputed with a warning, never trusted."""

    def __init__(self, cache_dir: Path, model_fp: str, precision: str, log):
        self.key, self.precision, self.log = cache_key(model_fp, precision), precision, log
        self.path = Path(cache_dir) / f"{self.key}.safetensors"

    def read(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logps, keys) of the file, or None when there is none or it cannot be trusted."""
        if not self.path.exists():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta, logps, keys = f.metadata() or {}, f.get_tensor("logps"), f.get_tensor("keys")
        except Exception as e:  # noqa: BLE001 - a damaged cache file is recomputed, not trusted
            self.log(f"warning: reference log-probs: ignoring unreadable cache file {self.path} ({e}); recomputing")
            return None
        if meta.get("key") != self.key or meta.get("sha256") != table_checksum(logps, keys) \
                or logps.shape[0] != keys.shape[0]:
            self.log(f"warning: reference log-probs: cache file {self.path} does not match its checksum (edited or "
                     "damaged); recomputing")
            return None
        return logps, keys

    def lookup(self, examples) -> tuple[torch.Tensor, list[int]]:
        """(the table for `examples`, NaN in the rows not cached; the indices of those rows)."""
        width = max((len(ex.response_ids) for ex in examples), default=0)
        table = torch.full((len(examples), width), float("nan"))
        stored = self.read()
        if stored is None:
            return table, list(range(len(examples)))
        logps, keys = stored
        where = {bytes(k): i for i, k in enumerate(keys.numpy())}
        missing = []
        for i, k in enumerate(row_keys(examples).numpy()):
            j = where.get(bytes(k))
            if j is None:
                missing.append(i)
            else:
                n = len(examples[i].response_ids)
                table[i, :n] = logps[j, :n]
        return table, missing

    def store(self, examples, table: torch.Tensor) -> bool:
        """Add the rows of `examples` (their `table` rows) to the file, keeping the rows already there
        (read again now: another run may have added some since). False, with a warning, when it
        cannot be written (a full disk): the run has its table and goes on uncached."""
        keys = row_keys(examples)
        stored = self.read()
        if stored is not None:
            old_logps, old_keys = stored
            new = {bytes(k) for k in keys.numpy()}
            keep = torch.tensor([bytes(k) not in new for k in old_keys.numpy()], dtype=torch.bool)
            width = max(old_logps.shape[1], table.shape[1])
            pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=float("nan"))  # noqa: E731
            table, keys = torch.cat([pad(old_logps[keep]), pad(table)]), torch.cat([old_keys[keep], keys])
        table, keys = table.float().contiguous(), keys.contiguous()
        metadata = {"rows": str(len(keys)), "precision": self.precision, "key": self.key,
                    "sha256": table_checksum(table, keys)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with replacing(self.path, tensor_bytes(table) + tensor_bytes(keys)) as tmp:
                save_file({"logps": table, "keys": keys}, str(tmp), metadata=metadata)
        except OSError as e:  # a cache: the run has its table, it only loses the saving for the next one
            self.log(f"warning: reference log-probs not cached: {write_error(e, self.path) or e}; going on without "
                     "the cache")
            return False
        return True


def open_cache(cache_dir: str | Path | None, model_fp: str, precision: str, log=None) -> RowCache | None:
    """The row cache of a reference model (`model_fp`) in `cache_dir`, or None when off or unusable."""
    log = log or console_log
    cache_dir = usable_cache_dir(cache_dir, log)
    return None if cache_dir is None else RowCache(cache_dir, model_fp, precision, log)


def reference_logps(ref_model, examples, compute, precision: str = "fp32", cache_dir: str | Path | None = None,
                    model_fp: str | None = None, log=None) -> tuple[torch.Tensor, bool]:
    """The (len(examples), K) reference table and whether all of it came from the cache.

    `compute(ref_model, examples)` produces the rows the cache does not hold. `cache_dir=None`
    disables the cache.
    """
    log = log or console_log
    cache = open_cache(cache_dir, model_fp or model_fingerprint(ref_model), precision, log) \
        if cache_dir is not None else None
    return cached_table(cache, examples, lambda exs: compute(ref_model, exs), log)


def cached_table(cache: RowCache | None, examples, compute, log, agree=None) -> tuple[torch.Tensor, bool]:
    """(the table of `examples`, whether every row came from `cache`): the cached rows read, the
    others computed by `compute(examples)` and added to the cache. `agree(missing) -> missing`: the
    rows every process computes (under torchrun only rank 0 reads the cache and the ranks compute
    the rows it lacks together)."""
    if cache is None:
        width = max((len(ex.response_ids) for ex in examples), default=0)
        table, missing = torch.full((len(examples), width), float("nan")), list(range(len(examples)))
    else:
        table, missing = cache.lookup(examples)
    if agree is not None:
        missing = agree(missing)
    if not examples:
        return table, False
    if not missing:
        if cache is not None:
            log(f"reference log-probs: cache hit {cache.path}")
        return table, True
    todo = [examples[i] for i in missing]
    fill(table, missing, compute(todo))
    if cache is None:
        return table, False
    stored = cache.store(todo, table[missing])
    if len(missing) < len(examples):
        log(f"reference log-probs: {len(examples) - len(missing)} of {len(examples)} rows from the cache "
            f"{cache.path}, {len(missing)} computed" + (" and cached" if stored else ""))
    elif stored:
        log(f"reference log-probs: computed and cached at {cache.path}")
    return table, False


def fill(table: torch.Tensor, rows: list[int], part: torch.Tensor) -> None:
    """Put `part` (one row per index in `rows`, maybe narrower) into `table` at `rows`."""
    if rows:
        table[rows, :part.shape[1]] = part.to(table.dtype)
