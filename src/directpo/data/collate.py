"""Tokenized examples -> a `Batch` of tensors.

Every layout is described by the same index vectors, so `directpo.logprobs` never needs to know
which one it got:

* ``label_pos[n]``: flat index (row * length + t) of the hidden state that predicts label n
* ``label_ids[n]``: the label token
* ``label_seq[n]``: the response sequence it belongs to, in [0, num_seqs)
* ``seq_index[i, k]``: the sequence id of response k of example i (-1 where example i has < K)

`collate_padded` is the plain layout: one row per (prompt + response), right-padded, responses
grouped by rank (all chosen, then all rejected), so chosen and rejected share one forward.

`collate_packed` computes each prompt once: an example is one segment [prompt | r1 | r2 | ...]
whose responses restart their position ids after the prompt and see only the prompt and their own
earlier tokens (a 4D attention mask), and several segments share a row (block-diagonal mask), so
no FLOP goes to a repeated prompt and little to padding. Its log-probs equal the padded layout's.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .tokenize import TokenizedExample


@dataclass
class Batch:
    input_ids: torch.Tensor  # (R, T)
    attention_mask: torch.Tensor  # (R, T) padding mask, or (R, 1, T, T) boolean attention mask
    position_ids: torch.Tensor | None  # (R, T) or None for 0..T-1
    label_pos: torch.Tensor  # (N,)
    label_ids: torch.Tensor  # (N,)
    label_seq: torch.Tensor  # (N,)
    seq_index: torch.Tensor  # (B, K)
    rows: list[int]  # source rows of the B examples
    token_count: int | None = None  # real tokens, where the mask alone cannot tell

    @property
    def num_seqs(self) -> int:
        return int(self.seq_index.max().item()) + 1

    @property
    def num_examples(self) -> int:
        return self.seq_index.shape[0]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens the model processes."""
        if self.token_count is not None:
            return self.token_count
        m = self.attention_mask
        return int(m.sum().item()) if m.dim() == 2 else int(m.any(-1).sum().item())

    def to(self, device) -> "Batch":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in kw.items():
            if isinstance(v, torch.Tensor):
                kw[k] = v.to(device, non_blocking=True)
        return Batch(**kw)

    def response_lengths(self) -> torch.Tensor:
        """(B, K) label tokens per response (0 where absent)."""
        counts = torch.bincount(self.label_seq, minlength=self.num_seqs)
        return counts[self.seq_index.clamp(min=0)].masked_fill(self.seq_index < 0, 0)


def collate_padded(examples: list[TokenizedExample], pad_id: int) -> Batch:
    K = max(len(ex.response_ids) for ex in examples)
    seqs: list[tuple[int, list[int], int]] = []  # (example, ids, prompt length)
    seq_index = torch.full((len(examples), K), -1, dtype=torch.long)
    for k in range(K):
        for i, ex in enumerate(examples):
            if k < len(ex.response_ids):
                seq_index[i, k] = len(seqs)
                seqs.append((i, ex.prompt_ids + ex.response_ids[k], len(ex.prompt_ids)))
    T = max(len(ids) for _, ids, _ in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    pos, lab, seq = [], [], []
    for r, (_, ids, p) in enumerate(seqs):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        attention_mask[r, :len(ids)] = 1
        # token t (t ≥ p) is predicted by the hidden state at t - 1
        pos.extend(range(r * T + p - 1, r * T + len(ids) - 1))
        lab.extend(ids[p:])
        seq.extend([r] * (len(ids) - p))
    return Batch(input_ids, attention_mask, None, torch.tensor(pos), torch.tensor(lab), torch.tensor(seq),
                 seq_index, [ex.row for ex in examples])


def _assign_sequences(examples: list[TokenizedExample]) -> torch.Tensor:
    """Sequence ids grouped by rank, as in the padded layout: all best responses first."""
    K = max(len(ex.response_ids) for ex in examples)
    seq_index = torch.full((len(examples), K), -1, dtype=torch.long)
    n = 0
    for k in range(K):
        for i, ex in enumerate(examples):
            if k < len(ex.response_ids):
                seq_index[i, k] = n
                n += 1
    return seq_index


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of segment lengths into rows of `capacity` tokens."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for r, f in enumerate(free):
            if lengths[i] <= f:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def collate_packed(examples: list[TokenizedExample], pad_id: int, row_tokens: int | None = None) -> Batch:
    """Prefix-shared, packed layout. Rows hold up to max(row_tokens, longest segment) tokens."""
    seq_index = _assign_sequences(examples)
    lengths = [len(ex.prompt_ids) + sum(len(r) for r in ex.response_ids) for ex in examples]
    rows = pack_rows(lengths, max(row_tokens or 0, max(lengths)))
    T = max(sum(lengths[i] for i in row) for row in rows)
    R = len(rows)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, T), dtype=torch.long)
    segment = torch.full((R, T), -1, dtype=torch.long)  # example index, -1 = padding
    branch = torch.zeros((R, T), dtype=torch.long)  # 0 = prompt, k + 1 = response k
    pos, lab, seq = [], [], []
    for r, row in enumerate(rows):
        o = 0
        for i in row:
            ex = examples[i]
            P = len(ex.prompt_ids)
            input_ids[r, o:o + P] = torch.tensor(ex.prompt_ids)
            position_ids[r, o:o + P] = torch.arange(P)
            segment[r, o:o + P] = i
            start = o + P
            for k, resp in enumerate(ex.response_ids):
                L = len(resp)
                input_ids[r, start:start + L] = torch.tensor(resp)
                position_ids[r, start:start + L] = torch.arange(P, P + L)
                segment[r, start:start + L] = i
                branch[r, start:start + L] = k + 1
                # the first token is predicted by the prompt's last position, the rest by their predecessor
                base = r * T
                pos.append(base + o + P - 1)
                pos.extend(range(base + start, base + start + L - 1))
                lab.extend(resp)
                seq.extend([int(seq_index[i, k])] * L)
                start += L
            o = start
    idx = torch.arange(T)
    causal = idx[None, :, None] >= idx[None, None, :]
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0)
    visible_branch = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    mask = causal & same & visible_branch
    # Padding queries attend to themselves only, so attention rows are never empty (no NaN).
    mask |= torch.eye(T, dtype=torch.bool)[None] & (segment < 0)[:, :, None]
    return Batch(input_ids, mask[:, None], position_ids, torch.tensor(pos), torch.tensor(lab), torch.tensor(seq),
                 seq_index, [ex.row for ex in examples], token_count=int((segment >= 0).sum()))


LAYOUTS = ("packed", "padded")


def make_collate(layout: str, pad_id: int, row_tokens: int | None = None):
    """examples -> Batch for a layout name ('packed': prefix-shared and packed; 'padded': plain)."""
    if layout == "packed":
        return lambda examples: collate_packed(examples, pad_id, row_tokens)
    if layout == "padded":
        return lambda examples: collate_padded(examples, pad_id)
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
