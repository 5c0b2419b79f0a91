"""Prompt files and prompt ids (`directpo.data.prompts`): one tokenization with training, one
read-and-skip loop with `load_examples`; `write_jsonl` is atomic and shared with `directpo.toy`."""
from __future__ import annotations

import json

import pytest

from directpo.data.formats import DataError, Example, SkipReport, parse_records, write_jsonl
from directpo.data.prompts import encode_prompt, load_prompts
from directpo.data.tokenize import tokenize_example


@pytest.fixture
def bos_tok(tiny_model):
    """The tiny tokenizer with a leading BOS on every call (like Llama's)."""
    from tokenizers.processors import TemplateProcessing

    from directpo.models import load_tokenizer

    t = load_tokenizer(str(tiny_model))
    t.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", t.bos_token_id)])
    return t


@pytest.mark.parametrize("which", ["tiny_tokenizer", "bos_tok"])
@pytest.mark.parametrize("max_prompt_length", [None, 3, 1])
def test_encode_prompt_is_the_training_prompt(request, which, max_prompt_length):
    tok = request.getfixturevalue(which)
    for prompt in ("Review of Kalomirentosavel, a film I found", ""):
        ids = encode_prompt(prompt, tok, max_prompt_length)
        te = tokenize_example(Example(prompt, [" fine."]), tok, max_prompt_length=max_prompt_length)
        assert ids == te.prompt_ids
        assert ids  # an empty prompt starts from BOS
    if which == "bos_tok":  # cut from the left, BOS kept
        ids = encode_prompt("Review of Kalomirentosavel, a film I found", tok, 3)
        assert len(ids) == 3 and ids[0] == tok.bos_token_id


def test_encode_prompt_chat_template(tiny_tokenizer):
    msgs = [{"role": "user", "content": "Review of Sa?"}]
    text = tiny_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert encode_prompt(msgs, tiny_tokenizer) == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_load_prompts_skips_like_load_examples(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n{"prompt": 3}\n{"text": "no prompt"}\n')
    report = SkipReport()
    assert [it.prompt for it in load_prompts(str(bad), on_invalid="skip", report=report)] == ["ok"]
    assert dict(report.counts) == {"malformed": 1, "type": 1, "missing": 1}
    with pytest.raises(DataError, match="p.jsonl, line 2:"):
        load_prompts(str(bad))
    with pytest.raises(ValueError, match="on_invalid"):
        load_prompts(str(bad), on_invalid="ignore")
    only_bad = tmp_path / "b.jsonl"
    only_bad.write_text('{"prompt": 3}\n')
    with pytest.raises(DataError, match="no usable prompts"):
        load_prompts(str(only_bad), on_invalid="skip")


def test_parse_records_is_generic(tmp_path):
    path = write_jsonl([{"x": 1}, {"x": -1}, {"x": 2}], tmp_path / "x.jsonl")

    def parse(rec, source, row):
        if rec["x"] < 0:
            raise DataError(source, row, "x", "negative", kind="negative")
        return (row, rec["x"])

    report = SkipReport()
    assert parse_records(str(path), parse, "skip", report=report) == [(0, 1), (2, 2)]
    assert dict(report.counts) == {"negative": 1}


def test_write_jsonl_is_atomic_and_shared(tmp_path):
    from directpo import toy

    assert toy.write_jsonl is write_jsonl
    rows = [{"prompt": "é", "n": 1}, {"prompt": "b", "n": 2}]
    path = write_jsonl(iter(rows), tmp_path / "sub" / "r.jsonl")  # any iterable; parents created
    assert path == tmp_path / "sub" / "r.jsonl"
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == rows
    assert not (tmp_path / "sub" / "r.jsonl.tmp").exists()

    def failing():
        yield {"n": 3}
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(failing(), path)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == rows  # old file intact
    assert not (tmp_path / "sub" / "r.jsonl.tmp").exists()


def test_blank_prompts_are_kept_and_said_with_the_first_one_named(tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "Hi"}\n{"prompt": ""}\n{"prompt": "  "}\n{"prompt": [{"role": "user", "content": "x"}]}\n')
    items = load_prompts(str(f))
    assert [it.prompt for it in items][:3] == ["Hi", "", "  "]  # kept: sampled from the start token, as training reads them
    err = capsys.readouterr().err
    assert f"warning: 2 of 4 prompts are blank (the first at {f} line 2)" in err
    f.write_text('{"prompt": "Hi"}\n')
    load_prompts(str(f))
    assert "blank" not in capsys.readouterr().err
