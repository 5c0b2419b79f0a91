"""The sampler's KV cache (`directpo.eval.sampling`): keys and values written in place into buffers
allocated once per batch at the batch's capacity (prompt + max_new_tokens: `_preallocated_layer`,
`_new_cache`), and the decode of shared prompts, whose keys and values are kept once for their K rows
and attended once for all of them (`_shared_prefix_attention`, registered with transformers'
AttentionInterface, its context `_SHARING`: the cache, the prompts' padding and the runs of rows of
each prompt, `_groups`)."""
from __future__ import annotations

import contextlib
import contextvars
import functools

import torch

from ..attention import attention_implementation


@functools.lru_cache(maxsize=None)
def _preallocated_layer():
    """A `DynamicLayer` whose keys and values are written in place into buffers as long as the
    batch's prompt + max_new_tokens, handed to attention as views of the filled part: the stock
    layer's torch.cat copies the whole cache every step (21 % of the sampling time on
    `small` with 200-token prompts). Built on first use: transformers is imported lazily."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length = capacity, 0

        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            B, H, _, D = key_states.shape
            self._k = key_states.new_empty(B, H, self.capacity, D)
            self._v = value_states.new_empty(B, H, self.capacity, value_states.shape[-1])

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            self._k[:, :, self.length:end] = key_states
            self._v[:, :, self.length:end] = value_states
            self.length = end
            self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def reorder_cache(self, beam_idx: torch.Tensor) -> None:
            """Rows `beam_idx` of the batch (repeats allowed): the K copies of a shared prompt, the live rows."""
            if self.is_initialized:
                self._k = self._k.index_select(0, beam_idx.to(self._k.device))
                self._v = self._v.index_select(0, beam_idx.to(self._v.device))
                self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

        def share(self, rows: int) -> None:
            """From now on the filled part (one row per distinct prompt) is the prompts' keys and
            values, kept once (`prefix`); new tokens go to a buffer of `rows` rows of their own."""
            self.prefix = (self.keys, self.values)
            k, v = self.keys, self.values
            self._k = k.new_empty(rows, k.shape[1], self.capacity - k.shape[2], k.shape[3])
            self._v = v.new_empty(rows, v.shape[1], self.capacity - v.shape[2], v.shape[3])
            self.offset, self.length = k.shape[2], 0

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.get_seq_length() + getattr(self, "offset", 0) + query_length, 0

    return PreallocatedLayer


SHARED_PREFIX = "directpo_shared_prefix"
# (cache, additive prefix mask (U, 1, 1, P) or None, [(prompt u, first row, end row)]) while decoding
_SHARING: contextvars.ContextVar = contextvars.ContextVar(SHARED_PREFIX, default=None)


def _shared_prefix_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """AttentionInterface function of a decode step from shared prompts: query (B, H, 1, D); `key`,
    `value` the rows' own new tokens (B, Hkv, t, D); each prompt's keys and values, stored once,
    read once for all its rows (K rows of a prompt: one (K·H/Hkv × P) product instead of K
    reads of K copies). softmax over [prompt | own tokens] as one: the same attention."""
    cache, pad, groups = _SHARING.get()
    pk, pv = cache.layers[module.layer_idx].prefix
    B, H, _, D = query.shape
    Hkv = key.shape[1]
    q = query.reshape(B, Hkv, H // Hkv, D) * (scaling if scaling is not None else D ** -0.5)
    own = q @ key.transpose(-1, -2)  # (B, Hkv, rep, t)
    outs = []
    for u, a, b in groups:
        qg = q[a:b].transpose(0, 1).reshape(Hkv, -1, D)  # (Hkv, n·rep, D)
        pre = (qg @ pk[u].transpose(-1, -2)).view(Hkv, b - a, -1, pk.shape[2]).transpose(0, 1)
        if pad is not None:
            pre = pre + pad[u]
        p = torch.softmax(torch.cat([pre, own[a:b]], dim=-1), dim=-1)
        P = pk.shape[2]
        from_prefix = (p[..., :P].transpose(0, 1).reshape(Hkv, -1, P) @ pv[u]).view(Hkv, b - a, -1, D)
        outs.append(from_prefix.transpose(0, 1) + p[..., P:] @ value[a:b])
    return torch.cat(outs).reshape(B, 1, H, D), None


def _no_mask(*args, **kwargs):
    return None  # the prompts' padding travels in _SHARING


@functools.lru_cache(maxsize=None)
def _register_shared_prefix() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SHARED_PREFIX, _shared_prefix_attention)
    AttentionMaskInterface.register(SHARED_PREFIX, _no_mask)


@contextlib.contextmanager
def _attention(model, name: str | None):
    """Within the block `model` attends with the registered function `name` (None: as it is)."""
    if name is None:
        yield
        return
    with attention_implementation(model, name):
        yield


def _groups(prompt_of_row: list[int]) -> list[tuple[int, int, int]]:
    """(prompt, first row, end row) of each run of rows decoding from the same prompt."""
    out = []
    for i, u in enumerate(prompt_of_row):
        if out and out[-1][0] == u:
            out[-1] = (u, out[-1][1], i + 1)
        else:
            out.append((u, i, i + 1))
    return out


def _new_cache(capacity: int):
    from transformers import DynamicCache

    cache = DynamicCache()  # layers made on first update, one per decoder layer
    cache.layer_class_to_replicate = functools.partial(_preallocated_layer(), capacity)
    return cache
