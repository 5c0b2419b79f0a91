"""Bounded inputs (issue #27, item 6): texts far longer than the token budget are cut before they are
tokenized, and the ids kept are exactly those of tokenize-then-cut."""
from __future__ import annotations

import random

import pytest

try:  # tests/ may or may not be a package
    from tests.conftest import HH_FILE, hh_rows
except ImportError:  # pragma: no cover
    from conftest import HH_FILE, hh_rows
from directpo.data import tokenize as T
from directpo.data.formats import DataError, Example, parse_row
from directpo.data.prompts import encode_prompt
from directpo.toy import review_task


def _whole():
    """A context in which nothing is cut before tokenizing: the reference (tokenize, then cut)."""
    class Whole:
        def __enter__(self):
            self.real = T.char_bound
            T.char_bound = lambda tokenizer, budget: 10 ** 12
        def __exit__(self, *exc):
            T.char_bound = self.real
    return Whole()


def _tokenize(ex, tok, max_length, max_prompt_length=None):
    stats = T.TokenizeStats()
    try:
        return T.tokenize_example(ex, tok, max_length, max_prompt_length, stats), stats
    except DataError as e:
        return str(e), stats


def _same_as_whole(examples, tok, max_length, max_prompt_length=None) -> int:
    """Assert every example tokenizes as it does uncut, with the same truncation counts; return how
    many texts were cut before tokenizing."""
    cut = 0
    for ex in examples:
        got, stats = _tokenize(ex, tok, max_length, max_prompt_length)
        with _whole():
            want, ref = _tokenize(ex, tok, max_length, max_prompt_length)
        assert got == want, (ex.source, ex.row, max_length, max_prompt_length)
        assert (stats.prompts_truncated, stats.prompts_cut_to_fit, stats.responses_truncated, stats.boundary_merges) \
            == (ref.prompts_truncated, ref.prompts_cut_to_fit, ref.responses_truncated, ref.boundary_merges)
        assert ref.texts_cut == 0
        cut += stats.texts_cut
    return cut


def _corpus() -> str:
    train, _ = review_task(n_train=64, n_eval=1)
    text = " ".join(r["prompt"] + r["chosen"] + " " + r["rejected"] for r in train)
    if HH_FILE.exists():
        text += "".join(r["chosen"] for r in hh_rows(200))
    return text


def _long_examples(n: int = 8, seed: int = 0) -> list[Example]:
    """Long prompts, long responses (text and chat messages): slices of real text, 3k to 60k characters."""
    text, rng, out = _corpus(), random.Random(seed), []
    while len(text) < 200_000:
        text += text
    for k in range(n):
        a = rng.randrange(len(text) - 60_000)
        big, other = text[a:a + rng.choice([3_000, 20_000, 60_000])], text[a // 2:a // 2 + rng.choice([40, 9_000])]
        out += [Example(big, [other, " No."], "long", k), Example(" Review:", [big, other], "long", k),
                Example([{"role": "user", "content": big}], [[{"role": "assistant", "content": other}],
                                                           [{"role": "assistant", "content": "no"}]], "chat", k)]
    return out


@pytest.fixture(scope="module")
def long_examples():
    return _long_examples()


@pytest.mark.parametrize("max_length, max_prompt_length", [(16, None), (64, None), (64, 20), (512, None)])
def test_long_texts_cut_before_tokenizing_keep_the_same_ids(tiny_tokenizer, long_examples, max_length,
                                                            max_prompt_length):
    cut = _same_as_whole(long_examples, tiny_tokenizer, max_length, max_prompt_length)
    assert cut > 0  # premise: the bound was reached


def test_normal_rows_keep_the_same_ids(tiny_tokenizer):
    """Rows of ordinary length (the demo task, real HH-RLHF pairs) are not cut at the default 512,
    and give the ids they gave before; at a small max_length the long ones are cut, and still do."""
    train, _ = review_task(n_train=64, n_eval=1)
    rows = [parse_row(r, "review", i) for i, r in enumerate(train)]
    if HH_FILE.exists():
        rows += [parse_row(r, "hh", i) for i, r in enumerate(hh_rows(300))]
    assert _same_as_whole(rows, tiny_tokenizer, 512) == 0
    assert _same_as_whole(rows, tiny_tokenizer, 8) > 0 or not HH_FILE.exists()


def test_bos_is_kept_when_the_prompt_is_cut(tiny_model, long_examples):
    from tokenizers.processors import TemplateProcessing

    from directpo.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", tok.bos_token_id)])
    assert _same_as_whole(long_examples, tok, 64) > 0
    # a chat template that writes BOS into the text: the cut keeps it at the start
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    chats = [ex for ex in long_examples if ex.conversational]
    assert _same_as_whole(chats, tok, 64) > 0
    te, _ = _tokenize(chats[0], tok, 64)
    assert te.prompt_ids[0] == tok.bos_token_id


def test_a_sentencepiece_style_tokenizer_keeps_the_same_ids(long_examples):
    """▁-words over the whole text (Llama-2's layout: no pre-tokenizer, a prepended ▁), BOS added."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from directpo.toy import SIMPLE_CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.train_from_iterator([_corpus()[:300_000]], trainer=trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tok.pre_tokenizer = None
    tok.decoder = decoders.Replace("▁", " ")
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = SIMPLE_CHAT_TEMPLATE
    assert _same_as_whole(long_examples, fast, 64) > 0
    assert _same_as_whole(long_examples, fast, 100, 40) > 0


def test_extreme_texts_keep_the_same_ids(tiny_tokenizer):
    """No word boundary to cut at (one long word, a run of spaces, dots, CJK): the cut falls at
    the bound and the margin still keeps the ids."""
    rng = random.Random(1)
    cjk = "".join(chr(rng.randrange(0x4E00, 0x4E00 + 300)) + ("，" if rng.random() < 0.05 else "")
                  for _ in range(30_000))
    texts = ["a" * 50_000, "ab\n" * 20_000, " " * 50_000, "." * 50_000, cjk, "a\tb\t" * 15_000]
    examples = [Example(t, [" yes", " no"], "x", k) for k, t in enumerate(texts)]
    examples += [Example("Q:", [t, " no"], "x", k) for k, t in enumerate(texts)]
    assert _same_as_whole(examples, tiny_tokenizer, 64) == len(examples)


class _Dropping:
    """The tiny tokenizer behind a normalizer that drops every '~' (as some tokenizers drop or fold
    characters): a text cut to the bound may then give fewer tokens than the budget."""

    def __init__(self, tok):
        self.tok, self.chat_template = tok, None
        self.bos_token, self.bos_token_id, self.eos_token_id = tok.bos_token, tok.bos_token_id, tok.eos_token_id

    def __call__(self, text, add_special_tokens=True):
        return self.tok(text.replace("~", ""), add_special_tokens=add_special_tokens)

    def get_vocab(self):
        return self.tok.get_vocab()


def test_a_tokenizer_that_drops_characters_gets_the_bound_doubled(tiny_tokenizer):
    tok = _Dropping(tiny_tokenizer)
    tail = " It was a warm and moving film, and I liked it." * 2000
    examples = [Example("Q:", ["~" * 40_000 + tail, " no"], "x", 0), Example("~" * 40_000 + tail, [" a", " b"], "x", 1),
                Example(tail + "~" * 40_000, [" a", " b"], "x", 2)]
    for ex in examples:
        got, stats = _tokenize(ex, tok, 64)
        with _whole():
            want, _ = _tokenize(ex, tok, 64)
        assert got == want
    _, stats = _tokenize(examples[0], tok, 64)
    assert stats.texts_cut == 1  # cut at a doubled bound: 40,000 '~' give no token


def test_the_count_is_logged_and_nothing_is_cut_without_max_length(tiny_tokenizer):
    ex = Example("Q:", ["word " * 100_000, " no"], "x", 0)
    stats = T.TokenizeStats()
    T.tokenize_examples([ex, ex], tiny_tokenizer, 512, stats=stats)
    bound = T.char_bound(tiny_tokenizer, 512)
    assert stats.texts_cut == 2 and stats.cut_over == bound
    assert f"2 texts longer than {bound} characters were cut before tokenizing" in stats.summary()
    stats = T.TokenizeStats()
    te = T.tokenize_example(ex, tiny_tokenizer, None, stats=stats)
    assert stats.texts_cut == 0 and len(te.response_ids[0]) > 100_000 // 2
    assert "cut before tokenizing" not in stats.summary()


def test_cut_text_cuts_at_a_word_boundary():
    text = "alpha beta gamma delta"
    assert T.cut_text(text, 100, "start") is text
    assert T.cut_text(text, 12, "start") == "alpha beta"  # before the space after "beta"
    assert T.cut_text(text, 12, "end") == " gamma delta"  # from the space after "beta"
    assert T.cut_text(text, 11, "end") == " delta"
    assert T.cut_text("<s>" + text, 12, "end", head="<s>") == "<s> gamma delta"
    assert T.cut_text("x" * 30, 10, "start") == "x" * 10 and T.cut_text("x" * 30, 10, "end") == "x" * 10


def test_encode_prompt_cuts_a_long_prompt_to_the_same_ids(tiny_tokenizer):
    prompt = _corpus()[:50_000]
    got = encode_prompt(prompt, tiny_tokenizer, 48)
    with _whole():
        want = encode_prompt(prompt, tiny_tokenizer, 48)
    assert got == want and len(got) == 48
    assert encode_prompt(prompt[:200], tiny_tokenizer, None) == tiny_tokenizer(prompt[:200])["input_ids"]
