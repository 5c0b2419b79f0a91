"""Examples -> token ids: prompt ids, one id list per response, EOS appended, truncated.

Boundary rule. The prompt is tokenized exactly as it will be at inference (`tokenizer(prompt)`),
and a response's ids are what follows those ids in `tokenizer(prompt + response)`. When a BPE merge
crosses the boundary (e.g. a prompt ending in a space), the prompt ids are not a prefix of the joint
ids; we then keep the prompt ids intact and tokenize the response on its own, so that
`prompt_ids + response_ids` still decodes to `prompt + response` and the model is scored on the
context it sees when generating. (TRL instead drops the prompt's last tokens in that case.)

Truncation. `max_prompt_length` cuts the prompt from the left (keeping the latest turns, and a
leading BOS); responses are then cut from the right to fit `max_length`. Without a
`max_prompt_length`, a prompt is cut only when its example does not fit (prompt + longest response
> `max_length`), and then to `max_length // 2` tokens (counted in `TokenizeStats.prompts_cut_to_fit`);
examples that fit are untouched. A prompt that still leaves no room for a single response token
(an explicit `max_prompt_length` ≥ `max_length`) is a `DataError` of kind 'prompt_too_long'.

Bounded inputs. With a `max_length`, a text far longer than any budget is cut *before* it is
tokenized (a 50 MB row would otherwise take gigabytes as token ids and offsets): a prompt keeps its
end (and a leading BOS text), a response its start, at most `char_bound` characters: twice
(budget + `CUT_MARGIN`) tokens of the vocabulary's longest entry. The cut lands on a word boundary
(before a space that follows a non-space) where one is near, which the usual pre-tokenizers
(GPT-2 and Llama-3 style regexes, SentencePiece's ▁-words) never merge across, and the cut text
must still give `CUT_MARGIN` tokens beyond the budget (else the bound doubles, up to the whole
text), so the tokens the truncation above keeps are those of the whole text, and so are its counts
and decisions (tested against tokenize-then-cut, extreme texts included). Counted in
`TokenizeStats.texts_cut`. Without a `max_length` nothing is cut.

Prompts alone (for sampling: `directpo.data.prompts.encode_prompt`) go through the same three
steps as a training example's prompt: `render_prompt` (text, or the chat template with the
generation prompt), `prompt_ids` (an empty prompt starts from BOS, or EOS) and `truncate_prompt`.
"""
from __future__ import annotations

import random
import re
import weakref
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..errors import UserValueError
from .errors import location
from .formats import DataError, Example, SkipReport, Text

if TYPE_CHECKING:  # annotations only: text tokenization imports no torch
    import torch


@dataclass
class TokenizedExample:
    prompt_ids: list[int]
    response_ids: list[list[int]]  # best first
    source: str = ""
    row: int = 0
    prompt_truncated: bool = False
    responses_truncated: int = 0
    label: bool | None = None  # unpaired (KTO) rows: whether response 0 is desirable
    # Vision-language rows (`directpo.data.vision_tokenize`); None for text. `vision`: this example's
    # image tensors as its processor returns them (pixel_values, image_grid_thw, ...); `prompt_positions`:
    # (3, P) M-RoPE positions of the prompt (Qwen2-VL-type models); `prompt_token_types`: (P,) the
    # processor's mm_token_type_ids (0 text, 1 image), which such models need to place their positions.
    vision: dict[str, torch.Tensor] | None = None
    prompt_positions: torch.Tensor | None = None
    prompt_token_types: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens of the padded layout: the prompt once per response."""
        return sum(len(self.prompt_ids) + len(r) for r in self.response_ids)

    def only(self, k: int) -> "TokenizedExample":
        """This example with response k alone (KTO: its own completion, or the mismatched one)."""
        return replace(self, response_ids=self.response_ids[k:k + 1])


@dataclass
class TokenizeStats:
    prompts_truncated: int = 0  # every prompt cut from the left, for whatever reason
    prompts_cut_to_fit: int = 0  # of those, cut to max_length // 2 because the example did not fit
    responses_truncated: int = 0
    boundary_merges: int = 0
    texts_cut: int = 0  # texts longer than `cut_over` characters, cut before tokenizing (bounded inputs)
    cut_over: int = 0

    def summary(self) -> str:
        out = (f"{self.prompts_truncated} prompts truncated (left; {self.prompts_cut_to_fit} cut to half of "
               f"max_length to fit), {self.responses_truncated} responses truncated (right), "
               f"{self.boundary_merges} prompt/response boundary merges re-split")
        if self.texts_cut:
            out += f"; {self.texts_cut} texts longer than {self.cut_over} characters were cut before tokenizing"
        return out


def render_prompt(prompt: Text, tokenizer, source: str = "prompt", row: int | None = None) -> tuple[str, bool]:
    """The text a prompt is tokenized from, and whether the tokenizer should add special tokens.

    Text is used as is (special tokens added, as `tokenizer(prompt)` does at inference); a list of
    messages goes through the tokenizer's chat template with the generation prompt, and the
    template then owns BOS and end-of-turn markers (no special tokens added)."""
    if not isinstance(prompt, list):
        return prompt, True
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(source, row, "prompt", "conversational row, but the tokenizer has no chat template: use a "
                        "model whose tokenizer has one (tokenizer_config.json's chat_template), or give text rows",
                        kind="invalid")
    return _apply_template(tokenizer, prompt, source, row, add_generation_prompt=True), False


def _apply_template(tokenizer, messages: list, source: str, row: int | None, field: str = "prompt", **kwargs) -> str:
    """The chat template's text; a template that refuses the messages (templates raise for roles
    they do not know, or turns out of order) is a DataError of the row's `field`."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateError as e:
        raise DataError(source, row, field, f"the tokenizer's chat template refused the messages: {e}",
                        kind="template") from None


def response_field(example: Example, k: int) -> str:
    """The field response `k` of `example` most likely came from, for messages: an unpaired row's
    'completion'; a pair's (or sft's lone best response) 'chosen'/'rejected'; else 'responses'.
    (A pair expanded from a ranking is named as a pair: its rows hold no field names.)"""
    if len(example.responses) == 1:
        return "completion" if example.label is not None else "chosen"
    return ("chosen", "rejected")[k] if len(example.responses) == 2 else "responses"


def prompt_ids(text: str, tokenizer, add_special_tokens: bool = True, source: str = "prompt",
               row: int | None = None) -> tuple[list[int], bool]:
    """(ids of a rendered prompt, whether a start token was injected).

    An empty prompt becomes [BOS] (or [EOS] when there is no BOS): the first response token needs
    a position to be predicted from."""
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    if ids:
        return ids, False
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise DataError(source, row, "prompt", "empty prompt and the tokenizer has neither BOS nor EOS to start from")
    return [start], True


def truncate_prompt(ids: list[int], tokenizer, max_prompt_length: int | None) -> list[int]:
    """Prompt ids cut from the left to at most `max_prompt_length`, keeping a leading BOS."""
    if max_prompt_length is None:
        return ids
    if max_prompt_length < 1:
        raise UserValueError(f"max_prompt_length must be ≥ 1 (the first response token is predicted from the "
                             f"prompt's last one), got {max_prompt_length}")
    if len(ids) <= max_prompt_length:
        return ids
    keep = 1 if (tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id) else 0
    return ids[:keep] + ids[len(ids) - (max_prompt_length - keep):]


def render(example: Example, tokenizer) -> tuple[str, list[str], bool]:
    """Text of the prompt and of each response, and whether the tokenizer should add special tokens.

    Conversational examples go through the tokenizer's chat template; the template then owns BOS
    and end-of-turn markers, so no special tokens are added and no EOS is appended.
    """
    prompt_text, add_special = render_prompt(example.prompt, tokenizer, example.source, example.row)
    if not example.conversational:
        return prompt_text, list(example.responses), add_special
    # the prompt rendered alone: a refusal now is one of the response (a role the template does not know)
    fulls = [_apply_template(tokenizer, example.prompt + r, example.source, example.row, response_field(example, k))
             for k, r in enumerate(example.responses)]
    # Some templates render the prompt differently alone than followed by a reply; the prompt is
    # then the longest text all renderings share.
    n = len(prompt_text)
    for full in fulls:
        n = min(n, _common_prefix(prompt_text, full))
    return prompt_text[:n], [full[n:] for full in fulls], False


def _common_prefix(a, b, step: int = 4096) -> int:
    n, end = 0, min(len(a), len(b))
    while n + step <= end and a[n:n + step] == b[n:n + step]:  # a long text: whole chunks compared in C
        n += step
    for x, y in zip(a[n:n + step], b[n:n + step]):
        if x != y:
            break
        n += 1
    return n


# ----------------------------------------------------------------------------------------------
# Bounded inputs: a text far longer than the token budget is cut before it is tokenized

CUT_MARGIN = 32  # tokens a cut text must give beyond the budget: the tokens near the cut are never kept
WORD_WINDOW = 4096  # characters searched, inward from the bound, for a word boundary to cut at
MAX_TOKEN_CHARS = 256  # a cap on the longest vocabulary entry counted (a longer one only makes the bound double)
_WORD_END = re.compile(r"\S(?= )")
_TOKEN_CHARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def chars_per_token(tokenizer) -> int:
    """The most characters one token stands for: the longest entry of the vocabulary, added tokens
    included (a byte-level entry counts bytes, never fewer than the characters it decodes to), at
    most `MAX_TOKEN_CHARS`; 64 for a tokenizer without `get_vocab`. Cached per tokenizer."""
    try:
        return _TOKEN_CHARS[tokenizer]
    except (KeyError, TypeError):
        pass
    try:
        n = max(map(len, tokenizer.get_vocab()), default=1)
    except (AttributeError, NotImplementedError, TypeError):
        n = 64
    n = min(max(n, 1), MAX_TOKEN_CHARS)
    try:
        _TOKEN_CHARS[tokenizer] = n
    except TypeError:  # not weakly referable: computed again next time
        pass
    return n


def char_bound(tokenizer, budget: int) -> int:
    """The characters a text keeps for a budget of `budget` tokens (before the word-boundary search)."""
    return 2 * (budget + CUT_MARGIN) * chars_per_token(tokenizer)


def cut_text(text: str, limit: int, keep: str, head: str = "") -> str:
    """`text` itself when it has at most `limit` characters; else its start (keep='start') or its end
    (keep='end') of at most `limit` characters, cut at the word boundary (a space after a non-space)
    nearest the bound within `WORD_WINDOW` characters, else at the bound. Pre-tokenizers (GPT-2-style
    regexes, SentencePiece's ▁-words) never join a token across such a boundary, so the kept side
    tokenizes as it does in the whole text. `head` (keep='end'): a start the text keeps when it has
    it (a prompt's BOS text, which the prompt's truncation keeps too)."""
    if len(text) <= limit:
        return text
    if keep == "start":
        ends = [m.end() for m in _WORD_END.finditer(text, max(limit - WORD_WINDOW, 0), limit + 1)]
        return text[:ends[-1] if ends else limit]
    start = len(text) - limit
    m = _WORD_END.search(text, start - 1, start + WORD_WINDOW)
    j = m.end() if m else start
    return head + text[j:] if head and text.startswith(head) and j > len(head) else text[j:]


def bounded(text: str, keep: str, budget: int | None, tokenizer, encode, head: str = "") -> tuple[str, tuple, bool]:
    """(the text tokenized, `encode(it)`, whether it was cut): `text`, or with a token `budget` its
    `cut_text` to `char_bound` characters. `encode` returns a tuple whose first item is the ids; a cut
    text whose ids are fewer than budget + `CUT_MARGIN` (a tokenizer that drops or joins many
    characters) is cut again at twice the bound, up to the whole text. No budget: no cut."""
    limit = char_bound(tokenizer, budget) if budget is not None and budget > 0 else len(text)
    while True:
        cut = cut_text(text, limit, keep, head)
        out = encode(cut)
        if cut is text or len(out[0]) >= budget + CUT_MARGIN:
            return cut, out, cut is not text
        limit *= 2


def bos_text(tokenizer) -> str:
    """The BOS token's text ('' when none): a prompt cut from the left keeps it at its start."""
    bos = getattr(tokenizer, "bos_token", None)
    return bos if isinstance(bos, str) else ""


def _response_ids(tokenizer, prompt_text: str, text: str, p_ids: list[int], injected_start: bool,
                  add_special: bool) -> tuple[list[int], bool]:
    """(ids of a response after its prompt, whether a boundary merge made it tokenized alone)."""
    if injected_start:  # nothing to merge with: the response is all there is
        return tokenizer(text, add_special_tokens=False)["input_ids"], False
    full = tokenizer(prompt_text + text, add_special_tokens=add_special)["input_ids"]
    if full[:len(p_ids)] == p_ids:
        return full[len(p_ids):], False
    return tokenizer(text, add_special_tokens=False)["input_ids"], True


def tokenize_example(example: Example, tokenizer, max_length: int | None = None,
                     max_prompt_length: int | None = None, stats: TokenizeStats | None = None,
                     fixed_length: bool = False) -> TokenizedExample:
    """`fixed_length` (`--fixed-length`): the responses are completions that never end, so no EOS is
    appended, and a response that is empty or holds EOS (or a conversational row, whose chat template
    ends each turn) is refused."""
    stats = stats if stats is not None else TokenizeStats()
    if fixed_length and example.conversational:
        raise DataError(example.source, example.row, "prompt", "a conversational row: --fixed-length reads plain "
                        "prompt/response text (a chat template ends every turn)", kind="fixed_length")
    prompt_text, responses, add_special = render(example, tokenizer)
    budget = None if max_length is None else max(max_length, max_prompt_length or 0)
    prompt_text, (p_ids, injected_start), n_cut = bounded(
        prompt_text, "end", budget, tokenizer,
        lambda t: prompt_ids(t, tokenizer, add_special, example.source, example.row), bos_text(tokenizer))
    eos = tokenizer.eos_token_id
    response_ids = []
    for text in responses:
        _, (ids, merged), cut = bounded(text, "start", budget, tokenizer,
                                        lambda t: _response_ids(tokenizer, prompt_text, t, p_ids, injected_start,
                                                                add_special))
        n_cut += cut
        stats.boundary_merges += merged
        if fixed_length:
            _check_never_ends(example, len(response_ids), ids, eos)
        elif not example.conversational and eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        response_ids.append(ids)
    if n_cut:
        stats.texts_cut += n_cut
        stats.cut_over = char_bound(tokenizer, budget)

    # Truncated only now: the boundary check above needs the whole prompt's ids.
    limit, to_fit = max_prompt_length, False
    if (limit is None and max_length is not None and max_length >= 2
            and len(p_ids) + max(map(len, response_ids), default=0) > max_length):
        limit, to_fit = max_length // 2, True  # does not fit: keep the latest half, responses get the rest
    cut = truncate_prompt(p_ids, tokenizer, limit)
    prompt_truncated = len(cut) < len(p_ids)
    p_ids = cut
    n_trunc = 0
    if max_length is not None:
        room = max_length - len(p_ids)
        if room < 1:
            raise DataError(example.source, example.row, "prompt",
                            f"prompt is {len(p_ids)} tokens, leaving no room for a response within "
                            f"max_length={max_length}; set max_prompt_length below max_length (or leave it unset), "
                            "or on_invalid='skip' to leave such rows out", kind="prompt_too_long")
        for k, ids in enumerate(response_ids):
            if len(ids) > room:
                response_ids[k] = ids[:room]
                n_trunc += 1
        stats.responses_truncated += n_trunc
    if prompt_truncated:  # counted for the examples kept, not for those refused above
        stats.prompts_truncated += 1
        stats.prompts_cut_to_fit += to_fit
    return TokenizedExample(p_ids, response_ids, example.source, example.row, prompt_truncated, n_trunc,
                            example.label)


def _check_never_ends(example: Example, k: int, ids: list[int], eos: int | None) -> None:
    """A fixed-length completion has tokens and no EOS: else a DataError naming its field."""
    field = (["chosen", "rejected"][k] if len(example.responses) == 2 else "completion" if len(example.responses) == 1
             else f"responses[{k}]")
    if not ids:
        raise DataError(example.source, example.row, field, "empty: a fixed-length completion (--fixed-length) runs to "
                        "the sampler's --max-new-tokens, never ending early", kind="fixed_length")
    if eos is not None and eos in ids:
        raise DataError(example.source, example.row, field, f"holds the EOS token (id {eos}) at token {ids.index(eos)}:"
                        " a fixed-length completion (--fixed-length) never ends, and its log-probs are the model's "
                        "without EOS", kind="fixed_length")


# The commands that read rows with images (a vision-language model's processor); the others refuse them.
IMAGE_COMMANDS = "train, sft, pipeline, score, inspect, sample, bon and eval"


def tokenize_examples(examples: list[Example], tokenizer, max_length: int | None = None,
                      max_prompt_length: int | None = None, on_invalid: str = "error",
                      report: SkipReport | None = None, stats: TokenizeStats | None = None,
                      fixed_length: bool = False) -> list[TokenizedExample]:
    report = report if report is not None else SkipReport()
    with_images = [ex for ex in examples if getattr(ex, "images", None)]
    if with_images:  # text alone would drop the image placeholders: refused, never computed blind
        n = len(with_images)
        first = with_images[0]
        raise UserValueError(f"images in {first.source} ({n} row{'s' * (n != 1)}, the first at "
                             f"{location(first.source, first.row)}): this command does not read images yet "
                             f"(issue #30); {IMAGE_COMMANDS} do, with a vision-language model; remove the "
                             "'images'/'image' field to use the text alone")
    return tokenize_each(examples, lambda ex: tokenize_example(ex, tokenizer, max_length, max_prompt_length, stats,
                                                               fixed_length), on_invalid, report)


def tokenize_each(examples: list[Example], tokenize, on_invalid: str, report: SkipReport) -> list[TokenizedExample]:
    """`tokenize(example)` for each example; a row's `DataError` stops (or with on_invalid='skip' is
    counted in `report` and the row left out); no row left at all is an error saying why."""
    out = []
    for ex in examples:
        try:
            out.append(tokenize(ex))
        except DataError as e:
            if on_invalid != "skip":
                raise
            report.add(e)
    if not out:
        raise DataError(examples[0].source if examples else "data", None, None,
                        f"no usable rows after tokenization: {report.summary()}")
    return out


def pair_mismatched(examples: list[TokenizedExample], seed: int = 0,
                    max_length: int | None = None) -> list[TokenizedExample]:
    """Unpaired (KTO) examples, each given a second response: the completion of another example,
    as [own completion, mismatched completion].

    KTO's reference point z0 (Ethayarajh et al. 2024) is estimated from log πθ(y'|x) −
    log πref(y'|x) over *mismatched* pairs, a prompt x with the completion y' of another example.
    Fixing y' here, at data preparation, makes it part of the tokenized example: its reference
    log-prob is then precomputed and cached with the rest (a two-column table: own, mismatched), as
    it could not be if y' changed from batch to batch. (TRL too builds its KL completions at data
    time, by shifting completions within a batch.) Which completion: the examples are visited in a
    seeded permutation, and each takes the completion of the next one in it (cyclically) whose
    prompt differs from its own; only when every prompt is the same does it take the next one's
    anyway (and with a single example, its own). So the choice depends on the seed and the data
    alone. The mismatched completion is cut to fit `max_length` after this example's prompt.
    """
    if any(len(ex.response_ids) != 1 for ex in examples):
        raise ValueError("pair_mismatched takes unpaired examples (one completion each)")
    n = len(examples)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    prompts = [tuple(examples[i].prompt_ids) for i in order]
    # Position p's partner is the first later position (over two laps of the cycle) whose prompt
    # differs from p's. A run of equal prompts shares it, so one backward sweep finds them all.
    after: list[int | None] = [None] * (2 * n)
    for p in range(2 * n - 2, -1, -1):
        after[p] = p + 1 if prompts[(p + 1) % n] != prompts[p % n] else after[p + 1]
    out: list[TokenizedExample] = [None] * n  # type: ignore[list-item]
    for p, i in enumerate(order):
        q = after[p] if after[p] is not None and after[p] - p < n else p + 1 if n > 1 else p
        ex, other = examples[i], examples[order[q % n]].response_ids[0]
        if max_length is not None:
            other = other[:max(max_length - len(ex.prompt_ids), 0)]
        out[i] = replace(ex, response_ids=[ex.response_ids[0], list(other)])
    return out
