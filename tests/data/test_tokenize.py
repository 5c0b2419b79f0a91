"""Examples -> token ids: EOS, the prompt/response boundary, truncation, chat templates."""
from __future__ import annotations

import pytest

try:  # tests/ may or may not be a package
    from tests.conftest import hh_rows
except ImportError:  # pragma: no cover
    from conftest import hh_rows
from directpo.data.formats import DataError, Example, SkipReport, load_examples, parse_row
from directpo.data.tokenize import TokenizedExample, TokenizeStats, render, tokenize_example, tokenize_examples
from directpo.toy import SIMPLE_CHAT_TEMPLATE


def _ids(tok, text, special=True):
    return tok(text, add_special_tokens=special)["input_ids"]


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.fixture
def tok(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture
def bos_tok(tiny_model):
    """A fresh copy of the tiny tokenizer whose calls add a leading BOS (like Llama's)."""
    from tokenizers.processors import TemplateProcessing

    from directpo.models import load_tokenizer

    t = load_tokenizer(str(tiny_model))
    t.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", t.bos_token_id)])
    assert _ids(t, "hello")[0] == t.bos_token_id
    assert _ids(t, "hello", special=False)[0] != t.bos_token_id
    return t


@pytest.fixture
def no_template_tok(tiny_model):
    from directpo.models import load_tokenizer

    t = load_tokenizer(str(tiny_model))
    t.chat_template = None
    return t


def test_fixture_has_distinct_special_tokens(tok):
    ids = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
    assert None not in ids and len(ids) == 3
    assert _ids(tok, "<|eos|>", special=False) == [tok.eos_token_id]


# ----------------------------------------------------------------------------------------------
# Plain text: EOS, prompt ids, round trip


TEXT_EXAMPLES = [
    Example("Review of Kalo:", [" It was great, warm and dull.", " It was awful, flat and funny."], "t", 0),
    Example("\n\nHuman: What is a good film?\n\nAssistant:", [" Try a comedy.", " I don't know."], "t", 1),
    Example("Question: 2+2=", ["4", "5", "22"], "t", 2),
]


@pytest.mark.parametrize("ex", TEXT_EXAMPLES, ids=["review", "hh", "ranked"])
def test_text_example_ids(tok, ex):
    eos = tok.eos_token_id
    stats = TokenizeStats()
    te = tokenize_example(ex, tok, stats=stats)
    assert isinstance(te, TokenizedExample)
    assert te.prompt_ids == _ids(tok, ex.prompt)
    assert len(te.response_ids) == len(ex.responses)
    for text, ids in zip(ex.responses, te.response_ids):
        assert ids[-1] == eos
        assert ids.count(eos) == 1
        assert _decode(tok, te.prompt_ids + ids[:-1]) == ex.prompt + text
        assert _decode(tok, ids[:-1]) == text
    assert (te.source, te.row) == (ex.source, ex.row)
    assert not te.prompt_truncated and te.responses_truncated == 0
    assert te.num_tokens == sum(len(te.prompt_ids) + len(r) for r in te.response_ids)
    assert stats.prompts_truncated == stats.responses_truncated == 0


def test_response_ids_are_the_joint_tokenization_tail(tok):
    """Without a boundary merge, response ids are exactly what follows the prompt in the joint text."""
    ex = TEXT_EXAMPLES[0]
    stats = TokenizeStats()
    te = tokenize_example(ex, tok, stats=stats)
    for text, ids in zip(ex.responses, te.response_ids):
        joint = _ids(tok, ex.prompt + text)
        assert joint[:len(te.prompt_ids)] == te.prompt_ids  # premise: no merge here
        assert ids == joint[len(te.prompt_ids):] + [tok.eos_token_id]
    assert stats.boundary_merges == 0


def test_eos_not_doubled_when_response_ends_with_eos_text(tok):
    ex = Example("Review of Kalo:", [" Great.<|eos|>", " Dull."], "t", 0)
    te = tokenize_example(ex, tok)
    for ids in te.response_ids:
        assert ids[-1] == tok.eos_token_id
        assert ids.count(tok.eos_token_id) == 1
    assert _decode(tok, te.prompt_ids + te.response_ids[0]) == "Review of Kalo: Great.<|eos|>"
    assert _decode(tok, te.prompt_ids + te.response_ids[1]) == "Review of Kalo: Dull.<|eos|>"


def test_hh_real_rows_round_trip(tok):
    rows = hh_rows(20)
    stats = TokenizeStats()
    for i, r in enumerate(rows):
        ex = parse_row(r, "hh", i)
        te = tokenize_example(ex, tok, stats=stats)
        assert te.prompt_ids == _ids(tok, ex.prompt)
        for text, ids, full in zip(ex.responses, te.response_ids, (r["chosen"], r["rejected"])):
            assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
            assert _decode(tok, te.prompt_ids + ids[:-1]) == full


def test_bos_adding_tokenizer(bos_tok):
    ex = TEXT_EXAMPLES[0]
    stats = TokenizeStats()
    te = tokenize_example(ex, bos_tok, stats=stats)
    assert te.prompt_ids[0] == bos_tok.bos_token_id
    assert te.prompt_ids == _ids(bos_tok, ex.prompt)
    for text, ids in zip(ex.responses, te.response_ids):
        assert bos_tok.bos_token_id not in ids
        assert ids[-1] == bos_tok.eos_token_id and ids.count(bos_tok.eos_token_id) == 1
        assert _decode(bos_tok, te.prompt_ids + ids[:-1]) == "<|bos|>" + ex.prompt + text
    assert stats.boundary_merges == 0


def test_empty_prompt_starts_from_bos(tok):
    te = tokenize_example(Example("", ["Hello there.", "Go."], "t", 0), tok)
    assert te.prompt_ids == [tok.bos_token_id]
    assert te.response_ids[0] == _ids(tok, "Hello there.", special=False) + [tok.eos_token_id]


def test_empty_prompt_is_not_a_boundary_merge(tok):
    stats = TokenizeStats()
    tokenize_example(Example("", ["Hello there.", "Go."], "t", 0), tok, stats=stats)
    assert stats.boundary_merges == 0


# ----------------------------------------------------------------------------------------------
# Boundary merges


def test_boundary_merge(tok):
    prompt = "Review of Kalo: "
    responses = ["great film", "dull film"]
    p_ids = _ids(tok, prompt)
    merging = [r for r in responses if _ids(tok, prompt + r)[:len(p_ids)] != p_ids]
    assert merging, "premise: a trailing-space prompt merges with the response under this tokenizer"
    stats = TokenizeStats()
    te = tokenize_example(Example(prompt, responses, "t", 0), tok, stats=stats)
    assert stats.boundary_merges == len(merging)
    assert te.prompt_ids == p_ids  # the prompt keeps its own tokenization
    for text, ids in zip(responses, te.response_ids):
        assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
        assert _decode(tok, te.prompt_ids + ids[:-1]) == prompt + text
        assert _decode(tok, ids[:-1]) == text


def test_boundary_merge_counts_accumulate(tok):
    stats = TokenizeStats()
    ex = Example("Review of Kalo: ", ["great film", "dull film"], "t", 0)
    tokenize_examples([ex, ex, TEXT_EXAMPLES[0]], tok, stats=stats)
    single = TokenizeStats()
    tokenize_example(ex, tok, stats=single)
    assert single.boundary_merges > 0
    assert stats.boundary_merges == 2 * single.boundary_merges
    assert f"{stats.boundary_merges} prompt/response boundary merges" in stats.summary()


def test_boundary_merge_with_bos_tokenizer(bos_tok):
    prompt, responses = "Review of Kalo: ", ["great film", "dull film"]
    stats = TokenizeStats()
    te = tokenize_example(Example(prompt, responses, "t", 0), bos_tok, stats=stats)
    assert stats.boundary_merges > 0
    assert te.prompt_ids == _ids(bos_tok, prompt)
    for text, ids in zip(responses, te.response_ids):
        assert bos_tok.bos_token_id not in ids
        assert _decode(bos_tok, te.prompt_ids + ids[:-1]) == "<|bos|>" + prompt + text


# ----------------------------------------------------------------------------------------------
# Truncation


LONG_PROMPT = "\n\nHuman: Tell me about the film Kalodor, please, in some detail.\n\nAssistant:"


def test_max_prompt_length_cuts_from_the_left(tok):
    full = _ids(tok, LONG_PROMPT)
    m = 5
    assert len(full) > m and full[0] != tok.bos_token_id
    ex = Example(LONG_PROMPT, [" It is good.", " No."], "t", 0)
    stats = TokenizeStats()
    te = tokenize_example(ex, tok, max_prompt_length=m, stats=stats)
    assert te.prompt_ids == full[-m:]
    assert te.prompt_truncated
    assert stats.prompts_truncated == 1
    # the responses are unaffected
    untrunc = tokenize_example(ex, tok)
    assert te.response_ids == untrunc.response_ids
    assert not untrunc.prompt_truncated


def test_max_prompt_length_not_reached(tok):
    full = _ids(tok, LONG_PROMPT)
    stats = TokenizeStats()
    te = tokenize_example(Example(LONG_PROMPT, [" a", " b"], "t", 0), tok, max_prompt_length=len(full), stats=stats)
    assert te.prompt_ids == full
    assert not te.prompt_truncated and stats.prompts_truncated == 0


def test_max_prompt_length_keeps_bos_from_tokenizer(bos_tok):
    full = _ids(bos_tok, LONG_PROMPT)
    assert full[0] == bos_tok.bos_token_id
    m = 6
    te = tokenize_example(Example(LONG_PROMPT, [" a", " b"], "t", 0), bos_tok, max_prompt_length=m)
    assert len(te.prompt_ids) == m
    assert te.prompt_ids[0] == bos_tok.bos_token_id
    assert te.prompt_ids[1:] == full[-(m - 1):]
    assert te.prompt_truncated


def test_max_prompt_length_keeps_bos_written_in_text(tok):
    """A prompt that starts with the BOS token text (as rendered templates do) keeps it too."""
    prompt = "<|bos|>" + LONG_PROMPT
    full = _ids(tok, prompt)
    assert full[0] == tok.bos_token_id
    te = tokenize_example(Example(prompt, [" a", " b"], "t", 0), tok, max_prompt_length=4)
    assert te.prompt_ids == [tok.bos_token_id] + full[-3:]


def test_max_length_cuts_responses_from_the_right(tok):
    ex = Example("Review of Kalo:", [" It was great, warm and dull, and I found it moving.", " Bad."], "t", 3)
    full = tokenize_example(ex, tok)
    p = len(full.prompt_ids)
    long_n, short_n = len(full.response_ids[0]), len(full.response_ids[1])
    assert long_n > short_n + 2
    max_length = p + short_n + 1  # room for the short response, not the long one
    stats = TokenizeStats()
    # an explicit max_prompt_length (here: the whole prompt) keeps the prompt as it is
    te = tokenize_example(ex, tok, max_length=max_length, max_prompt_length=p, stats=stats)
    assert te.prompt_ids == full.prompt_ids
    assert te.response_ids[0] == full.response_ids[0][:short_n + 1]
    assert te.response_ids[0][-1] != tok.eos_token_id  # the EOS went with the cut
    assert te.response_ids[1] == full.response_ids[1]
    assert te.responses_truncated == 1 and stats.responses_truncated == 1
    assert stats.prompts_truncated == stats.prompts_cut_to_fit == 0
    assert all(len(te.prompt_ids) + len(r) <= max_length for r in te.response_ids)


def test_max_length_exactly_fits(tok):
    ex = TEXT_EXAMPLES[0]
    full = tokenize_example(ex, tok)
    max_length = max(len(full.prompt_ids) + len(r) for r in full.response_ids)
    stats = TokenizeStats()
    te = tokenize_example(ex, tok, max_length=max_length, stats=stats)
    assert te.prompt_ids == full.prompt_ids
    assert te.response_ids == full.response_ids
    assert te.responses_truncated == 0 and stats.responses_truncated == 0
    assert stats.prompts_truncated == stats.prompts_cut_to_fit == 0


def test_prompt_and_response_truncation_together(tok):
    ex = Example(LONG_PROMPT, [" It was great, warm and dull, and I found it moving.", " No."], "t", 0)
    full = tokenize_example(ex, tok)
    te = tokenize_example(ex, tok, max_length=8, max_prompt_length=5)
    assert te.prompt_ids == full.prompt_ids[-5:]
    assert te.response_ids[0] == full.response_ids[0][:3]
    assert all(len(te.prompt_ids) + len(r) <= 8 for r in te.response_ids)


# Without max_prompt_length: a pair that does not fit has its prompt cut to max_length // 2


LONG_RESPONSES = [" It was great, warm and dull, and I found it moving.", " No."]


@pytest.mark.parametrize("max_length", [9, 10, 14])  # odd and even: the prompt keeps max_length // 2
def test_default_cuts_prompt_to_half_when_pair_does_not_fit(tok, max_length):
    ex = Example(LONG_PROMPT, LONG_RESPONSES, "t", 0)
    full = tokenize_example(ex, tok)
    n = len(full.prompt_ids)
    assert n > max_length // 2 and n + len(full.response_ids[0]) > max_length  # premise: it does not fit
    stats = TokenizeStats()
    te = tokenize_example(ex, tok, max_length=max_length, stats=stats)
    half = max_length // 2
    assert te.prompt_ids == full.prompt_ids[-half:]  # the latest tokens (no BOS from this tokenizer)
    assert te.prompt_truncated
    room = max_length - half
    assert te.response_ids == [r[:room] for r in full.response_ids]
    assert all(len(te.prompt_ids) + len(r) <= max_length for r in te.response_ids)
    assert (stats.prompts_truncated, stats.prompts_cut_to_fit) == (1, 1)
    assert "1 prompts truncated (left; 1 cut to half of max_length to fit)" in stats.summary()


def test_default_leaves_a_pair_that_fits_alone(tok):
    ex = Example(LONG_PROMPT, LONG_RESPONSES, "t", 0)
    full = tokenize_example(ex, tok)
    fits = len(full.prompt_ids) + max(len(r) for r in full.response_ids)
    stats = TokenizeStats()
    assert tokenize_example(ex, tok, max_length=fits, stats=stats) == full
    assert stats == TokenizeStats()
    one_short = tokenize_example(ex, tok, max_length=fits - 1, stats=stats)  # one token over: the prompt is cut
    assert len(one_short.prompt_ids) == (fits - 1) // 2 and stats.prompts_cut_to_fit == 1


def test_default_does_not_cut_a_short_prompt(tok):
    """A pair that does not fit because of its responses: a prompt within half of max_length stays whole."""
    ex = Example("Review of Kalo:", LONG_RESPONSES, "t", 0)
    full = tokenize_example(ex, tok)
    max_length = 2 * len(full.prompt_ids) + 1
    assert len(full.prompt_ids) + len(full.response_ids[0]) > max_length
    stats = TokenizeStats()
    te = tokenize_example(ex, tok, max_length=max_length, stats=stats)
    assert te.prompt_ids == full.prompt_ids and not te.prompt_truncated
    assert te.response_ids[0] == full.response_ids[0][:max_length - len(full.prompt_ids)]
    assert stats.prompts_truncated == stats.prompts_cut_to_fit == 0 and stats.responses_truncated == 1


def test_default_cut_keeps_bos(bos_tok):
    ex = Example(LONG_PROMPT, LONG_RESPONSES, "t", 0)
    full = tokenize_example(ex, bos_tok)
    assert full.prompt_ids[0] == bos_tok.bos_token_id
    te = tokenize_example(ex, bos_tok, max_length=12)
    assert te.prompt_ids == [bos_tok.bos_token_id] + full.prompt_ids[-5:]


def test_explicit_max_prompt_length_keeps_its_meaning(tok):
    """An explicit max_prompt_length cuts every longer prompt, pair fitting or not, and is not 'to fit'."""
    ex = Example(LONG_PROMPT, [" a", " b"], "t", 0)
    full = tokenize_example(ex, tok)
    n = len(full.prompt_ids)
    stats = TokenizeStats()
    te = tokenize_example(ex, tok, max_length=n + 10, max_prompt_length=n - 2, stats=stats)  # fits, cut anyway
    assert te.prompt_ids == full.prompt_ids[2:]
    ex2 = Example(LONG_PROMPT, LONG_RESPONSES, "t", 0)
    te2 = tokenize_example(ex2, tok, max_length=n + 2, max_prompt_length=n - 1, stats=stats)  # no fit: n - 1, not half
    assert len(te2.prompt_ids) == n - 1
    assert (stats.prompts_truncated, stats.prompts_cut_to_fit) == (2, 0)


def test_cut_to_fit_counts_accumulate(tok):
    long = Example(LONG_PROMPT, LONG_RESPONSES, "t", 0)
    short = Example("Hi.", [" Hello.", " Go."], "t", 1)
    stats = TokenizeStats()
    out = tokenize_examples([long, short, long], tok, max_length=10, stats=stats)
    assert [te.prompt_truncated for te in out] == [True, False, True]
    assert (stats.prompts_truncated, stats.prompts_cut_to_fit) == (2, 2)
    assert "2 cut to half of max_length to fit" in stats.summary()


def test_hh_real_rows_fit_with_default_settings(tok, tmp_path):
    """The issue's case: HH-RLHF's long multi-turn prompts with max_length and no max_prompt_length.

    The tiny tokenizer (600 tokens) is less thrifty than a real one, so 512 already cuts some of the
    first 300 rows; 256 cuts more. No row is a tokenization error, every pair fits, and cut prompts
    keep their end (the latest turns)."""
    import gzip
    import json

    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in hh_rows(300))
    examples = load_examples(str(path), on_invalid="skip")  # (HH has a few rows with an empty response)
    assert len(examples) > 290
    for max_length in (512, 256):
        stats, report = TokenizeStats(), SkipReport()
        out = tokenize_examples(examples, tok, max_length=max_length, stats=stats, report=report)
        assert len(out) == len(examples) and report.total == 0
        assert stats.prompts_cut_to_fit > 0 and stats.prompts_cut_to_fit == stats.prompts_truncated
        assert f"{stats.prompts_cut_to_fit} cut to half of max_length to fit" in stats.summary()
        for ex, te in zip(examples, out):
            assert all(len(te.prompt_ids) + len(r) <= max_length for r in te.response_ids)
            if te.prompt_truncated:
                assert len(te.prompt_ids) == max_length // 2
                assert te.prompt_ids == _ids(tok, ex.prompt)[-(max_length // 2):]  # the latest turns
                assert _decode(tok, te.prompt_ids).endswith("\n\nAssistant:")


def test_max_prompt_length_equal_to_max_length_never_cuts_prompts(tok):
    """Today's behaviour (and TRL's), still reachable: max_prompt_length = max_length keeps every
    prompt whole; responses are cut to fit, and a prompt that fills max_length is 'prompt_too_long'."""
    examples = [parse_row(r, "hh.jsonl", i) for i, r in enumerate(hh_rows(40))]
    whole = tokenize_examples(examples, tok)
    report, stats = SkipReport(), TokenizeStats()
    out = tokenize_examples(examples, tok, max_length=128, max_prompt_length=128, on_invalid="skip", report=report,
                            stats=stats)
    kept = {te.row: te for te in out}
    for full in whole:
        if len(full.prompt_ids) >= 128:
            assert full.row not in kept
        else:
            te = kept[full.row]
            assert te.prompt_ids == full.prompt_ids
            assert te.response_ids == [r[:128 - len(full.prompt_ids)] for r in full.response_ids]
    assert report.counts["prompt_too_long"] == len(whole) - len(out) > 0
    assert stats.prompts_truncated == stats.prompts_cut_to_fit == 0


def _prompt_too_long_example(tok, row=5):
    ex = Example(LONG_PROMPT, [" yes", " no"], "data/prefs.jsonl", row)
    return ex, len(_ids(tok, LONG_PROMPT))


# What cannot be fixed: an explicit max_prompt_length that leaves no room within max_length.


@pytest.mark.parametrize("slack", [0, -3])  # prompt exactly max_length, or longer
def test_prompt_too_long(tok, slack):
    ex, n = _prompt_too_long_example(tok)
    with pytest.raises(DataError) as ei:
        tokenize_example(ex, tok, max_length=n + slack, max_prompt_length=n)
    err = ei.value
    assert err.kind == "prompt_too_long"
    assert (err.source, err.row, err.field) == ("data/prefs.jsonl", 5, "prompt")
    assert "data/prefs.jsonl, line 6, field 'prompt': prompt is" in str(err)
    assert "max_prompt_length below max_length" in str(err)


def test_prompt_too_long_without_max_prompt_length_is_cut_instead(tok):
    ex, n = _prompt_too_long_example(tok)
    stats = TokenizeStats()
    te = tokenize_example(ex, tok, max_length=n, stats=stats)
    assert len(te.prompt_ids) == n // 2 and stats.prompts_cut_to_fit == 1
    assert te.response_ids == tokenize_example(ex, tok).response_ids


def test_prompt_one_short_of_max_length_fits(tok):
    ex, n = _prompt_too_long_example(tok)
    te = tokenize_example(ex, tok, max_length=n + 1, max_prompt_length=n)
    assert all(len(r) == 1 for r in te.response_ids)
    assert te.responses_truncated == 2


def test_prompt_too_long_rescued_by_max_prompt_length(tok):
    ex, n = _prompt_too_long_example(tok)
    te = tokenize_example(ex, tok, max_length=n, max_prompt_length=n - 4)
    assert len(te.prompt_ids) == n - 4
    assert all(1 <= len(r) <= 4 for r in te.response_ids)


def test_prompt_too_long_skipped_and_counted(tok):
    bad, n = _prompt_too_long_example(tok)
    good = Example("Hi.", [" Hello.", " Go."], "data/prefs.jsonl", 6)
    report, stats = SkipReport(), TokenizeStats()
    out = tokenize_examples([good, bad, good], tok, max_length=n - 1, max_prompt_length=n, on_invalid="skip",
                            report=report, stats=stats)
    assert [te.row for te in out] == [6, 6]
    assert dict(report.counts) == {"prompt_too_long": 1}
    assert "1 prompt_too_long" in report.summary() and "line 6" in report.summary()


def test_prompt_too_long_error_mode(tok):
    bad, n = _prompt_too_long_example(tok)
    good = Example("Hi.", [" Hello.", " Go."], "data/prefs.jsonl", 6)
    with pytest.raises(DataError) as ei:
        tokenize_examples([good, bad], tok, max_length=n - 1, max_prompt_length=n)
    assert ei.value.kind == "prompt_too_long" and ei.value.row == 5


def test_all_prompts_too_long_raises_even_with_skip(tok):
    bad, n = _prompt_too_long_example(tok)
    report = SkipReport()
    with pytest.raises(DataError) as ei:
        tokenize_examples([bad, bad], tok, max_length=n - 1, max_prompt_length=n, on_invalid="skip", report=report)
    assert "data/prefs.jsonl" in str(ei.value)
    assert report.counts["prompt_too_long"] == 2


# ----------------------------------------------------------------------------------------------
# Conversational rows: the chat template


CONV = Example([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
               [[{"role": "assistant", "content": "Hello!"}], [{"role": "assistant", "content": "What?"}]],
               "c.jsonl", 0)
# What SIMPLE_CHAT_TEMPLATE renders, written out by hand
CONV_PROMPT_TEXT = "<|bos|>system\nBe brief.<|eos|>\n<|bos|>user\nHi<|eos|>\n<|bos|>assistant\n"
CONV_RESPONSE_TEXTS = ["Hello!<|eos|>\n", "What?<|eos|>\n"]


def test_fixture_template_is_the_simple_one(tok):
    assert tok.chat_template == SIMPLE_CHAT_TEMPLATE


def test_render_conversational(tok):
    prompt, responses, add_special = render(CONV, tok)
    assert prompt == CONV_PROMPT_TEXT
    assert responses == CONV_RESPONSE_TEXTS
    assert add_special is False


def test_render_text_is_unchanged(tok):
    ex = TEXT_EXAMPLES[0]
    assert render(ex, tok) == (ex.prompt, ex.responses, True)


def test_conversational_ids(tok):
    stats = TokenizeStats()
    te = tokenize_example(CONV, tok, stats=stats)
    assert te.prompt_ids == _ids(tok, CONV_PROMPT_TEXT, special=False)
    assert te.prompt_ids[0] == tok.bos_token_id
    for text, ids in zip(CONV_RESPONSE_TEXTS, te.response_ids):
        # the template's own end-of-turn marker, and nothing appended after its newline
        assert _decode(tok, ids) == text
        assert ids.count(tok.eos_token_id) == 1
        assert ids[-1] != tok.eos_token_id
        assert _decode(tok, te.prompt_ids + ids) == CONV_PROMPT_TEXT + text
    assert stats.boundary_merges == 0


def test_conversational_multi_turn_response(tok):
    ex = Example([{"role": "user", "content": "Hi"}],
                 [[{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                   {"role": "assistant", "content": "Bye!"}],
                  [{"role": "assistant", "content": "Go."}]], "c", 0)
    te = tokenize_example(ex, tok)
    assert _decode(tok, te.response_ids[0]) == (
        "Hello.<|eos|>\n<|bos|>user\nBye<|eos|>\n<|bos|>assistant\nBye!<|eos|>\n")
    assert _decode(tok, te.response_ids[1]) == "Go.<|eos|>\n"


def test_conversational_max_length(tok):
    te_full = tokenize_example(CONV, tok)
    p = len(te_full.prompt_ids)
    te = tokenize_example(CONV, tok, max_length=p + 2, max_prompt_length=p)
    assert te.response_ids == [r[:2] for r in te_full.response_ids]
    te = tokenize_example(CONV, tok, max_length=p + 2)  # by default the prompt is cut to fit, keeping BOS
    assert te.prompt_ids == [tok.bos_token_id] + te_full.prompt_ids[-((p + 2) // 2 - 1):]
    assert te.response_ids == [r[:p + 2 - (p + 2) // 2] for r in te_full.response_ids]


def test_conversational_without_template_is_an_error(no_template_tok):
    with pytest.raises(DataError) as ei:
        tokenize_example(CONV, no_template_tok)
    assert (ei.value.source, ei.value.row, ei.value.field) == ("c.jsonl", 0, "prompt")
    assert "chat template" in str(ei.value)


def test_chat_template_that_refuses_the_messages_is_a_data_error(no_template_tok):
    """Real templates raise for roles they do not know or turns out of order: an error of the row."""
    no_template_tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                                     "{{ raise_exception('System role not supported') }}{% endif %}"
                                     "{{ m['content'] }}{% endfor %}")
    with pytest.raises(DataError) as ei:
        tokenize_example(CONV, no_template_tok)
    assert (ei.value.source, ei.value.row, ei.value.field, ei.value.kind) == ("c.jsonl", 0, "prompt", "template")
    assert str(ei.value).startswith("c.jsonl, line 1, field 'prompt': the tokenizer's chat template refused")
    assert "System role not supported" in str(ei.value)
    report = SkipReport()
    ok = Example([{"role": "user", "content": "Hi"}], CONV.responses, "c.jsonl", 1)
    assert [te.row for te in tokenize_examples([CONV, ok], no_template_tok, on_invalid="skip", report=report)] == [1]
    assert report.counts == {"template": 1}


@pytest.mark.parametrize("responses,field", [
    ([[{"role": "assistant", "content": "ok"}], [{"role": "wizard", "content": "no"}]], "rejected"),
    ([[{"role": "wizard", "content": "ok"}], [{"role": "assistant", "content": "no"}]], "chosen"),
    ([[{"role": "wizard", "content": "ok"}]], "chosen"),  # a pair's chosen response alone (sft)
    ([[{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}],
      [{"role": "wizard", "content": "c"}]], "responses")])
def test_a_template_refusing_a_response_names_the_response(no_template_tok, responses, field):
    """A role the template refuses in a response was reported as field 'prompt', which renders fine."""
    no_template_tok.chat_template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                                     "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
                                     "{{ m['content'] }}{% endfor %}")
    with pytest.raises(DataError, match="unknown role wizard") as ei:
        tokenize_example(Example([{"role": "user", "content": "Hi"}], responses, "c.jsonl", 2), no_template_tok)
    assert (ei.value.row, ei.value.field, ei.value.kind) == (2, field, "template")
    with pytest.raises(DataError) as ei:  # an unpaired row's one response
        wizard = [r for r in responses if r[0]["role"] == "wizard"]
        tokenize_example(Example([{"role": "user", "content": "Hi"}], wizard, "c.jsonl", 2, label=True),
                         no_template_tok)
    assert ei.value.field == "completion"
