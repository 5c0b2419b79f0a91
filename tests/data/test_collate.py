"""Tokenized examples -> the padded Batch layout and its label index vectors."""
from __future__ import annotations

import pytest
import torch

from directpo.data.collate import Batch, collate_padded
from directpo.data.formats import Example
from directpo.data.tokenize import TokenizedExample, tokenize_example

PAD = 0
EOS = 2


def _te(prompt, responses, row=0):
    return TokenizedExample(list(prompt), [list(r) for r in responses], "t", row)


# Three pairs of different prompt and response lengths; ids are unique per slot so a misplaced
# token shows up.
THREE = [
    _te([10, 11, 12], [[20, 21, EOS], [30, EOS]], row=7),
    _te([13], [[22, 23, 24, 25, EOS], [31, 32, EOS]], row=3),
    _te([14, 15, 16, 17, 18], [[26, EOS], [33, 34, 35, 36, 37, 38, EOS]], row=9),
]


def _expected_seqs(examples):
    """(example, rank, ids, prompt length) in the documented order: all rank-0 responses first, ..."""
    K = max(len(ex.response_ids) for ex in examples)
    return [(i, k, ex.prompt_ids + ex.response_ids[k], len(ex.prompt_ids))
            for k in range(K) for i, ex in enumerate(examples) if k < len(ex.response_ids)]


def _check_layout(batch: Batch, examples, pad_id):
    seqs = _expected_seqs(examples)
    R, T = batch.input_ids.shape
    assert R == len(seqs)
    assert T == max(len(ids) for _, _, ids, _ in seqs)
    assert batch.attention_mask.shape == (R, T)
    assert batch.position_ids is None
    for r, (i, k, ids, p) in enumerate(seqs):
        n = len(ids)
        assert batch.input_ids[r, :n].tolist() == ids
        assert batch.input_ids[r, n:].tolist() == [pad_id] * (T - n)
        assert batch.attention_mask[r].tolist() == [1] * n + [0] * (T - n)
        assert batch.seq_index[i, k].item() == r
    # every (example, rank) without a response is -1
    present = {(i, k) for i, k, _, _ in seqs}
    for i in range(len(examples)):
        for k in range(batch.seq_index.shape[1]):
            if (i, k) not in present:
                assert batch.seq_index[i, k].item() == -1
    assert batch.rows == [ex.row for ex in examples]
    assert batch.num_examples == len(examples)
    assert batch.num_seqs == R
    assert batch.num_tokens == sum(len(ids) for _, _, ids, _ in seqs)


def _check_labels(batch: Batch, examples):
    seqs = _expected_seqs(examples)
    R, T = batch.input_ids.shape
    pos, lab, seq = batch.label_pos, batch.label_ids, batch.label_seq
    assert pos.dtype == lab.dtype == seq.dtype == torch.long
    assert pos.shape == lab.shape == seq.shape
    assert len(pos) == sum(len(ids) - p for _, _, ids, p in seqs)
    assert pos.min().item() >= 0 and pos.max().item() + 1 < R * T
    # the label is the next token after the hidden state's position
    assert torch.equal(lab, batch.input_ids.flatten()[pos + 1])
    # label positions sit in the sequence's own row, on real tokens, and so do their labels
    assert torch.equal(pos // T, seq)
    mask = batch.attention_mask.flatten()
    assert mask[pos].all() and mask[pos + 1].all()
    # one label per response token, in order, starting at the last prompt token
    counts = torch.bincount(seq, minlength=R)
    for r, (i, k, ids, p) in enumerate(seqs):
        assert counts[r].item() == len(examples[i].response_ids[k])
        mine = seq == r
        assert lab[mine].tolist() == examples[i].response_ids[k]
        assert (pos[mine] - r * T).tolist() == list(range(p - 1, len(ids) - 1))


def test_three_pairs():
    batch = collate_padded(THREE, PAD)
    assert batch.input_ids.shape == (6, 12)  # longest: 5 prompt + 7 response tokens
    # hand-written: chosen rows first (examples 0, 1, 2), then rejected rows
    assert batch.input_ids[0].tolist() == [10, 11, 12, 20, 21, EOS] + [PAD] * 6
    assert batch.input_ids[4].tolist() == [13, 31, 32, EOS] + [PAD] * 8
    assert batch.input_ids[5].tolist() == [14, 15, 16, 17, 18, 33, 34, 35, 36, 37, 38, EOS]
    assert batch.seq_index.tolist() == [[0, 3], [1, 4], [2, 5]]
    assert batch.label_ids[batch.label_seq == 1].tolist() == [22, 23, 24, 25, EOS]
    assert (batch.label_pos[batch.label_seq == 1] - 12).tolist() == [0, 1, 2, 3, 4]
    _check_layout(batch, THREE, PAD)
    _check_labels(batch, THREE)


def test_pad_id_equal_to_eos():
    """Padding with a real token id (EOS, as when a tokenizer has no pad) must not change the labels."""
    batch = collate_padded(THREE, EOS)
    _check_layout(batch, THREE, EOS)
    _check_labels(batch, THREE)
    assert (batch.label_ids == EOS).sum().item() == 6  # one EOS per response, none from padding


def test_single_example():
    ex = [_te([5, 6], [[7, EOS], [8, 9, 10, EOS]], row=42)]
    batch = collate_padded(ex, PAD)
    assert batch.input_ids.tolist() == [[5, 6, 7, EOS, PAD, PAD], [5, 6, 8, 9, 10, EOS]]
    assert batch.seq_index.tolist() == [[0, 1]]
    assert batch.rows == [42]
    _check_layout(batch, ex, PAD)
    _check_labels(batch, ex)


def test_single_token_prompt_and_response():
    ex = [_te([1], [[7], [8]])]
    batch = collate_padded(ex, PAD)
    assert batch.label_pos.tolist() == [0, 2]
    assert batch.label_ids.tolist() == [7, 8]
    _check_labels(batch, ex)


def test_three_responses():
    exs = [
        _te([10, 11], [[20, EOS], [21, 22, EOS], [23, EOS]], row=0),
        _te([12, 13, 14], [[24, 25, 26, 27, EOS], [28, EOS], [29, 30, EOS]], row=1),
    ]
    batch = collate_padded(exs, PAD)
    assert batch.seq_index.tolist() == [[0, 2, 4], [1, 3, 5]]
    _check_layout(batch, exs, PAD)
    _check_labels(batch, exs)
    # per_example lays per-sequence values out as (B, K); response_lengths counts labels
    from directpo.logprobs import per_example
    per_seq = torch.arange(6) * 10.0
    assert per_example(batch, per_seq)[:, 2].tolist() == [40.0, 50.0]
    assert batch.response_lengths().tolist() == [[2, 3, 2], [5, 2, 3]]


def test_mixed_numbers_of_responses():
    exs = [
        _te([10, 11], [[20, EOS], [21, EOS]], row=0),
        _te([12], [[24, 25, EOS], [28, EOS], [29, 30, EOS]], row=1),
    ]
    batch = collate_padded(exs, PAD)
    assert batch.seq_index.tolist() == [[0, 2, -1], [1, 3, 4]]
    _check_layout(batch, exs, PAD)
    _check_labels(batch, exs)


def test_to_keeps_everything():
    batch = collate_padded(THREE, PAD)
    moved = batch.to("cpu")
    for name in ("input_ids", "attention_mask", "label_pos", "label_ids", "label_seq", "seq_index"):
        assert torch.equal(getattr(moved, name), getattr(batch, name))
    assert moved.rows == batch.rows and moved.position_ids is None


def test_real_tokenized_examples(tiny_tokenizer):
    tok = tiny_tokenizer
    examples = [
        Example("Review of Kalo:", [" It was great, warm and dull.", " It was awful, flat and funny."], "t", 0),
        Example("\n\nHuman: Is this a film?\n\nAssistant:", [" Yes.", " I have no idea at all, sorry."], "t", 1),
        Example("Review of Kalo: ", ["great film", "dull film"], "t", 2),  # boundary merge
        Example([{"role": "user", "content": "Hi"}],
                [[{"role": "assistant", "content": "Hello!"}], [{"role": "assistant", "content": "Go."}]], "t", 3),
    ]
    tes = [tokenize_example(ex, tok) for ex in examples]
    batch = collate_padded(tes, tok.pad_token_id)
    _check_layout(batch, tes, tok.pad_token_id)
    _check_labels(batch, tes)
    for i, ex in enumerate(examples):
        for k in range(2):
            r = batch.seq_index[i, k].item()
            ids = batch.input_ids[r][batch.attention_mask[r].bool()].tolist()
            text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if not ex.conversational:
                assert text == ex.prompt + ex.responses[k] + tok.eos_token


def test_max_prompt_length_zero_never_yields_a_label_outside_its_row(tiny_tokenizer):
    from directpo.data.formats import DataError

    ex = Example("Review of Kalo:", [" Great.", " Dull."], "t", 0)
    try:
        te = tokenize_example(ex, tiny_tokenizer, max_prompt_length=0)
    except (ValueError, DataError):
        return  # refusing the setting is a fine answer too
    batch = collate_padded([te], tiny_tokenizer.pad_token_id)
    T = batch.input_ids.shape[1]
    assert batch.label_pos.min().item() >= 0
    assert torch.equal(batch.label_pos // T, batch.label_seq)
