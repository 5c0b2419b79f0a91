"""Tokenized examples -> a `Batch` of tensors.

Every layout is described by the same index vectors, so `directpo.logprobs` never needs to know
which one it got:

* ``label_pos[n]``: flat index (row * length + t) of the hidden state that predicts label n
* ``label_ids[n]``: the label token
* ``label_seq[n]``: the response sequence it belongs to, in [0, num_seqs)
* ``seq_index[i, k]``: the sequence id of response k of example i (-1 where example i has < K)

`collate_padded` is the plain layout: one row per (prompt + response), right-padded, responses
grouped by rank (all chosen, then all rejected), so chosen and rejected share one forward.
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

    @property
    def num_seqs(self) -> int:
        return int(self.seq_index.max().item()) + 1

    @property
    def num_examples(self) -> int:
        return self.seq_index.shape[0]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens the model processes."""
        m = self.attention_mask
        return int(m.sum().item()) if m.dim() == 2 else int(m.any(-1).sum().item())

    def to(self, device) -> "Batch":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in kw.items():
            if isinstance(v, torch.Tensor):
                kw[k] = v.to(device, non_blocking=True)
        return Batch(**kw)

    def gather(self, seq_values: torch.Tensor, k: int) -> torch.Tensor:
        """Per-example value of response k from a per-sequence tensor."""
        return seq_values[self.seq_index[:, k]]


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
