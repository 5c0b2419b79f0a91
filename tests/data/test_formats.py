"""Reading preference files and turning rows of every accepted shape into `Example`s."""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

try:  # tests/ may or may not be a package
    from tests.conftest import hh_rows
except ImportError:  # pragma: no cover
    from conftest import hh_rows
from directpo.data.formats import (
    HH_ASSISTANT,
    DataError,
    Example,
    SkipReport,
    load_examples,
    parse_row,
    read_records,
    split_hh,
)

ROWS = [
    {"prompt": "What is 2+2?", "chosen": " 4.", "rejected": " 5."},
    {"prompt": "Name a colour.", "chosen": " Blue.", "rejected": " Loud."},
    {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."},
]


def _write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _content(examples: list[Example]) -> list[tuple]:
    """What an Example holds, apart from where it came from."""
    return [(ex.prompt, ex.responses, ex.row) for ex in examples]


def _expected(rows: list[dict]) -> list[tuple]:
    return [(r["prompt"], [r["chosen"], r["rejected"]], i) for i, r in enumerate(rows)]


def _assert_names(err: DataError, source, row, field) -> None:
    """The error names file, row and field, both as attributes (row 0-based) and in its message (1-based:
    "line N" in a JSONL file, "row N" elsewhere)."""
    msg = str(err)
    assert err.source == str(source)
    assert str(source) in msg
    assert err.row == row
    if row is not None:
        unit = "line" if str(source).endswith((".jsonl", ".jsonl.gz", ".ndjson")) else "row"
        assert f"{unit} {row + 1}," in msg or f"{unit} {row + 1}:" in msg
    assert err.field == field
    if field is not None:
        assert f"'{field}'" in msg


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep `datasets`' cache for the local test datasets inside tmp_path."""
    import datasets

    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


# ----------------------------------------------------------------------------------------------
# File formats: every reader gives the same Examples


def test_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    exs = load_examples(str(path))
    assert _content(exs) == _expected(ROWS)
    assert all(ex.source == str(path) for ex in exs)
    assert [ex.chosen for ex in exs] == [r["chosen"] for r in ROWS]
    assert [ex.rejected for ex in exs] == [r["rejected"] for r in ROWS]
    assert not any(ex.conversational for ex in exs)


@pytest.mark.parametrize("name", ["d.jsonl.gz", "d.ndjson"])
def test_jsonl_variants(tmp_path, name):
    path = _write_jsonl(tmp_path / name, ROWS, gz=name.endswith(".gz"))
    assert _content(load_examples(str(path))) == _expected(ROWS)


def test_jsonl_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    exs = load_examples(str(path))
    assert [ex.row for ex in exs] == [1, 4]  # row N is line N + 1
    assert [ex.prompt for ex in exs] == [ROWS[0]["prompt"], ROWS[1]["prompt"]]


def test_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    assert _content(load_examples(str(path))) == _expected(ROWS)


def test_json_object_holding_one_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": ROWS, "version": 3, "meta": {"n": 3}}), encoding="utf-8")
    assert _content(load_examples(str(path))) == _expected(ROWS)


def test_json_gz(tmp_path):
    path = tmp_path / "d.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(ROWS, f)
    assert _content(load_examples(str(path))) == _expected(ROWS)


def test_json_object_with_two_lists_is_an_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"train": ROWS, "test": ROWS}), encoding="utf-8")
    with pytest.raises(DataError) as ei:
        load_examples(str(path))
    _assert_names(ei.value, path, None, None)


def test_parquet(tmp_path):
    path = _write_parquet(tmp_path / "d.parquet", ROWS)
    assert _content(load_examples(str(path))) == _expected(ROWS)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_local_hf_dataset_dir(tmp_path, hf_cache, fmt):
    d = tmp_path / "ds"
    d.mkdir()
    if fmt == "jsonl":
        _write_jsonl(d / "train.jsonl", ROWS)
    else:
        _write_parquet(d / "train.parquet", ROWS)
    exs = load_examples(str(d))
    assert _content(exs) == _expected(ROWS)
    assert all(ex.source == str(d) for ex in exs)


SHAPES = {
    "explicit": ROWS,
    "hh": [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go."},
        {"chosen": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: D",
         "rejected": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: E"},
    ],
    "ranked_ranking": [
        {"prompt": "Rank these.", "responses": ["b", "a", "c"], "ranking": [1, 0, 2]},
        {"prompt": "And these.", "responses": ["x", "y", "z"], "ranking": [2, 1, 0]},
    ],
    "ranked_scores": [
        {"prompt": "Rank these.", "responses": ["b", "a", "c"], "scores": [0.5, 1.5, -2.0]},
        {"prompt": "And these.", "responses": ["x", "y", "z"], "scores": [0.0, 1.0, 2.0]},
    ],
    "conversational": [
        {"prompt": [{"role": "user", "content": "Hi"}],
         "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
        {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
         "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "B"}]},
    ],
}


def _write_all_formats(tmp_path: Path, rows: list[dict]) -> dict[str, str]:
    specs = {"jsonl": str(_write_jsonl(tmp_path / "d.jsonl", rows))}
    p = tmp_path / "list.json"
    p.write_text(json.dumps(rows), encoding="utf-8")
    specs["json_list"] = str(p)
    p = tmp_path / "obj.json"
    p.write_text(json.dumps({"data": rows}), encoding="utf-8")
    specs["json_object"] = str(p)
    specs["parquet"] = str(_write_parquet(tmp_path / "d.parquet", rows))
    d = tmp_path / "hf_dir"
    d.mkdir()
    _write_parquet(d / "train.parquet", rows)
    specs["hf_dataset"] = str(d)
    return specs


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_all_formats_agree(tmp_path, hf_cache, shape):
    """The same rows in every format load to equal Examples (source aside)."""
    rows = SHAPES[shape]
    expected = [parse_row(r, "x", i) for i, r in enumerate(rows)]
    for name, spec in _write_all_formats(tmp_path, rows).items():
        exs = load_examples(spec)
        assert _content(exs) == _content(expected), name
        assert all(ex.source == spec for ex in exs), name


def test_shapes_parse_as_documented():
    """The reference Examples used above are themselves right (checked by hand, not by the parser)."""
    hh = [parse_row(r, "x", i) for i, r in enumerate(SHAPES["hh"])]
    assert [(e.prompt, e.responses) for e in hh] == [
        ("\n\nHuman: Hi\n\nAssistant:", [" Hello.", " Go."]),
        ("\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:", [" D", " E"]),
    ]
    for shape in ("ranked_ranking", "ranked_scores"):
        ranked = [parse_row(r, "x", i).responses for i, r in enumerate(SHAPES[shape])]
        assert ranked == [["a", "b", "c"], ["z", "y", "x"]], shape
    conv = [parse_row(r, "x", i) for i, r in enumerate(SHAPES["conversational"])]
    assert conv[0].prompt == [{"role": "user", "content": "Hi"}]
    assert conv[1].prompt == [{"role": "user", "content": "Q"}]
    assert conv[1].responses == [[{"role": "assistant", "content": "A"}], [{"role": "assistant", "content": "B"}]]


def test_hf_spec_with_split_suffix(tmp_path, hf_cache):
    d = tmp_path / "ds"
    d.mkdir()
    _write_jsonl(d / "test.jsonl", ROWS[:2])
    _write_jsonl(d / "train.jsonl", ROWS)
    assert len(load_examples(str(d))) == 3
    assert _content(load_examples(str(d), split="test")) == _expected(ROWS[:2])
    assert _content(load_examples(f"{d}:test")) == _expected(ROWS[:2])


# ----------------------------------------------------------------------------------------------
# Row shapes


def test_explicit_pair_row():
    ex = parse_row({"prompt": "P", "chosen": "good", "rejected": "bad", "extra": 1}, "src", 7)
    assert ex == Example("P", ["good", "bad"], "src", 7)
    assert ex.chosen == "good" and ex.rejected == "bad"
    assert not ex.conversational


def test_hh_transcript_hand_built():
    prompt = "\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:"
    chosen, rejected = " Why did the chicken cross the road?", " No."
    ex = parse_row({"chosen": prompt + chosen, "rejected": prompt + rejected}, "hh", 0)
    assert ex.prompt == prompt
    assert ex.responses == [chosen, rejected]


def test_hh_shared_response_start_is_not_in_prompt():
    """Responses that start alike: the prompt still ends at the last marker, not at the divergence."""
    prompt = "\n\nHuman: Is it safe?\n\nAssistant:"
    chosen, rejected = " I think it is safe.", " I think it is not."
    ex = parse_row({"chosen": prompt + chosen, "rejected": prompt + rejected}, "hh", 0)
    assert ex.prompt == prompt
    assert ex.responses == [chosen, rejected]


def test_hh_later_marker_in_only_one_response():
    prompt = "\n\nHuman: Hi\n\nAssistant:"
    chosen = " Hello.\n\nHuman: thanks\n\nAssistant: You are welcome."
    rejected = " Go away."
    ex = parse_row({"chosen": prompt + chosen, "rejected": prompt + rejected}, "hh", 0)
    assert ex.prompt == prompt
    assert ex.responses == [chosen, rejected]


def test_split_hh_no_marker():
    assert split_hh("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: x") is None
    assert split_hh("abc", "abd") is None


def test_hh_real_rows():
    rows = hh_rows(50)
    assert len(rows) == 50
    exs = [parse_row(r, "hh", i) for i, r in enumerate(rows)]
    for r, ex in zip(rows, exs):
        assert isinstance(ex.prompt, str)
        assert ex.prompt.endswith(HH_ASSISTANT)
        assert ex.prompt + ex.chosen == r["chosen"]
        assert ex.prompt + ex.rejected == r["rejected"]
        assert ex.chosen != ex.rejected
        # the prompt is the longest such cut: no marker lies in the remaining shared prefix
        n = 0
        while n < min(len(ex.chosen), len(ex.rejected)) and ex.chosen[n] == ex.rejected[n]:
            n += 1
        assert HH_ASSISTANT not in ex.chosen[:n]


def test_hh_real_rows_from_gz_file(tmp_path):
    rows = hh_rows(20)
    path = _write_jsonl(tmp_path / "hh.jsonl.gz", rows, gz=True)
    exs = load_examples(str(path))
    assert len(exs) == 20
    assert all(ex.prompt + ex.chosen == r["chosen"] for ex, r in zip(exs, rows))


def test_conversational_with_prompt():
    prompt = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}]
    chosen = [{"role": "assistant", "content": "Hello!"}]
    rejected = [{"role": "assistant", "content": "What."}]
    ex = parse_row({"prompt": prompt, "chosen": chosen, "rejected": rejected}, "c", 2)
    assert ex.conversational
    assert ex.prompt == prompt
    assert ex.responses == [chosen, rejected]


def test_conversational_string_prompt_becomes_user_message():
    chosen = [{"role": "assistant", "content": "Hello!"}]
    rejected = [{"role": "assistant", "content": "What."}]
    ex = parse_row({"prompt": "Hi", "chosen": chosen, "rejected": rejected}, "c", 0)
    assert ex.prompt == [{"role": "user", "content": "Hi"}]
    assert ex.responses == [chosen, rejected]


def test_conversational_implicit_prompt():
    shared = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "Joke?"}]
    c = [{"role": "assistant", "content": "Knock knock."}]
    r = [{"role": "assistant", "content": "No."}]
    ex = parse_row({"chosen": shared + c, "rejected": shared + r}, "c", 0)
    assert ex.conversational
    assert ex.prompt == shared
    assert ex.responses == [c, r]


def test_conversational_implicit_prompt_leaves_a_message_each():
    """When one conversation extends the other, the shorter one still keeps its last message."""
    shared = [{"role": "user", "content": "Hi"}]
    a = {"role": "assistant", "content": "Hello."}
    more = [{"role": "user", "content": "And?"}, {"role": "assistant", "content": "Bye."}]
    ex = parse_row({"chosen": shared + [a] + more, "rejected": shared + [a]}, "c", 0)
    assert ex.prompt == shared
    assert ex.responses == [[a] + more, [a]]


def test_conversational_no_shared_messages_is_an_error():
    with pytest.raises(DataError) as ei:
        parse_row({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
                   "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]},
                  "f.jsonl", 4)
    _assert_names(ei.value, "f.jsonl", 4, "prompt")


def test_conversational_bad_message_is_an_error():
    with pytest.raises(DataError) as ei:
        parse_row({"prompt": "Hi", "chosen": [{"role": "assistant", "content": "ok"}],
                   "rejected": [{"role": "assistant", "content": 3}]}, "f.jsonl", 1)
    _assert_names(ei.value, "f.jsonl", 1, "rejected[0]")



@pytest.mark.parametrize("chosen,rejected,field", [([], [], "chosen"), ("a", [], "rejected"), ([], "b", "chosen")])
def test_an_empty_message_list_says_so(chosen, rejected, field):
    """An empty list where messages go said "expected a string, got list" when both sides were empty."""
    with pytest.raises(DataError, match=r"expected a non-empty list of \{role, content\} messages") as ei:
        parse_row({"prompt": "Hi", "chosen": chosen, "rejected": rejected}, "f.jsonl", 1)
    _assert_names(ei.value, "f.jsonl", 1, field)

def test_ranked_with_ranking():
    ex = parse_row({"prompt": "P", "responses": ["mid", "best", "worst"], "ranking": [1, 0, 2]}, "r", 0)
    assert ex.prompt == "P"
    assert ex.responses == ["best", "mid", "worst"]
    assert ex.chosen == "best" and ex.rejected == "worst"


def test_ranked_with_scores():
    ex = parse_row({"prompt": "P", "responses": ["a", "b", "c", "d"], "scores": [0.5, -1, 3, 2.0]}, "r", 0)
    assert ex.responses == ["c", "d", "a", "b"]


def test_ranked_without_order_is_best_first():
    ex = parse_row({"prompt": "P", "responses": ["x", "y"]}, "r", 0)
    assert ex.responses == ["x", "y"]


def test_ranked_conversational():
    rs = [[{"role": "assistant", "content": t}] for t in ("ok", "best", "bad")]
    ex = parse_row({"prompt": "Q", "responses": rs, "scores": [1, 2, 0]}, "r", 0)
    assert ex.conversational
    assert ex.prompt == [{"role": "user", "content": "Q"}]
    assert ex.responses == [rs[1], rs[0], rs[2]]


def test_ranked_rows_from_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "P0", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},
        {"prompt": "P1", "responses": ["a", "b", "c"], "scores": [1, 3, 2]},
    ])
    exs = load_examples(str(path))
    assert [ex.responses for ex in exs] == [["c", "a", "b"], ["b", "c", "a"]]


# ----------------------------------------------------------------------------------------------
# Bad input: DataError naming file, row and field


def _load_error(tmp_path, lines: list[str], name="bad.jsonl") -> tuple[DataError, Path]:
    path = _write_lines(tmp_path / name, lines)
    with pytest.raises(DataError) as ei:
        load_examples(str(path))
    return ei.value, path


GOOD = json.dumps(ROWS[0])


def test_malformed_json_line(tmp_path):
    err, path = _load_error(tmp_path, [GOOD, "", GOOD, '{"prompt": "x", "chosen": "a",'])
    assert err.source == str(path) and str(path) in str(err)
    assert err.row == 3  # 0-based line index, blank line counted
    assert f"{path}, line 4: malformed JSON" in str(err)  # the message says the 1-based line, as editors do
    assert "row" not in str(err)
    assert err.kind == "malformed"


def test_json_array_line(tmp_path):
    err, path = _load_error(tmp_path, [GOOD, '["P", "a", "b"]'])
    assert err.source == str(path) and str(path) in str(err)
    assert err.row == 1 and f"{path}, line 2:" in str(err)
    assert "list" in str(err)
    assert err.kind == "malformed"


def test_json_file_non_object_row(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ROWS[0], "oops"]), encoding="utf-8")
    with pytest.raises(DataError) as ei:
        load_examples(str(path))
    assert ei.value.row == 1 and f"{path}, row 2:" in str(ei.value) and ei.value.kind == "malformed"


BAD_ROWS = {
    # name: (row, field, kind)
    "missing_chosen": ({"prompt": "P", "rejected": "b"}, "chosen", "missing"),
    "missing_rejected": ({"prompt": "P", "chosen": "a"}, "rejected", "missing"),
    "no_responses_at_all": ({"prompt": "P", "answer": "a"}, "chosen", "missing"),
    "number_rejected": ({"prompt": "P", "chosen": "a", "rejected": 5}, "rejected", "type"),
    "number_prompt": ({"prompt": 5, "chosen": "a", "rejected": "b"}, "prompt", "type"),
    "both_empty": ({"prompt": "P", "chosen": "", "rejected": ""}, "rejected", "identical"),
    "identical": ({"prompt": "P", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
    "hh_no_shared_marker": ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
                            "prompt", "missing"),
    "hh_identical": ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: a\n\nAssistant: x"},
                     "rejected", "identical"),
    "ranking_not_permutation": ({"prompt": "P", "responses": ["a", "b", "c"], "ranking": [0, 0, 2]},
                                "ranking", "invalid"),
    "ranking_out_of_range": ({"prompt": "P", "responses": ["a", "b"], "ranking": [1, 2]}, "ranking", "invalid"),
    "ranking_too_short": ({"prompt": "P", "responses": ["a", "b", "c"], "ranking": [1, 0]}, "ranking", "invalid"),
    "one_response": ({"prompt": "P", "responses": ["a"]}, "responses", "invalid"),
    "zero_responses": ({"prompt": "P", "responses": []}, "responses", "invalid"),
    "nan_score": ({"prompt": "P", "responses": ["a", "b"], "scores": [1.0, float("nan")]}, "scores[1]", "invalid"),
    "inf_score": ({"prompt": "P", "responses": ["a", "b"], "scores": [float("inf"), 1.0]}, "scores[0]", "invalid"),
    "string_score": ({"prompt": "P", "responses": ["a", "b"], "scores": [1.0, "2"]}, "scores[1]", "invalid"),
    "tied_scores": ({"prompt": "P", "responses": ["a", "b", "c"], "scores": [1, 2.0, 2]}, "scores", "invalid"),
    "wrong_score_count": ({"prompt": "P", "responses": ["a", "b", "c"], "scores": [1, 2]}, "scores", "invalid"),
    "identical_ranked": ({"prompt": "P", "responses": ["a", "b", "a"]}, "responses", "identical"),
    "number_response": ({"prompt": "P", "responses": ["a", 2]}, "responses[1]", "type"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_in_jsonl(tmp_path, case):
    rec, field, kind = BAD_ROWS[case]
    # json.dumps writes NaN/Infinity, which Python's json reads back
    err, path = _load_error(tmp_path, [GOOD, GOOD, json.dumps(rec)])
    _assert_names(err, path, 2, field)
    assert err.kind == kind


@pytest.mark.parametrize("case", ["number_rejected", "both_empty", "identical", "tied_scores"])
def test_bad_row_in_json_and_parquet(tmp_path, case):
    rec, field, kind = BAD_ROWS[case]
    rows = [dict(r) for r in ([ROWS[0]] if "responses" not in rec else
                              [{"prompt": "P", "responses": ["x", "y", "z"], "scores": [1, 2, 3]}])] + [rec]
    p = tmp_path / "d.json"
    p.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(DataError) as ei:
        load_examples(str(p))
    _assert_names(ei.value, p, 1, field)
    if case != "number_rejected":  # parquet needs one type per column
        q = _write_parquet(tmp_path / "d.parquet", rows)
        with pytest.raises(DataError) as ei:
            load_examples(str(q))
        _assert_names(ei.value, q, 1, field)
        assert ei.value.kind == kind


def test_empty_responses_are_responses():
    """An empty (or blank) response is kept: it trains the end of turn alone. HH has such rows, where
    saying nothing was the preferred answer."""
    ex = parse_row({"prompt": "P", "chosen": "", "rejected": "b"}, "f.jsonl", 0)
    assert ex.responses == ["", "b"]
    ex = parse_row({"prompt": "P", "responses": ["good", "  ", "bad"], "scores": [3, 1, 2]}, "f.jsonl", 0)
    assert ex.responses == ["good", "bad", "  "]
    assert parse_row({"prompt": "P", "completion": ""}, "f.jsonl", 0).responses == [""]


def test_empty_response_tokenizes_to_the_end_of_turn(tiny_tokenizer):
    from directpo.data import Example, tokenize_example

    t = tokenize_example(Example("Human: where does she live?\n\nAssistant:", ["", " I won't say."], "f", 0),
                         tiny_tokenizer, 64)
    assert t.response_ids[0] == [tiny_tokenizer.eos_token_id]
    assert t.response_ids[1][-1] == tiny_tokenizer.eos_token_id and len(t.response_ids[1]) > 1


def test_nonexistent_file():
    path = "/nonexistent/dir/prefs.jsonl"
    with pytest.raises(DataError) as ei:
        load_examples(path)
    assert path in str(ei.value)
    assert "no such file" in str(ei.value)


def test_nonexistent_dataset_name(tmp_path, hf_cache):
    spec = str(tmp_path / "no_such_dataset_dir")
    with pytest.raises(DataError) as ei:
        load_examples(spec)
    assert spec in str(ei.value)


def test_bad_on_invalid_value(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(ValueError):
        load_examples(str(path), on_invalid="ignore")


# ----------------------------------------------------------------------------------------------
# on_invalid="skip"


def test_skip_counts_bad_rows(tmp_path):
    lines = [
        GOOD,                                              # 0 ok
        "{not json",                                       # 1 malformed
        json.dumps(BAD_ROWS["identical"][0]),              # 2 identical
        json.dumps(ROWS[1]),                               # 3 ok
        json.dumps(BAD_ROWS["both_empty"][0]),             # 4 identical (two empty responses)
        "[1, 2]",                                          # 5 malformed
        json.dumps(BAD_ROWS["missing_chosen"][0]),         # 6 missing
        json.dumps(BAD_ROWS["tied_scores"][0]),            # 7 invalid
        json.dumps(ROWS[2]),                               # 8 ok
    ]
    path = _write_lines(tmp_path / "d.jsonl", lines)
    report = SkipReport()
    exs = load_examples(str(path), on_invalid="skip", report=report)
    assert [ex.row for ex in exs] == [0, 3, 8]
    assert _content(exs) == [(r["prompt"], [r["chosen"], r["rejected"]], row) for r, row in zip(ROWS, [0, 3, 8])]
    assert dict(report.counts) == {"malformed": 2, "identical": 2, "missing": 1, "invalid": 1}
    assert report.total == 6
    s = report.summary()
    assert "skipped 6 rows" in s
    for kind, n in report.counts.items():
        assert f"{n} {kind}" in s
    assert str(path) in s  # the example messages name the file
    assert "line 2" in s  # first malformed row (0-based row 1)


def test_skip_report_counts_one_row_as_one_row(tmp_path):
    report = SkipReport()
    load_examples(str(_write_lines(tmp_path / "d.jsonl", ['{"prompt": "p", "chosen": "a", "rejected": "b"}', "{"])),
                  on_invalid="skip", report=report)
    assert report.summary().startswith("skipped 1 row (1 malformed)\n")


def test_skip_report_empty_summary():
    assert SkipReport().total == 0
    assert "no rows skipped" in SkipReport().summary()


def test_skip_with_no_bad_rows_leaves_report_empty(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    report = SkipReport()
    assert len(load_examples(str(path), on_invalid="skip", report=report)) == 3
    assert report.total == 0


def test_error_mode_stops_at_first_bad_row(tmp_path):
    lines = [GOOD, json.dumps(BAD_ROWS["identical"][0]), "{not json"]
    err, _ = _load_error(tmp_path, lines)
    assert err.row == 1 and err.kind == "identical"


def test_all_rows_bad_raises_even_with_skip(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", ["{bad", json.dumps(BAD_ROWS["identical"][0])])
    report = SkipReport()
    with pytest.raises(DataError) as ei:
        load_examples(str(path), on_invalid="skip", report=report)
    assert str(path) in str(ei.value)
    assert "no usable rows" in str(ei.value)
    assert "2 rows" in str(ei.value)
    assert report.total == 2


def test_empty_file_raises(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError) as ei:
        load_examples(str(path), on_invalid="skip")
    assert str(path) in str(ei.value)


def test_read_records_yields_errors_in_place(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", [GOOD, "nope", GOOD])
    recs = list(read_records(str(path)))
    assert [row for row, _ in recs] == [0, 1, 2]
    assert isinstance(recs[1][1], DataError)
    assert recs[0][1] == ROWS[0] and recs[2][1] == ROWS[0]


def test_nan_survives_json_roundtrip():
    """Guard for the NaN cases above: json really produces a float NaN from the written row."""
    rec = json.loads(json.dumps(BAD_ROWS["nan_score"][0]))
    assert math.isnan(rec["scores"][1])


# ----------------------------------------------------------------------------------------------
# Messages count rows from 1: "line N" in line-based files, "row N" elsewhere; Example.row stays 0-based


def test_messages_say_line_in_jsonl_and_row_elsewhere(tmp_path, hf_cache):
    rows = [ROWS[0], ROWS[1], BAD_ROWS["identical"][0]]
    jsonl = _write_jsonl(tmp_path / "d.jsonl", rows)
    gz = _write_jsonl(tmp_path / "d.jsonl.gz", rows, gz=True)
    for path in (jsonl, gz):
        with pytest.raises(DataError) as ei:
            load_examples(str(path))
        assert ei.value.row == 2
        assert str(ei.value).startswith(f"{path}, line 3, field 'rejected': identical")
    others = _write_all_formats(tmp_path, rows)
    del others["jsonl"]
    for name, spec in others.items():
        with pytest.raises(DataError) as ei:
            load_examples(spec)
        assert ei.value.row == 2, name
        assert str(ei.value).startswith(f"{spec}, row 3, field 'rejected': identical"), name
    exs = load_examples(str(jsonl), on_invalid="skip")
    assert [ex.row for ex in exs] == [0, 1]  # the attribute is unchanged: 0-based


# ----------------------------------------------------------------------------------------------
# Bytes that are not UTF-8, lone surrogates, broken gzip


LATIN1_ROW = '{"prompt": "Caf\u00e9?", "chosen": " Oui.", "rejected": " Non."}'.encode("latin-1")  # é as 0xe9


def _write_bytes(path: Path, data: bytes, gz: bool = False) -> Path:
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz"])
def test_non_utf8_line_names_file_and_line(tmp_path, name):
    data = GOOD.encode() + b"\n\n" + LATIN1_ROW + b"\n" + json.dumps(ROWS[1]).encode() + b"\n"
    path = _write_bytes(tmp_path / name, data, gz=name.endswith(".gz"))
    with pytest.raises(DataError) as ei:
        load_examples(str(path))
    err = ei.value
    assert (err.row, err.kind) == (2, "encoding")
    # '{"prompt": "Caf' is 15 characters: the é is column 16
    assert str(err).startswith(f"{path}, line 3: not valid UTF-8: byte 0xe9 at column 16")
    assert "codec" not in str(err)
    report = SkipReport()
    exs = load_examples(str(path), on_invalid="skip", report=report)
    assert [ex.row for ex in exs] == [0, 3] and dict(report.counts) == {"encoding": 1}


def test_non_utf8_only_rows_is_no_usable_rows(tmp_path):
    path = _write_bytes(tmp_path / "d.jsonl", LATIN1_ROW + b"\n" + b"\xff\xfe\x00\n")
    report = SkipReport()
    with pytest.raises(DataError, match="no usable rows"):
        load_examples(str(path), on_invalid="skip", report=report)
    assert report.counts["encoding"] == 2


@pytest.mark.parametrize("name", ["d.json", "d.json.gz"])
def test_non_utf8_in_json_array_is_an_error_of_its_row(tmp_path, name):
    data = b"[\n" + GOOD.encode() + b",\n" + LATIN1_ROW + b",\n" + json.dumps(ROWS[1]).encode() + b"\n]\n"
    path = _write_bytes(tmp_path / name, data, gz=name.endswith(".gz"))
    with pytest.raises(DataError) as ei:
        load_examples(str(path))
    err = ei.value
    assert (err.row, err.field, err.kind) == (1, "prompt", "encoding")
    assert str(err).startswith(f"{path}, row 2, field 'prompt': not valid UTF-8: byte 0xe9")
    exs = load_examples(str(path), on_invalid="skip")
    assert [ex.row for ex in exs] == [0, 2]
    assert exs[1].prompt == ROWS[1]["prompt"]


def test_non_utf8_outside_strings_in_json_names_the_line(tmp_path):
    path = _write_bytes(tmp_path / "d.json", b"[\n" + GOOD.encode() + b",\n  \x80\n]")
    with pytest.raises(DataError) as ei:
        load_examples(str(path), on_invalid="skip")  # not a row's fault: the file cannot be read
    assert str(ei.value) == f"{path}: not valid UTF-8: byte 0x80 at line 3, column 3"


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
def test_utf8_bom_is_read(tmp_path, name):
    body = (GOOD + "\n") if name.endswith(".jsonl") else json.dumps([ROWS[0]])
    path = _write_bytes(tmp_path / name, b"\xef\xbb\xbf" + body.encode())
    assert _content(load_examples(str(path))) == _expected(ROWS[:1])


@pytest.mark.parametrize("field, value, where", [
    ("prompt", "P\ud800", "prompt"),
    ("chosen", [{"role": "assistant", "content": "ok\udfff"}], "chosen[0].content"),
    ("responses", ["a", "b\udc80"], "responses[1]"),
])
def test_lone_surrogate_is_an_error_of_its_field(tmp_path, field, value, where):
    rec = {"prompt": "P", "chosen": "a", "rejected": "b"} if field != "responses" else {"prompt": "P"}
    if field == "chosen":
        rec = {"prompt": "P", "rejected": [{"role": "assistant", "content": "no"}]}
    rec[field] = value
    path = _write_lines(tmp_path / "d.jsonl", [GOOD, json.dumps(rec)])  # ensure_ascii: written as \ud800 escapes
    with pytest.raises(DataError) as ei:
        load_examples(str(path))
    _assert_names(ei.value, path, 1, where)
    assert ei.value.kind == "encoding" and "lone surrogate" in str(ei.value)
    assert len(load_examples(str(path), on_invalid="skip")) == 1


def test_prompt_file_lone_surrogate_in_reference(tmp_path):
    from directpo.data.prompts import load_prompts

    path = _write_lines(tmp_path / "p.jsonl", ['{"prompt": "ok"}', '{"prompt": "p", "reference": "r\\ud800"}'])
    with pytest.raises(DataError) as ei:
        load_prompts(str(path))
    _assert_names(ei.value, path, 1, "reference")


@pytest.mark.parametrize("name", ["d.jsonl.gz", "d.json.gz"])
def test_not_gzip_data(tmp_path, name):
    path = _write_bytes(tmp_path / name, GOOD.encode() + b"\n")  # plain text under a .gz name
    with pytest.raises(DataError) as ei:
        load_examples(str(path), on_invalid="skip")
    assert str(ei.value).startswith(f"{path}: corrupt or truncated gzip data: ")


def test_truncated_gzip_names_the_last_line_read(tmp_path):
    lines = [json.dumps({"prompt": f"P{i} " + "x" * 50, "chosen": " a", "rejected": " b"}) for i in range(2000)]
    whole = gzip.compress("".join(line + "\n" for line in lines).encode())
    path = _write_bytes(tmp_path / "d.jsonl.gz", whole[:len(whole) // 2])
    with pytest.raises(DataError) as ei:
        load_examples(str(path), on_invalid="skip")
    assert str(ei.value).startswith(f"{path}: corrupt or truncated gzip data after line ")


def test_corrupt_parquet(tmp_path):
    path = _write_bytes(tmp_path / "d.parquet", b"PAR1 not really")
    with pytest.raises(DataError) as ei:
        load_examples(str(path))
    assert str(ei.value).startswith(f"{path}: cannot read as Parquet")


def test_json_python_cannot_hold_is_malformed(tmp_path):
    """Valid JSON that Python's json refuses: nesting past the stack, an integer past the digit limit."""
    path = _write_lines(tmp_path / "d.jsonl", [GOOD, "[" * 100_000, '{"prompt": "p", "chosen": 1' + "0" * 5000 + "}"])
    report = SkipReport()
    assert len(load_examples(str(path), on_invalid="skip", report=report)) == 1
    assert report.counts == {"malformed": 2}
    with pytest.raises(DataError, match="line 2: malformed JSON: nested too deeply"):
        load_examples(str(path))


def test_huge_integer_score_is_a_number():
    """A 400-digit integer score is finite (math.isfinite would overflow converting it to float)."""
    ex = parse_row({"prompt": "P", "responses": ["a", "b"], "scores": [1, 10 ** 400]}, "r.jsonl", 0)
    assert ex.responses == ["b", "a"]


# ----------------------------------------------------------------------------------------------
# Ranked rows with both `ranking` and `scores`


@pytest.mark.parametrize("scores", [[0.5, 2.0, -1.0], [2, 3, 1], [2, 2, 0]])  # last: a tie the ranking orders
def test_ranking_and_scores_that_agree(scores):
    rec = {"prompt": "P", "responses": ["b", "a", "c"], "ranking": [1, 0, 2], "scores": scores}
    assert parse_row(rec, "r", 0).responses == ["a", "b", "c"]


def test_ranking_and_scores_that_disagree():
    rec = {"prompt": "P", "responses": ["b", "a", "c"], "ranking": [1, 0, 2], "scores": [0.5, 2.0, 3.0]}
    with pytest.raises(DataError) as ei:
        parse_row(rec, "r.jsonl", 4)
    _assert_names(ei.value, "r.jsonl", 4, "ranking")
    assert ei.value.kind == "invalid"
    assert "disagrees with 'scores'" in str(ei.value)
    assert "ranks response 0 above response 2, whose score is higher (3.0 > 0.5)" in str(ei.value)


def test_ranking_and_bad_scores_still_checks_scores():
    rec = {"prompt": "P", "responses": ["a", "b"], "ranking": [0, 1], "scores": [1.0, float("nan")]}
    with pytest.raises(DataError) as ei:
        parse_row(rec, "r", 0)
    assert ei.value.field == "scores[1]"


# ----------------------------------------------------------------------------------------------
# What `--data` names: a file, a directory, a hub id; a missing local path fails at once


@pytest.fixture
def no_hub(monkeypatch):
    """`datasets.load_dataset` replaced: records what it was asked for, returns two good rows."""
    import datasets

    calls = []

    def fake(name, split=None, **kw):
        calls.append((name, split))
        return [ROWS[0], ROWS[1]]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    return calls


@pytest.mark.parametrize("spec", ["pairs.txt", "out/nosuch.jsonl", "/abs/nosuch", "./nosuch", "../nosuch",
                                  "~/nosuch-directpo", "a/b/c", "nosuch.jsonl", "data.csv", "owner/name.parquet",
                                  "has space", "/abs/ds:test"])
def test_missing_local_path_fails_at_once(tmp_path, monkeypatch, no_hub, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as ei:
        load_examples(spec)
    assert str(ei.value) == f"{spec}: no such file or directory"
    assert no_hub == []  # never asked the hub


@pytest.mark.parametrize("spec, asked", [
    ("imdb", ("imdb", "train")),
    ("Anthropic/hh-rlhf", ("Anthropic/hh-rlhf", "train")),
    ("Anthropic/hh-rlhf:test", ("Anthropic/hh-rlhf", "test")),
    ("trl-lib/ultrafeedback_binarized", ("trl-lib/ultrafeedback_binarized", "train")),
    ("org/data.v2", ("org/data.v2", "train")),
])
def test_hub_ids_go_to_datasets(tmp_path, monkeypatch, no_hub, spec, asked):
    monkeypatch.chdir(tmp_path)
    exs = load_examples(spec)
    assert no_hub == [asked]
    assert [ex.row for ex in exs] == [0, 1] and all(ex.source == spec for ex in exs)


def test_existing_path_wins_over_hub_shape(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner").mkdir()
    _write_jsonl(tmp_path / "owner" / "name.jsonl", ROWS)
    assert len(load_examples("owner/name.jsonl")) == 3 and no_hub == []
    d = tmp_path / "localdir"
    d.mkdir()
    load_examples("localdir")
    assert no_hub == [("localdir", "train")]


@pytest.mark.parametrize("name", ["pairs.txt", "pairs.csv", "pairs"])
def test_existing_file_of_unsupported_type(tmp_path, no_hub, name):
    path = tmp_path / name
    path.write_text("prompt,chosen,rejected\n", encoding="utf-8")
    with pytest.raises(DataError) as ei:
        load_examples(str(path))
    msg = str(ei.value)
    assert msg.startswith(f"{path}: unsupported file type: directpo reads .jsonl, .jsonl.gz")
    assert ".json, .json.gz, .parquet files" in msg and no_hub == []


def test_bad_byte_in_an_unused_json_field_is_still_an_error(tmp_path):
    """As in JSONL, where the whole line fails to decode: a row holding a bad byte anywhere is refused."""
    row = b'{"prompt": "P", "chosen": " a", "rejected": " b", "meta": {"note": "caf\xe9"}}'
    path = _write_bytes(tmp_path / "d.json", b"[" + GOOD.encode() + b", " + row + b"]")
    with pytest.raises(DataError) as ei:
        load_examples(str(path))
    _assert_names(ei.value, path, 1, "meta.note")
    assert ei.value.kind == "encoding"


def test_split_suffix_on_a_file(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError, match="picks from a `datasets` source, not a file"):
        load_examples(f"{path}:test")
