"""Preference data: records of every accepted shape in, one canonical `Example` type out.

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
* images (vision-language)   any conversational pair or ranking above plus "images": [image, ...]
                             (or one "image"), TRL's vision format: a message's "content" may be a
                             list of parts {"type": "text", "text": str} | {"type": "image"}, one
                             image placeholder per image, in user turns of the prompt, in order.
                             An image is a file path (relative to the data file's folder, or
                             absolute), a PIL image, {"bytes": ..., "path": ...} or {"path": ...};
                             URLs are refused (offline). Checked up front (`images`): missing,
                             unreadable or empty images and a count that differs from the
                             placeholders are errors of their row ("images[1]"). `Example.images`
                             holds `ImageRef`s, decoded on demand. Rows without images have their
                             list contents joined to text.

The records come from `readers` (files, `datasets` sources, in-memory `Rows`); its names are
re-exported here. Every problem is a `DataError` (`errors`) that names the source, the row and the
field: "line N" (1-based, as editors count) in line-based files (JSONL), "row N" (1-based) in JSON
arrays, Parquet, `datasets` and in-memory sources. With ``on_invalid="skip"`` such rows are skipped
*and counted* (`SkipReport`), never dropped silently. Text must be valid Unicode: a byte that is not
UTF-8 is an error of its line (JSONL) or row (JSON), and so is a lone surrogate (``"\\ud800"``
escapes).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

from ..errors import UserValueError
from .errors import LINE_SUFFIXES, DataError, location
from .images import ImageRef, base_dir, check_parts, content_text, flatten, image_ref, image_values, placeholders
from .readers import (FILE_SUFFIXES, HUB_ID, PATH_SUFFIXES, Rows, is_hub_id, lone_surrogate, read_records,
                      write_jsonl)

__all__ = [  # the readers' names too: `from directpo.data.formats import read_records` keeps working
    "HH_ASSISTANT", "LINE_SUFFIXES", "FILE_SUFFIXES", "PATH_SUFFIXES", "HUB_ID", "Text", "DataError", "location",
    "Rows", "is_hub_id", "read_records", "write_jsonl", "message_text", "Example", "SkipReport", "split_hh",
    "check_unicode", "parse_row", "parse_records", "load_examples", "ranking_to_pairs", "pairs_to_unpaired",
    "ImageRef"]

HH_ASSISTANT = "\n\nAssistant:"

Text = str | list  # plain text, or a list of {"role", "content"} messages
T = TypeVar("T")


def message_text(value: Text) -> str:
    """A text, or the concatenated contents of a list of {role, content} messages (the text parts
    of list-valued contents: image placeholders are skipped)."""
    return value if isinstance(value, str) else "".join(content_text(m.get("content", "")) for m in value)


@dataclass
class Example:
    """One prompt and K ≥ 2 responses, best first (for a pair: [chosen, rejected]); or one response
    (an SFT completion; with `label`, an unpaired completion: True desirable, False undesirable)."""

    prompt: Text
    responses: list[Text]
    source: str = ""
    row: int = 0
    label: bool | None = None
    images: list[ImageRef] = field(default_factory=list)  # in placeholder order; references, decoded on demand

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
        lines = [f"skipped {self.total} row{'s' * (self.total != 1)} ({', '.join(parts)})"]
        lines += [f"  e.g. {msg}" for msg in self.first.values()]
        return "\n".join(lines)


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
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"),
                                                                                            (str, list)):
            raise DataError(source, row, f"{name}[{j}]", "expected a message {\"role\": str, \"content\": str or "
                                                         "a list of parts}", kind="type")
        if isinstance(m["content"], list):
            check_parts(m["content"], source, row, f"{name}[{j}].content")
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
        found = lone_surrogate(rec.get(name))
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
    ex = _parse_shape(rec, source, row)
    return _with_images(ex, rec, source, row)


def _parse_shape(rec: dict, source: str, row: int) -> Example:
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


def _with_images(ex: Example, rec: dict, source: str, row: int) -> Example:
    """`ex` with the row's images checked and attached, each matched to a placeholder of the prompt;
    without images, list-valued contents become their text (what text-only chat templates take)."""
    name, values = image_values(rec, source, row)
    for k, r in enumerate(ex.responses):  # a placeholder in a response: the model would write an image
        placeholders(r, source, row, "responses" if "responses" in rec else
                     ("completion" if len(ex.responses) == 1 else ("chosen", "rejected")[k]))
    wanted = placeholders(ex.prompt, source, row, "prompt")
    responses = [flatten(r) for r in ex.responses]
    if not values and not wanted:
        return Example(flatten(ex.prompt), responses, source, row, ex.label)
    if len(values) != wanted:
        where = "its prompt has no {\"type\": \"image\"} placeholder (in a user turn's list content)" if not wanted \
            else f"its prompt has {wanted} {{\"type\": \"image\"}} placeholder{'s' * (wanted != 1)}"
        raise DataError(source, row, name, f"{len(values)} image{'s' * (len(values) != 1)}, but {where}: give one "
                                           "image per placeholder", kind="image_count")
    base = base_dir(source)
    refs = [image_ref(v, base, source, row, name if name == "image" else f"images[{i}]") for i, v in enumerate(values)]
    return Example(ex.prompt, responses, source, row, ex.label, refs)


def _parse_pair(rec: dict, source: str, row: int) -> Example:
    for name in ("chosen", "rejected"):
        if name not in rec or rec[name] is None:
            raise DataError(source, row, name, "missing", kind="missing")
    chosen, rejected, prompt = rec["chosen"], rec["rejected"], rec.get("prompt")
    if _is_messages(prompt) and isinstance(chosen, str) and isinstance(rejected, str):
        # a conversational prompt with text answers (TRL's vision rows often): the answers are assistant turns
        chosen, rejected = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
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
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if isinstance(value, list) and not value:  # messages, but none: not "expected a string"
            raise DataError(source, row, name, "expected a non-empty list of {role, content} messages (or a "
                                               "string), got an empty list", kind="type")
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
    if _is_messages(rec.get("prompt")) and all(isinstance(r, str) for r in responses):
        responses = [[{"role": "assistant", "content": r}] for r in responses]  # text answers to a conversation
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
        raise UserValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
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
        raise DataError(spec, None, None, f"no usable {what}" + (f": {report.summary()}" if report.total else ""))
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
        raise UserValueError(f"ranking-to-pairs mode must be 'all' or 'best_worst', got {mode!r}")
    out = []
    for ex in examples:
        K = len(ex.responses)
        if K == 2:
            out.append(ex)
        elif mode == "best_worst":
            out.append(Example(ex.prompt, [ex.responses[0], ex.responses[-1]], ex.source, ex.row, images=ex.images))
        else:
            out += [Example(ex.prompt, [ex.responses[i], ex.responses[j]], ex.source, ex.row, images=ex.images)
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
            out += [Example(ex.prompt, [ex.chosen], ex.source, ex.row, True, ex.images),
                    Example(ex.prompt, [ex.rejected], ex.source, ex.row, False, ex.images)]
        elif len(ex.responses) == 1:
            raise DataError(ex.source, ex.row, "label", "missing: a prompt/completion row needs 'label' (true: "
                                                        "desirable, false: undesirable) to be an unpaired row",
                            kind="missing")
        else:
            raise DataError(ex.source, ex.row, "responses",
                            f"a ranking of {len(ex.responses)} responses has no single desirable and undesirable "
                            "response: add --ranking-to-pairs --ranking-pairs best_worst to use its best and worst")
    return out
