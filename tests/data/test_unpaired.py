"""Unpaired rows (KTO's data): {prompt, completion, label}, validated like pairs; pairs converted to
unpaired rows on request; each example's mismatched completion fixed at data preparation."""
import json

import pytest
import torch

from directpo.data import (DataError, Example, SkipReport, TokenizedExample, collate_packed, collate_padded,
                           load_examples, pair_mismatched, pairs_to_unpaired, parse_row, tokenize_examples)


def _jsonl(tmp_path, rows, name="u.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_valid_rows_text_conversational_and_empty(tmp_path):
    msgs = [{"role": "user", "content": "hi"}]
    reply = [{"role": "assistant", "content": "hello"}]
    rows = [{"prompt": "Q1", "completion": "A1", "label": True},
            {"prompt": "Q2", "completion": "A2", "label": False},
            {"prompt": msgs, "completion": reply, "label": True},
            {"prompt": "hi", "completion": reply, "label": False},  # a text prompt becomes one user message
            {"prompt": "", "completion": "", "label": True}]  # empty prompt and completion, as pairs allow
    exs = load_examples(_jsonl(tmp_path, rows))
    assert [ex.label for ex in exs] == [True, False, True, False, True]
    assert exs[0].prompt == "Q1" and exs[0].responses == ["A1"] and not exs[0].conversational
    assert exs[2].prompt == msgs and exs[2].responses == [reply] and exs[2].conversational
    assert exs[3].prompt == [{"role": "user", "content": "hi"}]
    assert exs[4].prompt == "" and exs[4].responses == [""]
    assert [ex.row for ex in exs] == [0, 1, 2, 3, 4]
    # without a label a prompt/completion row stays an SFT completion; a pair stays a pair
    assert parse_row({"prompt": "p", "completion": "c"}, "f", 0).label is None
    assert parse_row({"prompt": "p", "chosen": "a", "rejected": "b", "label": True}, "f", 0).label is None


@pytest.mark.parametrize("label", ["true", "yes", 1, 0, 1.0, [True], {"v": True}])
def test_a_label_that_is_not_a_boolean_names_file_line_and_field(tmp_path, label):
    path = _jsonl(tmp_path, [{"prompt": "Q", "completion": "A", "label": True},
                             {"prompt": "Q", "completion": "B", "label": label}])
    with pytest.raises(DataError) as e:
        load_examples(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}, line 2, field 'label': expected true (desirable) or false (undesirable)")
    assert e.value.field == "label" and e.value.row == 1 and "\n" not in msg


@pytest.mark.parametrize("row, field, says", [
    ({"prompt": "Q", "label": True}, "completion", "missing"),
    ({"prompt": "Q", "completion": 3, "label": True}, "completion", "expected a string"),
    ({"completion": "A", "label": False}, "prompt", "missing"),
    ({"prompt": 5, "completion": "A", "label": False}, "prompt", "expected a string"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": "A", "label": True}, "prompt", "expected a string"),
    ({"completion": [{"role": "assistant", "content": "a"}], "label": True}, "prompt", "missing"),
    ({"prompt": "Q", "completion": [{"role": "assistant"}], "label": True}, "completion[0]", "message"),
    ({"prompt": "Q", "completion": [], "label": True}, "completion", "non-empty list"),
    ({"prompt": "Q", "completion": "bad \ud800", "label": True}, "completion", "lone surrogate"),
])
def test_bad_fields_name_the_field(tmp_path, row, field, says):
    path = _jsonl(tmp_path, [{"prompt": "ok", "completion": "ok", "label": True}, json.dumps(row)])
    with pytest.raises(DataError) as e:
        load_examples(path)
    assert e.value.field == field and e.value.row == 1 and says in str(e.value)
    assert str(e.value).startswith(f"{path}, line 2, field '{field}'")


def test_bad_rows_are_skipped_and_counted(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "Q", "completion": "A", "label": True},
                             {"prompt": "Q", "completion": "B", "label": "no"},
                             {"prompt": "Q", "label": False}])
    report = SkipReport()
    exs = load_examples(path, on_invalid="skip", report=report)
    assert len(exs) == 1 and report.counts == {"type": 1, "missing": 1}


def test_pairs_become_a_desirable_and_an_undesirable_row():
    pair = Example("P", ["good", "bad"], "d.jsonl", 4)
    kept = Example("Q", ["c"], "d.jsonl", 5, label=False)
    out = pairs_to_unpaired([pair, kept])
    assert [(ex.prompt, ex.responses, ex.label, ex.row) for ex in out] == [
        ("P", ["good"], True, 4), ("P", ["bad"], False, 4), ("Q", ["c"], False, 5)]
    with pytest.raises(DataError, match="line 8, field 'label': missing"):
        pairs_to_unpaired([Example("P", ["c"], "d.jsonl", 7)])  # a completion without a label
    with pytest.raises(DataError, match="field 'responses'.*--ranking-to-pairs"):
        pairs_to_unpaired([Example("P", ["a", "b", "c"], "d.jsonl", 7)])


# ---- mismatched completions ------------------------------------------------------------------

def _unpaired(prompts: list[str]) -> list[TokenizedExample]:
    """One tokenized example per prompt name; prompt ids from the name, completion ids unique."""
    ids = {p: [100 + sorted(set(prompts)).index(p)] for p in prompts}
    return [TokenizedExample(ids[p], [[1000 + i, 2]], "d", i, label=i % 2 == 0) for i, p in enumerate(prompts)]


def _partner(out, examples) -> list[int]:
    """The index of the example whose completion each example got as its mismatched one."""
    own = {tuple(ex.response_ids[0]): i for i, ex in enumerate(examples)}
    return [own[tuple(ex.response_ids[1])] for ex in out]


def test_mismatched_completions_are_deterministic_and_never_the_own_prompt():
    # converted pairs: every prompt twice (desirable and undesirable)
    prompts = [f"p{i // 2}" for i in range(40)]
    exs = _unpaired(prompts)
    out = pair_mismatched(exs, seed=3)
    partner = _partner(out, exs)
    assert all(prompts[j] != prompts[i] for i, j in enumerate(partner))
    assert [ex.response_ids[0] for ex in out] == [ex.response_ids[0] for ex in exs]  # own completion first
    assert [ex.label for ex in out] == [ex.label for ex in exs] and [ex.row for ex in out] == list(range(40))
    assert _partner(pair_mismatched(exs, seed=3), exs) == partner  # the seed and the data decide
    assert _partner(pair_mismatched(exs, seed=4), exs) != partner
    assert exs[0].response_ids == [[1000, 2]]  # the input is left as it was


def test_one_other_prompt_is_enough_and_same_prompts_only_when_unavoidable():
    prompts = ["a"] * 30 + ["b"]
    out = pair_mismatched(_unpaired(prompts), seed=0)
    partner = _partner(out, _unpaired(prompts))
    assert all(partner[i] == 30 for i in range(30))  # every "a" takes the one "b" completion
    assert prompts[partner[30]] == "a"
    same = _unpaired(["a"] * 5)  # every prompt the same: another example's completion all the same
    assert all(j != i for i, j in enumerate(_partner(pair_mismatched(same, seed=1), same)))
    single = _unpaired(["a"])  # one example: its own completion
    assert pair_mismatched(single)[0].response_ids == [[1000, 2], [1000, 2]]
    assert pair_mismatched([]) == []


def test_a_mismatched_completion_is_cut_to_fit_after_the_prompt():
    long_prompt = TokenizedExample(list(range(10, 16)), [[7, 2]], label=True)
    long_completion = TokenizedExample([5], [list(range(20, 28))], label=False)
    a, b = pair_mismatched([long_prompt, long_completion], max_length=8)
    assert a.response_ids[1] == [20, 21] and b.response_ids[1] == [7, 2]
    with pytest.raises(ValueError, match="one completion each"):
        pair_mismatched([a])


def test_labels_travel_in_the_batch(tiny_tokenizer):
    rows = [Example("Review of A:", ["great"], "d", 0, True), Example("Review of B:", ["awful"], "d", 1, False)]
    tok = pair_mismatched(tokenize_examples(rows, tiny_tokenizer, max_length=32), seed=0)
    assert [ex.label for ex in tok] == [True, False] and all(len(ex.response_ids) == 2 for ex in tok)
    pad = tiny_tokenizer.pad_token_id
    for batch in (collate_packed(tok, pad), collate_padded(tok, pad)):
        assert torch.equal(batch.labels, torch.tensor([True, False])) and batch.seq_index.shape == (2, 2)
    assert torch.equal(collate_packed([ex.only(0) for ex in tok], pad).labels, torch.tensor([True, False]))
    pairs = tokenize_examples([Example("P", ["a", "b"], "d", 0)], tiny_tokenizer, max_length=32)
    assert collate_padded(pairs, pad).labels is None
    with pytest.raises(ValueError, match="mixes"):
        collate_padded([pairs[0], tok[0]], pad)
