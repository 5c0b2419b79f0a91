"""Fuzzing the data layer: whatever a file holds, loading and tokenizing it either works or raises a
`DataError` that names the file (and the line or row where one applies), never anything else.

Random bytes under every file name the reader knows, and random JSON values in every field of
pair, HH, conversational, ranked and SFT rows. With on_invalid='skip' a bad row never stops the
load: every row is either loaded or counted, and the only error left is "no usable rows" (or a file
that cannot be read at all). The examples that load are tokenized with the tiny tokenizer under
random length limits, with the same promise.
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from directpo.data.formats import DataError, SkipReport, load_examples
from directpo.data.tokenize import TokenizeStats, tokenize_examples

# DIRECTPO_FUZZ_EXAMPLES=5000 for a longer hunt
FUZZ = settings(max_examples=int(os.environ.get("DIRECTPO_FUZZ_EXAMPLES", 120)), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
LINE_BASED = (".jsonl", ".jsonl.gz")
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")

# ----------------------------------------------------------------------------------------------
# Strategies

SPECIAL_TEXT = ["", " ", "\n", "\n\nHuman: hi\n\nAssistant:", "\n\nAssistant:", "<|eos|>", "<|bos|>", "\x00",
                "\ud800", "a\udc80b", "\udfff\ud800", "é", "😀", "\u2028", "\ufeff", "{{ messages }}", "{% if %}"]
texts = st.one_of(
    st.text(max_size=30),
    st.text(st.characters(exclude_categories=()), max_size=12),  # surrogates included
    st.sampled_from(SPECIAL_TEXT),
    st.builds(lambda a, b: a + b, st.sampled_from(SPECIAL_TEXT), st.text(max_size=10)),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=10 ** 300),
                    st.floats(allow_nan=True, allow_infinity=True), texts)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(["role", "content", "prompt"]), st.text(max_size=4)), inner,
                    max_size=4)), max_leaves=8)
roles = st.one_of(st.sampled_from(["user", "assistant", "system", ""]), json_values)
message = st.fixed_dictionaries({}, optional={"role": roles, "content": st.one_of(texts, json_values),
                                              "name": json_values})
messages = st.lists(message, max_size=4)
field_value = st.one_of(texts, messages, json_values)


@st.composite
def hh_pair(draw):
    shared = draw(st.sampled_from(["", "\n\nHuman: hi\n\nAssistant:", "\n\nHuman: a\n\nAssistant: b\n\nHuman: c"
                                                                      "\n\nAssistant:"]))
    return {"chosen": shared + draw(texts), "rejected": shared + draw(texts)}


@st.composite
def conversation_pair(draw):
    shared = draw(messages)
    return {"chosen": shared + draw(messages), "rejected": shared + draw(messages)}


@st.composite
def ranked_row(draw):
    responses = draw(st.lists(st.one_of(texts, messages), max_size=5))
    k = len(responses)
    ranking = st.one_of(st.permutations(list(range(k))), st.lists(st.integers(-1, k), max_size=k + 1), json_values)
    number = st.one_of(st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
                       st.integers(min_value=10 ** 300))
    scores = st.one_of(st.lists(number, min_size=k, max_size=k),
                       st.lists(st.one_of(number, json_values), max_size=k + 1), json_values)
    row = draw(st.fixed_dictionaries({"responses": st.just(responses)},
                                     optional={"prompt": field_value, "ranking": ranking, "scores": scores}))
    return row


words = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20)  # valid text, mostly
turn = st.builds(lambda role, content: {"role": role, "content": content}, st.sampled_from(["user", "assistant",
                                                                                            "system"]), words)
good_rows = st.one_of(  # rows that mostly load, so that tokenization is fuzzed too
    st.fixed_dictionaries({"prompt": st.one_of(words, st.just("")), "chosen": words, "rejected": words}),
    st.builds(lambda p, c, r: {"prompt": p, "chosen": c, "rejected": r}, st.lists(turn, min_size=1, max_size=3),
              st.lists(turn, min_size=1, max_size=2), st.lists(turn, min_size=1, max_size=2)),
    st.builds(lambda p, rs, perm: {"prompt": p, "responses": rs, "ranking": perm(len(rs))}, words,
              st.lists(words, min_size=2, max_size=4, unique=True),
              st.sampled_from([lambda k: list(range(k)), lambda k: list(range(k))[::-1]])),
    st.builds(lambda h, a, b: {"chosen": h + a, "rejected": h + b},
              st.sampled_from(["\n\nHuman: hi\n\nAssistant:",
                               "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"]),
              words, words),
)
any_row = st.one_of(
    good_rows,
    good_rows,
    st.fixed_dictionaries({}, optional={"prompt": field_value, "chosen": field_value, "rejected": field_value}),
    st.fixed_dictionaries({"prompt": texts, "chosen": texts, "rejected": texts}),
    hh_pair(),
    conversation_pair(),
    st.builds(lambda p, pair: {"prompt": p, **pair}, st.one_of(texts, messages), conversation_pair()),
    ranked_row(),
    st.fixed_dictionaries({"completion": field_value}, optional={"prompt": field_value}),
    st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    json_values,  # a row that is not an object
)


def _write(path: Path, data: bytes, gz: bool) -> None:
    path.write_bytes(gzip.compress(data) if gz else data)


def _encode(rows: list, suffix: str, ascii_only: bool) -> bytes:
    """The rows as JSON text; with ascii_only=False lone surrogates go out as raw (invalid) bytes."""
    if suffix.startswith(".jsonl"):
        text = "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in rows)
    else:
        text = json.dumps(rows, ensure_ascii=ascii_only)
    return text.encode("utf-8", "surrogatepass")


def _check_error(err: DataError, path: Path) -> None:
    """The error names the file, and the line (JSONL) or row (JSON array) it is about, counted from 1."""
    assert err.source == str(path) and str(err).startswith(str(path))
    if err.row is not None:
        unit = "line" if str(path).endswith(LINE_BASED) else "row"
        assert str(err).startswith(f"{path}, {unit} {err.row + 1}")


def _load(path: Path, on_invalid: str, report: SkipReport | None = None):
    """Examples, or the DataError (anything else propagates and fails the test)."""
    try:
        examples = load_examples(str(path), on_invalid=on_invalid, report=report)
    except DataError as e:
        _check_error(e, path)
        event(f"load {on_invalid}: DataError ({e.kind})")
        return e
    event(f"load {on_invalid}: examples")
    return examples


def _tokenize(examples, tokenizer, path, max_length, max_prompt_length, on_invalid) -> None:
    report, stats = SkipReport(), TokenizeStats()
    try:
        out = tokenize_examples(examples, tokenizer, max_length, max_prompt_length, on_invalid, report, stats)
    except DataError as e:
        _check_error(e, path)
        assert on_invalid == "error" or e.row is None
        event(f"tokenize: DataError ({e.kind})")
        return
    event(f"tokenize: {len(out)} examples")
    assert len(out) + report.total == len(examples)
    for te in out:
        assert te.prompt_ids and all(te.response_ids)
        if max_length is not None:
            assert all(len(te.prompt_ids) + len(r) <= max_length for r in te.response_ids)


# ----------------------------------------------------------------------------------------------
# Random bytes


garbage = st.one_of(
    st.binary(max_size=200),
    st.lists(st.one_of(st.binary(max_size=30), st.sampled_from([
        b'{"prompt": "p", "chosen": " a", "rejected": " b"}', b"\x80\xff", b"\xef\xbb\xbf", b"[", b"{", b"]",
        b'"\xc3"', b"NaN", b"\r", b"1" * 5000])), max_size=8).map(b"\n".join),
)


@FUZZ
@given(data=garbage, suffix=st.sampled_from(SUFFIXES), compress=st.booleans(),
       on_invalid=st.sampled_from(["error", "skip"]))
@example(data=b"\x80", suffix=".jsonl", compress=False, on_invalid="skip")
@example(data=b"\x1f\x8b\x08\x00", suffix=".jsonl.gz", compress=False, on_invalid="skip")  # a cut gzip header
@example(data=b"[" * 50_000, suffix=".json", compress=False, on_invalid="error")  # RecursionError in json
@example(data=b'{"prompt": 1' + b"0" * 5000 + b"}", suffix=".jsonl", compress=False,  # past the digit limit
         on_invalid="error")
def test_random_bytes(data, suffix, compress, on_invalid):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"f{suffix}"
        _write(path, data, gz=compress and suffix.endswith(".gz"))
        result = _load(path, on_invalid)
        if on_invalid == "skip" and isinstance(result, DataError):
            assert result.row is None  # a file-level error: a bad row is skipped, never raised


# ----------------------------------------------------------------------------------------------
# Random rows


@FUZZ
@given(rows=st.lists(any_row, max_size=6), suffix=st.sampled_from(SUFFIXES), ascii_only=st.booleans(),
       max_length=st.one_of(st.none(), st.integers(2, 40)), mpl=st.one_of(st.none(), st.integers(1, 40)),
       tok_invalid=st.sampled_from(["error", "skip"]))
@example(rows=[{"prompt": "P", "responses": ["a", "b"], "scores": [1, 10 ** 400]}], suffix=".jsonl",
         ascii_only=True, max_length=None, mpl=None, tok_invalid="error")  # math.isfinite overflowed on huge ints
@example(rows=[{"prompt": "P\ud800", "chosen": "a", "rejected": "b"}], suffix=".jsonl", ascii_only=True,
         max_length=None, mpl=None, tok_invalid="error")  # a lone surrogate reached the tokenizer
@example(rows=[{"prompt": "P", "chosen": "a\udc80", "rejected": "b"}], suffix=".json", ascii_only=False,
         max_length=8, mpl=None, tok_invalid="error")  # raw bytes of a surrogate: not UTF-8
@example(rows=[{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}]}], suffix=".jsonl", ascii_only=True,
         max_length=2, mpl=None, tok_invalid="error")
def test_random_rows(tiny_tokenizer, rows, suffix, ascii_only, max_length, mpl, tok_invalid):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"f{suffix}"
        _write(path, _encode(rows, suffix, ascii_only), gz=suffix.endswith(".gz"))
        strict = _load(path, "error")
        report = SkipReport()
        skipped = _load(path, "skip", report)
        if isinstance(skipped, DataError):  # a file-level error, or nothing usable: every row was counted
            assert skipped.row is None and isinstance(strict, DataError)
            if "no usable rows" in str(skipped):
                assert report.total == len(rows)
            return
        assert len(skipped) + report.total == len(rows)  # every row loaded or counted
        loaded = [ex.row for ex in skipped]
        assert loaded == sorted(set(loaded))
        if isinstance(strict, list):
            assert report.total == 0 and [ex.row for ex in strict] == loaded
        else:  # the row that stopped the strict load is one that skip left out
            assert strict.row is not None and strict.row not in loaded
        _tokenize(skipped, tiny_tokenizer, path, max_length, mpl, tok_invalid)
