"""Preference data: files and datasets in, one canonical `Example` type out.

Accepted row shapes (detected per row):

* explicit text pairs        {"prompt": str, "chosen": str, "rejected": str}
* HH-RLHF transcripts        {"chosen": str, "rejected": str}: the prompt is the shared prefix, cut
                             after its last "\\n\\nAssistant:" marker (Bai et al. 2022 format)
* conversational pairs       {"prompt": [messages], "chosen": [messages], "rejected": [messages]},
                             messages being {"role", "content"}; rendered later with the
                             tokenizer's chat template. Without "prompt", the shared leading
                             messages of chosen and rejected are the prompt.
* ranked responses           {"prompt", "responses": [...], "ranking": [best, ..., worst]} or
                             {"prompt", "responses", "scores": [...]} (higher is better)
* completions (for SFT)      {"prompt": str, "completion": str}
* unpaired completions       {"prompt", "completion", "label": true | false}: one completion and
  (KTO)                      whether it is desirable, a JSON boolean (anything else is an error of
                             the field). Text, or conversational: "completion" a list of messages,
                             "prompt" a list of messages or a string (then one user message).
                             Empty prompts and completions follow the pairs' rules.

Every problem is a `DataError` that names the source, the row and the field: "line N" (1-based,
as editors count) in line-based files (JSONL), "row N" (1-based) in JSON arrays, Parquet and
`datasets` sources. With ``on_invalid="skip"`` such rows are skipped *and counted* (`SkipReport`),
never dropped silently. Text must be valid Unicode: a byte that is not UTF-8 is an error of its
line (JSONL) or row (JSON), and so is a lone surrogate (``"\\ud800"`` escapes).
"""
from __future__ import annotations

import codecs
import gzip
import json
import math
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

HH_ASSISTANT = "\n\nAssistant:"
LINE_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")  # one record per line: errors say "line N"
FILE_SUFFIXES = LINE_SUFFIXES + (".json", ".json.gz", ".parquet")
# Suffixes that make a name a file path, never a hub dataset id (read or not).
PATH_SUFFIXES = FILE_SUFFIXES + (".txt", ".csv", ".tsv", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".arrow",
                                 ".feather", ".pkl", ".pickle", ".pt", ".npy", ".yaml", ".yml", ".xml", ".html", ".md")
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")

Text = str | list  # plain text, or a list of {"role", "content"} messages
T = TypeVar("T")


def message_text(value: Text) -> str:
    """A text, or the concatenated contents of a list of {role, content} messages."""
    return value if isinstance(value, str) else "".join(m.get("content", "") for m in value)


def location(source: str, row: int) -> str:
    """How a message names 0-based row `row` of `source`: "line N" (1-based) in a line-based file,
    else "row N" (1-based)."""
    unit = "line" if str(source).lower().endswith(LINE_SUFFIXES) else "row"
    return f"{unit} {row + 1}"


class DataError(ValueError):
    """A bad input row. `kind` groups errors for the skip report (e.g. 'identical', 'prompt_too_long').

    `row` is 0-based (in a JSONL file: the line index); the message says it 1-based (`location`)."""

    def __init__(self, source: str, row: int | None, field: str | None, message: str, kind: str = "invalid"):
        self.source, self.row, self.field, self.kind, self.message = source, row, field, kind, message
        where = source if row is None else f"{source}, {location(source, row)}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


@dataclass
class Example:
    """One prompt and K ≥ 2 responses, best first (for a pair: [chosen, rejected]); or one response
    (an SFT completion; with `label`, an unpaired completion: True desirable, False undesirable)."""

    prompt: Text
    responses: list[Text]
    source: str = ""
    row: int = 0
    label: bool | None = None

    @property
    def chosen(self) -> Text:
        return self.responses[0]

    @property
    def rejected(self) -> Text:
        return self.responses[-1]

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class SkipReport:
    """What `on_invalid='skip'` left out, by kind, with the first message of each kind."""

    counts: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def add(self, err: DataError) -> None:
        self.counts[err.kind] += 1
        self.first.setdefault(err.kind, str(err))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no rows skipped"
        parts = [f"{n} {kind}" for kind, n in sorted(self.counts.items())]
        lines = [f"skipped {self.total} rows ({', '.join(parts)})"]
        lines += [f"  e.g. {msg}" for msg in self.first.values()]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Reading records


def read_records(spec: str, split: str | None = None) -> Iterator[tuple[int, dict | DataError]]:
    """Yield (row, record) from a JSONL/JSON/Parquet file, or from `datasets.load_dataset(spec)`.

    Rows are numbered from 0 in file order (for JSONL: the line index, blank lines included, so
    row N is line N+1). A row that cannot be read (not a JSON object, not UTF-8) is yielded as a
    DataError, so the caller decides whether it stops the run.

    What `spec` names: an existing file is read by its suffix (an unsupported one is an error); an
    existing directory, or a hub id (`name` or `owner/name` of letters, digits and `._-`, with no
    file suffix), goes to `datasets`, where `spec:split` picks a split. Anything else is a local
    path that does not exist, and an error at once (not a hub round trip)."""
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
    yield from _read_hf_dataset(spec, base, split)


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
        escaped = _lone_surrogate(rec, _ESCAPED_BYTE) if bad else None
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

    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # noqa: BLE001 - re-raised with the name the user gave
        raise DataError(spec, None, None, f"could not load as a file or a Hugging Face dataset: {e}") from e
    for i, rec in enumerate(ds):
        yield i, rec


def _lone_surrogate(value: Any, pattern: re.Pattern | None = None) -> tuple[str | None, str] | None:
    """(where, char) of the first lone surrogate in the strings (and keys) of a nested value, else None.

    Such text cannot be encoded (tokenizers refuse it): it comes from "\\\\ud800"-style escapes, or
    from bytes that were not UTF-8. `where` is the key path below `value` ("[0].content"), or None
    for `value` itself. Walked without recursion: JSON nests deeper than Python's stack."""
    pattern = pattern or _SURROGATE
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


_SURROGATE = re.compile(r"[\ud800-\udfff]")
_ESCAPED_BYTE = re.compile(r"[\udc80-\udcff]")  # what "surrogateescape" decodes a non-UTF-8 byte to


# ----------------------------------------------------------------------------------------------
# Row shapes -> Example


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Split two HH transcripts at the last "\\n\\nAssistant:" inside their shared prefix."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, n)
    if cut < 0:
        return None
    cut += len(HH_ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _messages(value: Any, source: str, row: int, name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(source, row, name, "expected a non-empty list of {role, content} messages", kind="type")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(source, row, f"{name}[{j}]", "expected a message {\"role\": str, \"content\": str}",
                            kind="type")
    return value


def _text(rec: dict, name: str, source: str, row: int) -> str:
    if name not in rec or rec[name] is None:
        raise DataError(source, row, name, "missing", kind="missing")
    value = rec[name]
    if not isinstance(value, str):
        raise DataError(source, row, name, f"expected a string, got {type(value).__name__}", kind="type")
    return value


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def check_unicode(rec: dict, names: Iterable[str], source: str, row: int) -> None:
    """A DataError for the first of the fields `names` holding a lone surrogate (text no tokenizer
    can encode, from an unpaired "\\ud800"-style escape), naming the field down to the message."""
    for name in names:
        found = _lone_surrogate(rec.get(name))
        if found is not None:
            where, char = found
            field = name if where is None else name + (where if where.startswith("[") else "." + where)
            raise DataError(source, row, field, f"not valid Unicode: a lone surrogate U+{ord(char):04X} (an "
                                                "unpaired \\u escape)", kind="encoding")


def parse_row(rec: dict, source: str, row: int) -> Example:
    """Turn one record into an Example, or raise a DataError naming source, row and field."""
    # Columnar sources (Parquet, `datasets`) fill absent fields with None: treat that as absent,
    # so files mixing row shapes read the same from JSONL and from Parquet.
    rec = {k: v for k, v in rec.items() if v is not None}
    check_unicode(rec, ("prompt", "chosen", "rejected", "responses", "completion"), source, row)
    if "responses" in rec:
        ex = _parse_ranked(rec, source, row)
    elif "label" in rec and "chosen" not in rec and "rejected" not in rec:
        return _parse_unpaired(rec, source, row)
    elif "completion" in rec and "chosen" not in rec:  # a plain SFT row
        # An empty completion is kept: it trains the end of turn alone (EOS), as an empty response does.
        return Example(_text(rec, "prompt", source, row), [_text(rec, "completion", source, row)], source, row)
    elif "chosen" in rec or "rejected" in rec:
        ex = _parse_pair(rec, source, row)
    else:
        raise DataError(source, row, "chosen", "missing: a row needs 'chosen' and 'rejected' (or 'responses')",
                        kind="missing")
    # An empty response is a response: the end of turn alone (EOS appended, or the chat template's
    # end-of-turn). HH-RLHF has such rows, where saying nothing was preferred (e.g. to a request for a
    # private address); the anchors train on them too. Two empty responses are identical (below).
    texts = [json.dumps(r) if not isinstance(r, str) else r for r in ex.responses]
    if len(set(texts)) < len(texts):
        name = "rejected" if "responses" not in rec else "responses"
        raise DataError(source, row, name, "identical responses: a pair needs two different responses",
                        kind="identical")
    return ex


def _parse_pair(rec: dict, source: str, row: int) -> Example:
    for name in ("chosen", "rejected"):
        if name not in rec or rec[name] is None:
            raise DataError(source, row, name, "missing", kind="missing")
    chosen, rejected, prompt = rec["chosen"], rec["rejected"], rec.get("prompt")
    if _is_messages(chosen) or _is_messages(rejected):  # conversational
        chosen = _messages(chosen, source, row, "chosen")
        rejected = _messages(rejected, source, row, "rejected")
        if prompt is None:  # implicit prompt: the shared leading messages
            n = 0
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            if n == 0:
                raise DataError(source, row, "prompt", "missing, and chosen/rejected share no leading messages",
                                kind="missing")
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        elif isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        else:
            prompt = _messages(prompt, source, row, "prompt")
        return Example(prompt, [chosen, rejected], source, row)
    chosen = _text(rec, "chosen", source, row)
    rejected = _text(rec, "rejected", source, row)
    if prompt is None and "prompt" not in rec:  # HH-RLHF transcripts
        parts = split_hh(chosen, rejected)
        if parts is None:
            raise DataError(source, row, "prompt",
                            "missing, and chosen/rejected share no prefix ending in '\\n\\nAssistant:' "
                            "(HH-RLHF format) to take it from", kind="missing")
        prompt, chosen, rejected = parts
    else:
        prompt = _text(rec, "prompt", source, row)
    return Example(prompt, [chosen, rejected], source, row)


def _parse_unpaired(rec: dict, source: str, row: int) -> Example:
    """{"prompt", "completion", "label"}: a completion and whether it is desirable (KTO's data)."""
    label = rec["label"]
    if not isinstance(label, bool):  # not 1/0 or "yes": a label that is not a boolean is a mistake to report
        raise DataError(source, row, "label", f"expected true (desirable) or false (undesirable), got {_short(label)}",
                        kind="type")
    completion = rec.get("completion")
    if completion is None:
        raise DataError(source, row, "completion", "missing: an unpaired row needs 'prompt', 'completion' and 'label'",
                        kind="missing")
    if isinstance(completion, list):  # conversational
        completion = _messages(completion, source, row, "completion")
        prompt = rec.get("prompt")
        if prompt is None:
            raise DataError(source, row, "prompt", "missing", kind="missing")
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, source, row,
                                                                                                  "prompt")
        return Example(prompt, [completion], source, row, label)
    return Example(_text(rec, "prompt", source, row), [_text(rec, "completion", source, row)], source, row, label)


def _parse_ranked(rec: dict, source: str, row: int) -> Example:
    responses = rec["responses"]
    if not isinstance(responses, list):
        raise DataError(source, row, "responses", "expected a list of responses", kind="type")
    if len(responses) < 2:
        raise DataError(source, row, "responses", f"needs K ≥ 2 responses, got {len(responses)}", kind="invalid")
    conv = any(_is_messages(r) for r in responses)
    for k, r in enumerate(responses):
        if conv:
            _messages(r, source, row, f"responses[{k}]")
        elif not isinstance(r, str):
            raise DataError(source, row, f"responses[{k}]", f"expected a string, got {type(r).__name__}", kind="type")
    prompt = rec.get("prompt")
    if conv:
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, source, row,
                                                                                                  "prompt")
    else:
        prompt = _text(rec, "prompt", source, row)
    order = _ranking(rec, len(responses), source, row)
    return Example(prompt, [responses[i] for i in order], source, row)


def _ranking(rec: dict, k: int, source: str, row: int) -> list[int]:
    """Response indices best first, from `ranking` or from `scores` (higher is better).

    Ties in `scores` are an error: a Plackett–Luce ranking is a strict order, and breaking ties by
    position would invent preferences the annotator did not state. A row with both must have them
    agree (scores never increasing along the ranking; the ranking orders tied scores).
    """
    order = None
    if "ranking" in rec:
        ranking = rec["ranking"]
        if (not isinstance(ranking, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking)
                or sorted(ranking) != list(range(k))):
            raise DataError(source, row, "ranking", f"must be a permutation of 0..{k - 1} (best first), got "
                                                    f"{_short(ranking)}", kind="invalid")
        order = ranking
    if "scores" in rec:
        scores = rec["scores"]
        if not isinstance(scores, list) or len(scores) != k:
            raise DataError(source, row, "scores", f"expected {k} numbers, one per response", kind="invalid")
        for j, s in enumerate(scores):
            # (an int is finite however large: math.isfinite would overflow converting it to a float)
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not (isinstance(s, int) or math.isfinite(s)):
                raise DataError(source, row, f"scores[{j}]", f"expected a finite number, got {_short(s)}",
                                kind="invalid")
        if order is not None:
            for better, worse in zip(order, order[1:]):
                if scores[better] < scores[worse]:
                    raise DataError(source, row, "ranking",
                                    f"disagrees with 'scores': ranks response {better} above response {worse}, "
                                    f"whose score is higher ({_short(scores[worse])} > {_short(scores[better])})",
                                    kind="invalid")
            return order
        if len(set(scores)) < k:
            raise DataError(source, row, "scores", "tied scores: give a strict ranking (ties are not ordered)",
                            kind="invalid")
        return sorted(range(k), key=lambda i: -scores[i])
    return order if order is not None else list(range(k))  # else: responses already best first


def _short(value: Any, limit: int = 80) -> str:
    """repr of a value from the data, cut to `limit` characters for a one-line message."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # a deeply nested list; an int beyond the digit limit
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_records(spec: str, parse: Callable[[dict, str, int], T], on_invalid: str = "error",
                  split: str | None = None, report: SkipReport | None = None, what: str = "rows") -> list[T]:
    """`parse(record, source, row)` over every row of `spec`, in file order.

    A row that is not a JSON object, or whose `parse` raises a DataError, stops the run (the error
    names file, row and field) unless on_invalid='skip': then it is left out and counted in
    `report`. No usable row at all is a DataError ("no usable {what}")."""
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    report = report if report is not None else SkipReport()
    out = []
    for row, rec in read_records(spec, split):
        try:
            if isinstance(rec, DataError):
                raise rec
            try:
                out.append(parse(rec, spec, row))
            except RecursionError:  # JSON nests deeper than comparing or printing values can follow
                raise DataError(spec, row, None, "nested too deeply", kind="malformed") from None
        except DataError as e:
            if on_invalid == "error":
                raise
            report.add(e)
    if not out:
        raise DataError(spec, None, None, f"no usable {what}" + (f" ({report.summary()})" if report.total else ""))
    return out


def load_examples(spec: str, on_invalid: str = "error", split: str | None = None,
                  report: SkipReport | None = None) -> list[Example]:
    """Read and validate every row of `spec`. Raises the first DataError unless on_invalid='skip'."""
    return parse_records(spec, parse_row, on_invalid, split, report)


def ranking_to_pairs(examples: list[Example], mode: str = "all") -> list[Example]:
    """Expand ranked examples (K > 2) into pairs for pairwise losses.

    mode 'all': every (better, worse) pair, K(K−1)/2 per example; 'best_worst': one pair, the best
    against the worst. Pairs keep their source row, so errors and scores still point at the input.
    """
    if mode not in ("all", "best_worst"):
        raise ValueError(f"ranking-to-pairs mode must be 'all' or 'best_worst', got {mode!r}")
    out = []
    for ex in examples:
        K = len(ex.responses)
        if K == 2:
            out.append(ex)
        elif mode == "best_worst":
            out.append(Example(ex.prompt, [ex.responses[0], ex.responses[-1]], ex.source, ex.row))
        else:
            out += [Example(ex.prompt, [ex.responses[i], ex.responses[j]], ex.source, ex.row)
                    for i in range(K) for j in range(i + 1, K)]
    return out


def pairs_to_unpaired(examples: list[Example]) -> list[Example]:
    """Preference pairs as unpaired rows (for KTO): each pair becomes a desirable row (its chosen
    response) and an undesirable one (its rejected response), both keeping the pair's source row.
    Rows that are unpaired already pass through. A row that is neither (a completion without a
    label, or a ranking of K > 2) is a DataError: which of its responses is desirable is not said."""
    out = []
    for ex in examples:
        if ex.label is not None:
            out.append(ex)
        elif len(ex.responses) == 2:
            out += [Example(ex.prompt, [ex.chosen], ex.source, ex.row, True),
                    Example(ex.prompt, [ex.rejected], ex.source, ex.row, False)]
        elif len(ex.responses) == 1:
            raise DataError(ex.source, ex.row, "label", "missing: a prompt/completion row needs 'label' (true: "
                                                        "desirable, false: undesirable) to be an unpaired row",
                            kind="missing")
        else:
            raise DataError(ex.source, ex.row, "responses",
                            f"a ranking of {len(ex.responses)} responses has no single desirable and undesirable "
                            "response: add --ranking-to-pairs --ranking-pairs best_worst to use its best and worst")
    return out


# ----------------------------------------------------------------------------------------------
# Writing


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """One JSON object per line. Written to a temporary sibling and renamed: the file is whole or
    absent, never half-written. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return path
