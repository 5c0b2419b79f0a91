"""`directpo sample`: completions from a model for a prompt file, batched, seeded.

Prompts come from a prompt file or any preference file `directpo train` reads
(`directpo.data.prompts.load_prompts`), are tokenized exactly as in training
(`directpo.data.prompts.encode_prompt`), left-padded, and sampled with
our own loop with a KV cache (`sample_batch`): plain ancestral sampling from softmax(logits / T),
optionally nucleus-filtered, and nothing else (no default top-k, no repetition penalty, whatever
a checkpoint's generation config says): at temperature 1 and top-p 1, samples come from π itself,
which the KL estimator of `directpo eval` relies on. Completion ids keep the EOS the
model generated (it is part of y); texts are decoded without it. Prompts with images (a
vision-language model, issue #30) are encoded by its processor as training encodes them
(`encode_image_prompt`) and their prefill is given the images (`_prefill`, `_vision_inputs`).

Speed, with the samples unchanged: the repeats of a prompt (its K samples) share one prefill,
and, for models whose attention is plain softmax attention through transformers'
AttentionInterface, its keys and values are kept once and each decode step attends to them once
for all K rows (`_shared_prefix_attention`; otherwise they are copied K times); rows that end (EOS)
leave the batch; within windows of `BUCKET_BATCHES` batches prompts are sampled in order of length
(less padding); the KV cache is written in place into buffers allocated once per batch
(`_preallocated_layer`), not concatenated every step (the cache and the shared-prompt attention:
`directpo.eval.kv_cache`). Memory: text prompts longer than `PREFILL_CHUNK` tokens are prefilled
in chunks of columns through the cache (`_prefill_forward`), the same computation with a forward's
temporaries of rows × chunk instead of rows × prompt length.

Reproducibility: sample k's random numbers are fixed by its place in the input: batch
b = k // batch_size draws a (max_new_tokens, rows) block of uniforms from its own generator seeded
`seed + b` (the global RNG is untouched) and sample k uses its column, whichever batch it is
decoded in and whoever shares that batch. That is the stream the simple loop before these
speed-ups drew step by step, so fixed-seed samples are the same as before (up to float rounding of
differently shaped batches, which can flip a token only when a uniform falls within ~1e-7 of a
boundary of the cumulative distribution). So a batch size chosen by `--memory-budget` (`plan_batch`:
the largest batch whose peak memory fits, arithmetic in `directpo.eval.budget` on costs measured
on the loaded model) is logged and recorded in the command's output: `--batch-size N` reproduces it.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from ..console import log
from ..data.collate import merge_vision
from ..errors import UserValueError
from ..attention import supports_segment_attention
from ..models import attention_widths, mask_suppressed_, suppressed_token, unwrap_peft
from .decode import lean_decoder
# (imported by name, called through this module's globals: tests replace `sampling._new_cache`, `_groups`)
from .kv_cache import (_SHARING, SHARED_PREFIX, _attention, _groups, _new_cache, _register_shared_prefix,
                       _shared_prefix_attention)
from .budget import (SamplingCosts, batch_need, choose_batch, current_memory, format_choice, live_bytes,
                     parse_size)


def check_sampling_args(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise UserValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserValueError(f"temperature must be ≥ 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserValueError(f"top_p must be in (0, 1], got {top_p}")


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None,
               u: torch.Tensor | None = None):
    """One token per row from softmax(logits / T), optionally nucleus-filtered; argmax at T = 0.

    Inverse-CDF sampling: one uniform u per row (`u`, shape (B,), or drawn from `generator`), the
    first token whose cumulative probability exceeds u·total (float64 sums). It draws B random
    numbers instead of B × vocabulary, and is exact: token i is picked with probability p_i."""
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits.double() if temperature == 1 else logits.double() / temperature
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:  # keep the smallest set of most likely tokens whose mass reaches top_p
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # the first token is never dropped
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    cdf = probs.cumsum(-1)
    if u is None:
        u = torch.rand(probs.shape[0], generator=generator, device=probs.device, dtype=torch.float64)
    tok = torch.searchsorted(cdf, u.to(cdf.device)[:, None] * cdf[:, -1:], right=True).squeeze(-1)
    return tok.clamp(max=probs.shape[-1] - 1)  # u·total == total (rounding): the last token


def _cache_kw(model) -> str:
    """The name of the KV-cache argument: `cache` in recent transformers, `past_key_values` before."""
    import inspect

    base = unwrap_peft(model)
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _forward(model, **kw):
    try:
        return model(**kw, logits_to_keep=1)  # only the last position's logits are needed
    except TypeError:  # models without logits_to_keep
        return model(**kw)


def _left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids, mask) with every row's last prompt token at the last column; mask None when no row is padded."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = 1
    return ids.to(device), (None if bool(mask.all()) else mask.to(device))


def _vision_inputs(rows: list, mask: torch.Tensor, device) -> tuple[torch.Tensor, dict]:
    """Position ids and image tensors of a prefill of vision-language prompts (`encode_image_prompt`'s
    examples, one a row): the images merged in row order as training merges them (`merge_vision`);
    M-RoPE models (rows with `prompt_positions`): (3, rows, P) positions, each row's shifted right by
    its left padding, the padding at 0 as `get_rope_index` leaves it under the attention mask (it is
    masked out: any value gives the same result); others: positions counting real tokens, as text."""
    tensors = merge_vision([[r] for r in rows]) or {}
    extra = {k: v.to(device) for k, v in tensors.items()}
    if all(r.prompt_positions is None for r in rows):
        return (mask.cumsum(-1) - 1).clamp(min=0), extra
    P = mask.shape[1]
    pos = torch.zeros(3, len(rows), P, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.prompt_ids)
        pos[:, i, P - n:] = r.prompt_positions if r.prompt_positions is not None else torch.arange(n)
    return pos.to(device), extra


# Prompt columns a text prefill feeds at once: its transient memory is rows × this, not rows × P.
# Peak RSS of `bench --sample` on `small` (K=1, 16 rows of up to 322 tokens, 1 thread): one forward
# 570-577 MiB, chunks of 128: 490-492, 64: 465, 32: 454. 128 takes most of the saving while a prefill
# stays a few large forwards (each reads all the weights once: a cost where one row is prefilled).
PREFILL_CHUNK = 128


def _prefill_forward(model, ids: torch.Tensor, mask: torch.Tensor | None, position_ids: torch.Tensor, cache,
                     cache_kw: str, extra: dict, chunked: bool) -> torch.Tensor:
    """The prompts' keys and values written into `cache`, and their last position's logits. Text
    prompts longer than `PREFILL_CHUNK` go in chunks of columns, each attending through the cache
    to all columns so far (the mask of those columns, its own position ids): the same computation
    per position, but the forward's temporaries (MLP, attention scores) are rows × chunk instead of
    rows × P, which was the sampler's peak memory on long prompts (issue #32). Image prompts go in
    one forward (`chunked` False): a picture's placeholder tokens must meet its features in one call."""
    P = ids.shape[1]
    step = PREFILL_CHUNK if chunked else P
    for start in range(0, P, step):
        end = min(P, start + step)
        out = _forward(model, input_ids=ids[:, start:end], attention_mask=None if mask is None else mask[:, :end],
                       position_ids=position_ids[..., start:end], use_cache=True, **extra, **{cache_kw: cache})
        logits = out.logits[:, -1]
        del out  # (a model without logits_to_keep returns the chunk's every position: let it go now)
    return logits


# A prompt's repeats attend its keys shared (`_shared_prefix_attention`: a few small calls per prompt,
# layer and step) or copied to each row (one call over all rows). Sharing pays when the copies would be
# many keys. Measured on `small` (key-value width 256; 2-core AVX2 AMD EPYC, 2026-12-07; 32 new
# tokens): 64 prompts × 4 rows in batches of 256, prompts of 32 tokens: 1.5× faster copied, 64: 1.2×
# faster copied, 128: 1.5× faster shared; one prompt × 16 rows of 300 tokens: 1.6× faster shared.
SHARED_KEYS_MIN = 65536  # (repeat rows × prompt tokens × key-value width) per distinct prompt


def _kv_width(model) -> int:
    _, kv_heads, head_dim = attention_widths(unwrap_peft(model).config)
    return kv_heads * head_dim


def sharing_rule(model):
    """`shares(rows, distinct, prompt_tokens)`: whether a batch of `rows` rows of `distinct` prompts
    (padded to `prompt_tokens`) decodes with each prompt's keys kept once and shared by its rows, else
    copied to them (see SHARED_KEYS_MIN). What it needs of `model` is read here, once per plan."""
    if not supports_segment_attention(model):
        return lambda rows, distinct, prompt_tokens: False
    width = _kv_width(model)

    def shares(rows: int, distinct: int, prompt_tokens: int) -> bool:
        return distinct < rows and 2 * distinct <= rows and \
            (rows - distinct) * prompt_tokens * width >= SHARED_KEYS_MIN * distinct
    return shares


def shares_keys(model, rows: int, distinct: int, prompt_tokens: int) -> bool:
    """`sharing_rule(model)` for one batch (the sampler asks once per batch)."""
    return sharing_rule(model)(rows, distinct, prompt_tokens)


def _prefill(model, prompts: list[list[int]], pad_id: int, capacity: int, share_prefix: bool,
             cache_kw: str, vision: list | None = None):
    """The prompts' KV cache and last-position logits, one row per prompt of `prompts`, and the
    decode's sharing: with `share_prefix` each distinct prompt is computed once; where that pays
    (`shares_keys`: prompts repeated, long enough, the model's attention plain), its keys and
    values are kept once and attended by all its rows (`_shared_prefix_attention`; sharing is then
    (additive padding mask of the prompts or None, prompt of each row)), else copied to its rows.

    `vision` (vision-language prompts, `encode_image_prompt`'s example of each row): a prompt is its
    ids and its images (`vision.digest`: the same text with other pictures is another prompt), the
    prefill is given their tensors and positions (`_vision_inputs`), and its keys are shared by its
    rows as a text prompt's (each row's own tokens are positioned after its prompt's largest position,
    which the shared keys never need). The returned positions are each row's largest prompt position
    (the next token's is one more, in all three M-RoPE streams)."""
    device = next(model.parameters()).device
    if share_prefix:
        first: dict[tuple, int] = {}
        keys = [tuple(p) for p in prompts] if vision is None else \
            [(tuple(p), v.vision.digest if v.vision else None) for p, v in zip(prompts, vision)]
        inverse = [first.setdefault(k, len(first)) for k in keys]
        distinct = [list(p) for p in first] if vision is None else [list(k[0]) for k in first]
        reps = None if vision is None else [inverse.index(u) for u in range(len(first))]  # each one's first row
    else:
        inverse, distinct, reps = list(range(len(prompts))), prompts, list(range(len(prompts)))
    ids, mask = _left_padded(distinct, pad_id, device)
    extra = {}
    if vision is not None:
        mask = torch.ones_like(ids) if mask is None else mask  # always a mask: M-RoPE positions are no packing hint
        position_ids, extra = _vision_inputs([vision[i] for i in reps], mask, device)
    else:
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0) if mask is not None else \
            torch.arange(ids.shape[1], device=device).expand(ids.shape[0], -1)
    cache = _new_cache(capacity)
    logits, sharing = _prefill_forward(model, ids, mask, position_ids, cache, cache_kw, extra, vision is None), None
    if position_ids.ndim == 3:  # M-RoPE (3, rows, P): the largest position of each row, as a (rows, 1) column
        position_ids = position_ids.amax(dim=(0, 2))[:, None]
    if len(distinct) < len(prompts):
        idx = torch.tensor(inverse, device=device)
        logits, position_ids = logits[idx], position_ids[idx]
        if shares_keys(model, len(prompts), len(distinct), ids.shape[1]):
            for layer in cache.layers:
                layer.share(len(prompts))
            pad = None if mask is None else torch.zeros(mask.shape, dtype=cache.layers[0].keys.dtype, device=device) \
                .masked_fill(mask == 0, float("-inf"))[:, None, None, :]
            return cache, logits, position_ids[:, -1], None, (pad, inverse)
        cache.reorder_cache(idx)
        mask = mask[idx] if mask is not None else None
    return cache, logits, position_ids[:, -1], mask, sharing


@torch.no_grad()
def sample_batch(model, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                 eos_id: int | None, pad_id: int, uniforms: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, share_prefix: bool = True,
                 drop_finished: bool = True, vision: list | None = None) -> list[list[int]]:
    """Ancestral sampling with a KV cache: one completion (ids, cut after its EOS, which is kept)
    per prompt. Row i's token t is drawn with the uniform `uniforms[i, t]` (default: a
    (max_new_tokens, B) draw from `generator`, transposed), so a row's sample does not depend on
    which rows share its batch, on whether they leave it when they finish (`drop_finished`) or on
    whether repeats of a prompt share its prefill and keys (`share_prefix`). Prompts are
    left-padded; position ids count real tokens only, as in training. `vision`: each row's
    vision-language prompt (`encode_image_prompt`; `prompts` are their ids), see `_prefill`."""
    B, T = len(prompts), max_new_tokens
    cache_kw = _cache_kw(model)  # once: inspecting the signature every step costs as much as a small op
    cache, logits, pos, mask, sharing = _prefill(model, prompts, pad_id, max(map(len, prompts)) + T, share_prefix,
                                                 cache_kw, vision)
    mrope = vision is not None and any(v.prompt_positions is not None for v in vision)
    lean = lean_decoder(model) if vision is None else None
    banned = suppressed_token(model)  # --fixed-length: EOS never drawn, each row runs to max_new_tokens
    device = logits.device
    if uniforms is None and temperature > 0:
        uniforms = torch.rand(T, B, generator=generator, device=device, dtype=torch.float64).T
    if mask is not None:  # the generated tokens' columns: attended by every row
        mask = torch.cat([mask, mask.new_ones(B, T)], dim=1)
    out = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)  # batch rows still decoded, in cache order
    alive = torch.ones(B, dtype=torch.bool, device=device)
    P = mask.shape[1] - T if mask is not None else 0
    if sharing is not None:
        _register_shared_prefix()
        prompt_of = sharing[1]
        token = _SHARING.set((cache, sharing[0], _groups(prompt_of)))
    try:
        with _attention(model, SHARED_PREFIX if sharing is not None else None):
            for t in range(T):
                tok = next_token(mask_suppressed_(logits, banned), temperature, top_p,
                                 u=None if uniforms is None else uniforms[rows, t])
                out[rows[alive], t] = tok[alive]
                if eos_id is not None:
                    alive &= tok != eos_id
                if t == T - 1 or not bool(alive.any()):
                    break
                dead = len(alive) - int(alive.sum())
                # A finished row's later tokens are never read: drop such rows once they are an eighth of
                # the batch, when a smaller decode step pays for copying the cache down to the live rows.
                if drop_finished and dead and dead * 8 >= len(alive):
                    keep = alive.nonzero().squeeze(1)
                    cache.reorder_cache(keep)
                    rows, tok, pos, alive = rows[keep], tok[keep], pos[keep], alive[keep]
                    mask = mask[keep] if mask is not None else None
                    if sharing is not None:
                        prompt_of = [prompt_of[i] for i in keep.tolist()]
                        _SHARING.set((cache, sharing[0], _groups(prompt_of)))
                pos = pos + 1
                if lean is not None:  # the same computation, without the forward's machinery
                    logits = lean(tok, pos, cache, None if mask is None else mask[:, :P + t + 1],
                                  _shared_prefix_attention if sharing is not None else None)
                    continue
                logits = _forward(model, input_ids=tok[:, None],
                                  attention_mask=None if mask is None else mask[:, :P + t + 1],
                                  position_ids=pos[None, :, None].expand(3, -1, -1) if mrope else pos[:, None],
                                  use_cache=True, **{cache_kw: cache}).logits[:, -1]
    finally:
        if sharing is not None:
            _SHARING.reset(token)
    return [cut_at_eos(row, eos_id) for row in out.tolist()]


def cut_at_eos(row: list[int], eos_id: int | None) -> list[int]:
    """A row of sampled ids up to its first EOS (kept); all of it if it has none."""
    if eos_id is not None and eos_id in row:
        return row[:row.index(eos_id) + 1]
    return row


BUCKET_BATCHES = 64  # prompts are sorted by length within windows of this many batches


def _window_uniforms(sizes: list[int], first_batch: int, T: int, seed: int, device) -> torch.Tensor:
    """The uniforms of the samples of consecutive batches (in input order), one row per sample:
    batch b draws (T, its rows) from a generator seeded `seed + b`, the stream the unbucketed
    loop drew step by step, so samples at a fixed seed are those it gave (up to rounding)."""
    parts = []
    for k, n in enumerate(sizes):
        gen = torch.Generator(device=device).manual_seed(seed + first_batch + k)
        parts.append(torch.rand(T, n, generator=gen, device=device, dtype=torch.float64).T)
    return torch.cat(parts)


def _windows(lengths: list[int], batch_size: int):
    """The sampler's batches, for prompts of these lengths: per window of `BUCKET_BATCHES` batches
    (in input order), (its first sample, the sizes of its batches in input order, its batches as
    positions in the window, longest prompts first: the peak early). `generate_completions` samples
    them; `plan_batch` plans for them."""
    window = BUCKET_BATCHES * batch_size
    for w0 in range(0, len(lengths), window):
        n = min(window, len(lengths) - w0)
        order = sorted(range(n), key=lambda i: -lengths[w0 + i])
        yield w0, [min(batch_size, n - s) for s in range(0, n, batch_size)], \
            [order[s:s + batch_size] for s in range(0, n, batch_size)]


@torch.no_grad()
def generate_completions(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int = 128,
                         temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                         progress: str | None = None, vision: list | None = None, skip=None,
                         on_batch=None) -> list[list[int]]:
    """One sampled completion per entry of `prompt_ids` (repeat a prompt for several samples);
    `vision`: each entry's vision-language prompt (`encode_image_prompt`), for a VLM.

    Returns completion ids, cut after the first EOS (which is kept). Within windows of
    `BUCKET_BATCHES` batches, prompts are sampled in order of length (less padding, and the
    repeats of a prompt share one prefill); each sample's random numbers are those of its place in
    the input, so the bucketing changes no sample. A resumed run (`sample.draw_resumably`):
    a batch whose sample indices `skip(indices)` accepts is not sampled (its entries stay []), and
    `on_batch(indices, completions)` is called after each batch sampled; the other batches are
    formed and drawn exactly as in a full run, so their samples are the full run's.
    """
    check_sampling_args(max_new_tokens, temperature, top_p)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out: list[list[int]] = [[] for _ in prompt_ids]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(prompt_ids), desc=progress, unit="sample", mininterval=1.0, dynamic_ncols=True)
    for w0, sizes, parts in _windows([len(p) for p in prompt_ids], batch_size):
        uniforms = None if temperature == 0 else \
            _window_uniforms(sizes, w0 // batch_size, max_new_tokens, seed, device)
        for part in parts:
            if skip is not None and skip([w0 + i for i in part]):
                if bar is not None:
                    bar.update(len(part))
                continue
            comps = sample_batch(model, [prompt_ids[w0 + i] for i in part], max_new_tokens, temperature, top_p,
                                 eos, pad, None if uniforms is None else uniforms[part],
                                 vision=None if vision is None else [vision[w0 + i] for i in part])
            for i, c in zip(part, comps):
                out[w0 + i] = c
            if on_batch is not None:
                on_batch([w0 + i for i in part], comps)
            if bar is not None:
                bar.update(len(part))
    if bar is not None:
        bar.close()
    model.train(was_training)
    return out


def _query_heads(model) -> int:
    config = unwrap_peft(model).config
    for c in (config, getattr(config, "text_config", None)):
        for name in ("num_attention_heads", "n_head", "num_heads"):
            if isinstance(getattr(c, name, None), int):
                return getattr(c, name)
    return 1


def _probe_image_prompt(model, vision: list, longest: int, pad_id: int):
    """The image prompt the probe prefills (`measure_costs`): the row with the most image tokens (a
    picture's tokens, its pixels and its tower's work grow together), its text lengthened with pad
    tokens to `longest` (M-RoPE: positions counting on), so that a probe row costs at least what any
    row of the run does in the language model and in the vision tower."""
    image_token = getattr(unwrap_peft(model).config, "image_token_id", None)
    v = max(vision, key=lambda r: (r.prompt_ids.count(image_token) if r.vision else -1, len(r.prompt_ids)))
    extra = longest - len(v.prompt_ids)
    if extra <= 0:
        return v
    pos = v.prompt_positions
    if pos is not None:
        start = int(pos.max()) + 1
        pos = torch.cat([pos, torch.arange(start, start + extra).expand(3, -1)], dim=1)
    return dataclasses.replace(v, prompt_ids=v.prompt_ids + [pad_id] * extra, prompt_positions=pos)


@torch.no_grad()
def measure_costs(model, prompt_ids: list[list[int]], max_new_tokens: int, top_p: float, pad_id: int,
                  vision: list | None = None):
    """`budget.SamplingCosts` of sampling `prompt_ids` with the loaded `model`: a probe of this
    sampler's own prefill and decode step at 2 and 3 rows of the longest prompt, one of them a token
    shorter (a padded batch: its attention mask costs too), random tokens from a generator of its
    own (the global RNG is untouched), counted by `budget.live_bytes`; the KV cache's bytes per
    position read off the cache tensors the prefill made. `vision` (image prompts): the rows are
    `_probe_image_prompt`'s, each with its images, so the prefill's cost per row counts their image
    tokens, their pixel tensors and the vision tower's transient forward over them."""
    device = next(model.parameters()).device
    held = current_memory(device)
    longest = max(map(len, prompt_ids))
    gen = torch.Generator().manual_seed(0)
    vocab_in = unwrap_peft(model).get_input_embeddings().num_embeddings
    was_training, cache_kw, points = model.training, _cache_kw(model), []
    # image prompts are never cut: all rows but the last are one token longer instead (a padded batch)
    probe = None if vision is None else [_probe_image_prompt(model, vision, n, pad_id) for n in (longest + 1, longest)]
    mrope = probe is not None and probe[0].prompt_positions is not None
    cap = longest + 1 + (probe is not None)  # the cache's positions: the prompts' and one decode step's
    model.eval()
    for rows in (2, 3):
        prompts = torch.randint(0, vocab_in, (rows, longest), generator=gen).tolist()
        prompts[-1] = prompts[-1][:max(1, longest - 1)]
        # (each probe row its own example: its images made for it, as distinct prompts' are)
        rows_vision = None if probe is None else [dataclasses.replace(probe[r == rows - 1]) for r in range(rows)]
        if rows_vision is not None:
            prompts = [v.prompt_ids for v in rows_vision]
        with live_bytes() as live:
            cache, logits, pos, mask, _ = _prefill(model, prompts, pad_id, cap, False, cache_kw, rows_vision)
        tensors = [t for layer in cache.layers
                   for t in (getattr(layer, "_k", layer.keys), getattr(layer, "_v", layer.values))]
        sizes = [t.untyped_storage().nbytes() for t in tensors]
        with live_bytes() as step:
            _forward(model, input_ids=logits.argmax(-1)[:, None], use_cache=True,
                     position_ids=(pos + 1)[None, :, None].expand(3, -1, -1) if mrope else (pos + 1)[:, None],
                     attention_mask=None if mask is None else torch.cat([mask, mask.new_ones(rows, 1)], dim=1),
                     **{cache_kw: cache})
        points.append((live.peak - sum(sizes), step.peak, sum(sizes) / rows, max(sizes) / rows, logits))
    model.train(was_training)
    (p2, d2, *_), (p3, d3, cache_row, largest_row, logits) = points
    weights = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    return SamplingCosts(held, weights, cache_row / cap, largest_row / cap,
                         (max(0, p2 - 2 * (p3 - p2)), max(0, p3 - p2)), (max(0, d2 - 2 * (d3 - d2)), max(0, d3 - d2)),
                         logits.shape[-1], logits.element_size(), _query_heads(model), longest, max_new_tokens,
                         top_p, len(prompt_ids))


def plan_batch(model, prompt_ids: list[list[int]], max_new_tokens: int, top_p: float, pad_id: int,
               budget: str | int, costs: SamplingCosts | None = None, vision: list | None = None) -> dict:
    """The largest batch (rows decoded at once) whose peak memory sampling `prompt_ids` fits
    `budget` (bytes, or a size such as '8GiB'): `directpo.eval.budget`'s arithmetic over the batches
    `generate_completions` will form, on costs measured on the loaded model (`measure_costs`, or
    `costs` measured before). `vision`: each row's image prompt (`encode_image_prompt`), as
    `generate_completions` takes them."""
    budget = parse_size(budget) if isinstance(budget, str) else int(budget)
    costs = costs or measure_costs(model, prompt_ids, max_new_tokens, top_p, pad_id, vision)
    first: dict[tuple, int] = {}
    ids = [tuple(p) for p in prompt_ids] if vision is None else \
        [(tuple(p), v.vision.digest if v.vision else None) for p, v in zip(prompt_ids, vision)]  # as `_prefill`
    keys = [first.setdefault(k, len(first)) for k in ids]  # which prompt (its repeats share it)
    shares = sharing_rule(model)
    lengths = [len(p) for p in prompt_ids]

    @functools.lru_cache(maxsize=None)
    def need(batch_size: int) -> dict:
        worst: dict = {"total": -1}
        for w0, sizes, parts in _windows(lengths, batch_size):
            for part in parts:
                rows, distinct = len(part), len({keys[w0 + i] for i in part})
                shared = shares(rows, distinct, max(lengths[w0 + i] for i in part))  # as `_prefill` decides
                n = batch_need(costs, rows, distinct, max(lengths[w0 + i] for i in part), shared, sum(sizes))
                worst = n if n["total"] > worst["total"] else worst
        return worst

    return choose_batch(budget, costs, need)


def sampling_batch_size(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, top_p: float,
                        batch_size: int, memory_budget: str | None, vision: list | None = None) -> int:
    """`batch_size`, or with `memory_budget` the batch `plan_batch` chooses (logged: the samples
    depend on it, so a rerun gives it as --batch-size); `vision`: image prompts (`plan_batch`)."""
    if memory_budget is None or not prompt_ids:
        return batch_size
    plan = plan_batch(model, prompt_ids, max_new_tokens, top_p, tokenizer.pad_token_id, memory_budget,
                      vision=vision)
    log(format_choice(plan))
    return plan["batch_size"]


def decode(tokenizer, ids: list[int]) -> str:
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)
