"""Preference data in: JSONL/JSON/Parquet files, `datasets` sources (a local directory or a hub
id) and in-memory rows (`Rows`) read as records, `(row, dict)`, for `formats` to give a shape; and
JSONL written out (`write_jsonl`).

Rows are numbered from 0 in source order; a message says them 1-based: "line N" in line-based files
(JSONL), "row N" in JSON arrays, Parquet, `datasets` and in-memory sources (`errors.location`). A
row that cannot be read (not an object, not UTF-8) is yielded as a `DataError`, so the caller
decides whether it stops the run. Text must be valid Unicode: a byte that is not UTF-8 is an error
of its line (JSONL) or row (JSON).
"""
from __future__ import annotations

import codecs
import gzip
import json
import os
import re
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..diskio import replacing
from .errors import LINE_SUFFIXES, DataError

FILE_SUFFIXES = LINE_SUFFIXES + (".json", ".json.gz", ".parquet")
# Suffixes that make a name a file path, never a hub dataset id (read or not).
PATH_SUFFIXES = FILE_SUFFIXES + (".txt", ".csv", ".tsv", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".arrow",
                                 ".feather", ".pkl", ".pickle", ".pt", ".npy", ".yaml", ".yml", ".xml", ".html", ".md")
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
IN_MEMORY = "in-memory data"


class Rows(str):
    """In-memory rows where a data source is named: a list of dicts, or a `datasets.Dataset`.

    The string itself is the name messages use ("in-memory data, row 2, field 'chosen': missing"),
    and what recorded settings say of it; `.rows` holds the rows. A copy is the same object
    (`dataclasses.asdict` deep-copies settings: the rows are shared, never copied)."""

    rows: Any

    def __new__(cls, rows: Any, name: str = IN_MEMORY) -> "Rows":
        if isinstance(rows, (str, bytes, Mapping)) or not hasattr(rows, "__iter__"):
            raise TypeError(f"in-memory rows are a list of dicts or a `datasets.Dataset`, not a {type(rows).__name__}"
                            + (" (of a DatasetDict, pass one split: ds['train'])" if isinstance(rows, Mapping) else ""))
        self = super().__new__(cls, name)
        self.rows = rows
        return self

    def __copy__(self) -> "Rows":
        return self

    def __deepcopy__(self, memo: dict) -> "Rows":
        return self

    def __reduce__(self):
        return type(self), (self.rows, str(self))


_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_hub_probe: bool | None = None  # whether this process found the hub unreachable and went offline (probed once)


def offline_if_unreachable(timeout: float = 3.0) -> bool:
    """Before a hub id (a model's or a data set's) is loaded: when the hub's host takes no connection
    within `timeout` seconds, huggingface_hub's offline mode for the rest of the process
    (HF_HUB_OFFLINE=1 as if the user had set it), so a cached model or data set loads at once and a
    missing one fails at once, not after 30-50 s of retries (measured: `sample --model owner/name`
    51 s, `inspect --data owner/name` 30 s without network). Nothing is probed under a proxy (the
    host is reached through it) or when offline mode is already on. True if it went offline."""
    global _hub_probe
    if _hub_probe is not None:
        return _hub_probe
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    _hub_probe = False
    if constants.HF_HUB_OFFLINE or any(os.environ.get(k) for k in _PROXY_VARS):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        constants.HF_HUB_OFFLINE = _hub_probe = True
    return _hub_probe


def hub_went_offline() -> bool:
    """Whether `offline_if_unreachable` found the hub unreachable (and put this process offline)."""
    return bool(_hub_probe)


def read_records(spec: str, split: str | None = None) -> Iterator[tuple[int, dict | DataError]]:
    """Yield (row, record) from a JSONL/JSON/Parquet file, from `datasets.load_dataset(spec)`, or
    from the rows of a `Rows`.

    Rows are numbered from 0 in file order (for JSONL: the line index, blank lines included, so
    row N is line N+1). A row that cannot be read (not a JSON object, not UTF-8) is yielded as a
    DataError, so the caller decides whether it stops the run.

    What `spec` names: an existing file is read by its suffix (an unsupported one is an error); an
    existing directory, or a hub id (`name` or `owner/name` of letters, digits and `._-`, with no
    file suffix), goes to `datasets`, where `spec:split` picks a split. Anything else is a local
    path that does not exist, and an error at once (not a hub round trip). A `Rows` is read as it
    is (a split is an error: its rows are one)."""
    if isinstance(spec, Rows):
        if split is not None:
            raise DataError(spec, None, None, f"a split ({split!r}) picks from a `datasets` source, not from rows "
                                              "given in memory")
        yield from _read_in_memory(spec)
        return
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        yield from _read_file(spec, path)
        return
    if os.path.isdir(path):
        yield from _read_hf_dataset(spec, path, split)
        return
    base = spec
    colon = spec.find(":", spec.rfind("/") + 1)
    if split is None and colon > 0:  # name:split
        base, split = spec[:colon], spec[colon + 1:] or None
        if os.path.isdir(os.path.expanduser(base)):
            yield from _read_hf_dataset(spec, os.path.expanduser(base), split)
            return
        if os.path.isfile(os.path.expanduser(base)):
            raise DataError(spec, None, None, f"a split (':{split}') picks from a `datasets` source, not a file")
    if not is_hub_id(base):
        raise DataError(spec, None, None, "no such file or directory")
    offline_if_unreachable()
    yield from _read_hf_dataset(spec, base, split)


def _read_in_memory(spec: Rows) -> Iterator[tuple[int, dict | DataError]]:
    """The rows of `spec`, numbered from 0; a row that is not a dict (a mapping) is a DataError of
    its row, as a JSONL line that is not an object is."""
    for i, rec in enumerate(undecoded_images(spec.rows)):
        if isinstance(rec, Mapping):
            yield i, (rec if isinstance(rec, dict) else dict(rec))
        else:
            yield i, DataError(spec, i, None, f"a {type(rec).__name__}, not a dict of fields", kind="malformed")


def is_hub_id(name: str) -> bool:
    """`name` or `owner/name` of [A-Za-z0-9._-], with no file suffix: a hub dataset id, not a path."""
    return HUB_ID.fullmatch(name) is not None and not name.lower().endswith(PATH_SUFFIXES)


def _read_file(spec: str, path: str):
    lower = path.lower()
    if lower.endswith(LINE_SUFFIXES):
        yield from _read_jsonl(spec, path)
    elif lower.endswith((".json", ".json.gz")):
        yield from _read_json(spec, path)
    elif lower.endswith(".parquet"):
        yield from _read_parquet(spec, path)
    else:
        raise DataError(spec, None, None, f"unsupported file type: directpo reads {', '.join(FILE_SUFFIXES)} "
                                          "files, a `datasets` directory or a hub dataset id")


def _raw_lines(spec: str, path: str) -> Iterator[tuple[int, bytes]]:
    """(index, bytes) of each line, gunzipped for .gz; an unreadable file or gzip stream is a DataError."""
    i = -1
    try:
        with (gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")) as f:
            for i, line in enumerate(f):
                yield i, line
    except (OSError, EOFError, zlib.error) as e:
        after = f" after line {i + 1}" if i >= 0 else ""
        what = "corrupt or truncated gzip data" if path.lower().endswith(".gz") else "cannot read the file"
        raise DataError(spec, None, None, f"{what}{after}: {e}") from None


def _loads(text: str, where: bool = True) -> tuple[Any, str | None]:
    """(value, None), or (None, what is wrong) for text that is not JSON Python can hold; `where`
    adds the line and column of a syntax error."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"{e.msg} (line {e.lineno}, column {e.colno})" if where else f"{e.msg} (column {e.colno})"
    except RecursionError:
        return None, "nested too deeply"
    except ValueError as e:  # e.g. an integer beyond Python's digit limit
        return None, str(e)


def _not_utf8(raw: bytes, err: UnicodeDecodeError) -> str:
    """Where the first non-UTF-8 byte of `raw` is: its value, line and column (1-based)."""
    head = raw[:err.start]
    line = head.count(b"\n") + 1
    column = len(head[head.rfind(b"\n") + 1:].decode("utf-8", "replace")) + 1
    return f"not valid UTF-8: byte 0x{raw[err.start]:02x} at line {line}, column {column}"


def _read_jsonl(spec: str, path: str):
    for i, raw in _raw_lines(spec, path):
        if i == 0 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            column = len(raw[:e.start].decode("utf-8", "replace")) + 1
            yield i, DataError(spec, i, None, f"not valid UTF-8: byte 0x{raw[e.start]:02x} at column {column}; "
                                              "the file must be UTF-8", kind="encoding")
            continue
        if not line.strip():
            continue
        rec, problem = _loads(line, where=False)  # one line: its column says where
        if problem is not None:
            yield i, DataError(spec, i, None, f"malformed JSON: {problem}", kind="malformed")
        elif not isinstance(rec, dict):
            yield i, DataError(spec, i, None, f"a JSON {type(rec).__name__}, not an object", kind="malformed")
        else:
            yield i, rec


def _read_json(spec: str, path: str):
    raw = b"".join(line for _, line in _raw_lines(spec, path))
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        text, bad = raw.decode("utf-8"), None
    except UnicodeDecodeError as e:  # read on: the bad bytes become lone surrogates, and their rows errors
        text, bad = raw.decode("utf-8", "surrogateescape"), e
    data, problem = _loads(text)
    if problem is not None:
        raise DataError(spec, None, None, _not_utf8(raw, bad) if bad else f"malformed JSON: {problem}",
                        kind="encoding" if bad else "malformed")
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}: a single list of rows
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(spec, None, None, "expected a JSON list of rows, or an object holding exactly one list")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(spec, None, None, f"expected a JSON list of rows, got {type(data).__name__}")
    for i, rec in enumerate(data):
        escaped = lone_surrogate(rec, _ESCAPED_BYTE) if bad else None
        if not isinstance(rec, dict):
            yield i, DataError(spec, i, None, f"row is a JSON {type(rec).__name__}, not an object", kind="malformed")
        elif escaped:
            yield i, DataError(spec, i, escaped[0], f"not valid UTF-8: byte 0x{ord(escaped[1]) - 0xDC00:02x}; "
                                                    "the file must be UTF-8", kind="encoding")
        else:
            yield i, rec


def _read_parquet(spec: str, path: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(spec, None, None, f"cannot read as Parquet: {e}") from None
    yield from enumerate(rows)


def _read_hf_dataset(spec: str, name: str, split: str | None):
    """Hugging Face `datasets`: a hub id or a local dataset dir (`spec` is what the user wrote)."""
    import datasets

    if hub_went_offline():  # (datasets keeps its own copy of the setting)
        datasets.config.HF_HUB_OFFLINE = True
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # noqa: BLE001 - re-raised with the name the user gave
        if hub_went_offline() and not os.path.isdir(name):
            raise DataError(spec, None, None, "not a local file or folder, and not in the local Hugging Face cache; "
                                              "the hub cannot be reached from this machine") from e
        raise DataError(spec, None, None, f"could not load as a file or a Hugging Face dataset: {e}") from e
    for i, rec in enumerate(undecoded_images(ds)):
        yield i, rec


def undecoded_images(ds: Any) -> Any:
    """The rows of a `datasets.Dataset` with Image columns as stored, {"bytes", "path"}, not decoded
    PIL images: rows keep encoded references (`images.ImageRef`), not every image's pixels at once.
    Anything else (a list of dicts, a dataset without images) is returned as it is."""
    features = getattr(ds, "features", None)
    if not isinstance(features, Mapping) or not hasattr(ds, "with_format") or not any(
            "Image(" in repr(f) for f in features.values()):
        return ds
    return (rec for table in ds.with_format("arrow").iter(batch_size=256) for rec in table.to_pylist())


def lone_surrogate(value: Any, pattern: re.Pattern | None = None) -> tuple[str | None, str] | None:
    """(where, char) of the first lone surrogate in the strings (and keys) of a nested value, else None.

    Such text cannot be encoded (tokenizers refuse it): it comes from "\\\\ud800"-style escapes, or
    from bytes that were not UTF-8. `where` is the key path below `value` ("[0].content"), or None
    for `value` itself. Walked without recursion: JSON nests deeper than Python's stack."""
    pattern = pattern or SURROGATE
    stack: list[tuple[str | None, Any]] = [(None, value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, str):
            m = pattern.search(v)
            if m:
                return where, m.group()
        elif isinstance(v, dict):
            for k, x in reversed(list(v.items())):
                inner = f"{where}.{k}" if where else str(k)
                m = pattern.search(k) if isinstance(k, str) else None
                if m:
                    return inner, m.group()
                stack.append((inner, x))
        elif isinstance(v, (list, tuple)):
            stack.extend((f"{where or ''}[{j}]", x) for j, x in reversed(list(enumerate(v))))
    return None


SURROGATE = re.compile(r"[\ud800-\udfff]")
_ESCAPED_BYTE = re.compile(r"[\udc80-\udcff]")  # what "surrogateescape" decodes a non-UTF-8 byte to


# ----------------------------------------------------------------------------------------------
# Writing


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """One JSON object per line. Written to a temporary sibling and renamed: the file is whole or
    absent, never half-written. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path
