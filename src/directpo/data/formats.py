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

Every problem is a `DataError` that names the source, the row and the field. With
``on_invalid="skip"`` such rows are skipped *and counted* (`SkipReport`), never dropped silently.
"""
from __future__ import annotations

import gzip
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

HH_ASSISTANT = "\n\nAssistant:"
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json", ".json.gz", ".parquet")

Text = str | list  # plain text, or a list of {"role", "content"} messages
T = TypeVar("T")


def message_text(value: Text) -> str:
    """A text, or the concatenated contents of a list of {role, content} messages."""
    return value if isinstance(value, str) else "".join(m.get("content", "") for m in value)


class DataError(ValueError):
    """A bad input row. `kind` groups errors for the skip report (e.g. 'identical', 'prompt_too_long')."""

    def __init__(self, source: str, row: int | None, field: str | None, message: str, kind: str = "invalid"):
        self.source, self.row, self.field, self.kind, self.message = source, row, field, kind, message
        where = source if row is None else f"{source}, row {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


@dataclass
class Example:
    """One prompt and K ≥ 2 responses, best first (for a pair: [chosen, rejected])."""

    prompt: Text
    responses: list[Text]
    source: str = ""
    row: int = 0

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
    row N is line N+1). A line that is not a JSON object is yielded as a DataError, so the caller
    decides whether it stops the run.
    """
    name = os.path.basename(spec)
    if os.path.isfile(spec):
        lower = name.lower()
        if lower.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
            yield from _read_jsonl(spec)
            return
        if lower.endswith((".json", ".json.gz")):
            yield from _read_json(spec)
            return
        if lower.endswith(".parquet"):
            import pyarrow.parquet as pq

            for i, rec in enumerate(pq.read_table(spec).to_pylist()):
                yield i, rec
            return
    yield from _read_hf_dataset(spec, split)


def _open(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _read_jsonl(path: str):
    with _open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield i, DataError(path, i, None, f"malformed JSON on line {i + 1}: {e.msg} (column {e.colno})",
                                   kind="malformed")
                continue
            if not isinstance(rec, dict):
                yield i, DataError(path, i, None, f"line {i + 1} is a JSON {type(rec).__name__}, not an object",
                                   kind="malformed")
                continue
            yield i, rec


def _read_json(path: str):
    with _open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(path, None, None, f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}: a single list of rows
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(path, None, None, "expected a JSON list of rows, or an object holding exactly one list")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(path, None, None, f"expected a JSON list of rows, got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            yield i, DataError(path, i, None, f"row is a JSON {type(rec).__name__}, not an object", kind="malformed")
        else:
            yield i, rec


def _read_hf_dataset(spec: str, split: str | None):
    """Hugging Face `datasets`: a hub id, a local dataset dir, or `name:split`."""
    import datasets

    if split is None and ":" in spec and not os.path.exists(spec):
        spec, split = spec.rsplit(":", 1)
    try:
        ds = datasets.load_dataset(spec, split=split or "train")
    except Exception as e:  # noqa: BLE001 - re-raised with the name the user gave
        raise DataError(spec, None, None, f"could not load as a file or a Hugging Face dataset: {e}") from e
    for i, rec in enumerate(ds):
        yield i, rec


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


def parse_row(rec: dict, source: str, row: int) -> Example:
    """Turn one record into an Example, or raise a DataError naming source, row and field."""
    # Columnar sources (Parquet, `datasets`) fill absent fields with None: treat that as absent,
    # so files mixing row shapes read the same from JSONL and from Parquet.
    rec = {k: v for k, v in rec.items() if v is not None}
    if "responses" in rec:
        ex = _parse_ranked(rec, source, row)
    elif "completion" in rec and "chosen" not in rec:  # a plain SFT row
        completion = _text(rec, "completion", source, row)
        if not completion.strip():
            raise DataError(source, row, "completion", "empty response", kind="empty")
        return Example(_text(rec, "prompt", source, row), [completion], source, row)
    elif "chosen" in rec or "rejected" in rec:
        ex = _parse_pair(rec, source, row)
    else:
        raise DataError(source, row, "chosen", "missing: a row needs 'chosen' and 'rejected' (or 'responses')",
                        kind="missing")
    if "responses" in rec:  # name the response by its index in the row, not its rank
        raw = rec["responses"]
        names = [f"responses[{k}]" for k in range(len(raw))]
    else:
        raw, names = ex.responses, ["chosen", "rejected"]
    for name, r in zip(names, raw):
        if not message_text(r).strip():
            raise DataError(source, row, name, "empty response", kind="empty")
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
    position would invent preferences the annotator did not state.
    """
    if "ranking" in rec:
        ranking = rec["ranking"]
        if (not isinstance(ranking, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking)
                or sorted(ranking) != list(range(k))):
            raise DataError(source, row, "ranking", f"must be a permutation of 0..{k - 1} (best first), got {ranking!r}",
                            kind="invalid")
        return ranking
    if "scores" in rec:
        scores = rec["scores"]
        if not isinstance(scores, list) or len(scores) != k:
            raise DataError(source, row, "scores", f"expected {k} numbers, one per response", kind="invalid")
        for j, s in enumerate(scores):
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise DataError(source, row, f"scores[{j}]", f"expected a finite number, got {s!r}", kind="invalid")
        if len(set(scores)) < k:
            raise DataError(source, row, "scores", "tied scores: give a strict ranking (ties are not ordered)",
                            kind="invalid")
        return sorted(range(k), key=lambda i: -scores[i])
    return list(range(k))  # responses already best first


def parse_records(spec: str, parse: Callable[[dict, str, int], T], on_invalid: str = "error",
                  split: str | None = None, report: SkipReport | None = None, what: str = "rows") -> list[T]:
    """`parse(record, source, row)` over every row of `spec`, in file order.

    A row that is not a JSON object, or whose `parse` raises a DataError, stops the run (the error
    names file, row and field) unless on_invalid='skip': then it is left out and counted in
    `report`. No usable row at all is a DataError ("no usable {what}")."""
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    if spec.lower().endswith(FILE_SUFFIXES) and not os.path.exists(spec):
        raise DataError(spec, None, None, "no such file")
    report = report if report is not None else SkipReport()
    out = []
    for row, rec in read_records(spec, split):
        try:
            if isinstance(rec, DataError):
                raise rec
            out.append(parse(rec, spec, row))
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
