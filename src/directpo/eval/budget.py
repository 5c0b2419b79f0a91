"""`--memory-budget` of `directpo sample`, `bon` and `eval`: the largest sampling batch (rows decoded
at once) whose peak memory fits the budget.

Half arithmetic, half measured. What the sampler allocates itself is counted exactly, from its own
cache tensors; what a model's forward allocates differs by architecture and attention kernel, so it
is measured on the loaded model by a probe (`directpo.eval.sampling.measure_costs`), as training's
`--memory-budget` measures its activations. For a batch of `rows` rows from `distinct` distinct
prompts, the longest P tokens, T = max_new_tokens (c = P + T, the cache's capacity):

  held       what the process holds when sampling is about to start, the weights among them: CUDA
             memory allocated on the device, or the process's resident set
  cache      the KV cache as `sampling.sample_batch` allocates it, k bytes per row and position (all
             layers' keys and values, read off the sampler's own cache tensors): rows·c·k; when the
             prompts are shared (`sampling.sharing_rule`: repeated, long enough, plain attention)
             each prompt's keys and values once and each row's own new tokens: distinct·c·k +
             rows·T·k. Plus one layer's
             tensor of rows·c positions: reordering the cache (a prompt's copies, finished rows
             leaving) makes a new tensor before the old one goes
  prefill    measured: the bytes a forward over rows of the run's longest prompt creates (every
             tensor an op makes, counted while it lives: `LiveBytes`), at 2 and 3 rows, a line in
             rows; taken for `distinct` rows, beside the part of the cache they fill. Image prompts
             (a vision-language model): the probe's rows are the run's prompt with the most image
             tokens, its text lengthened to the longest prompt (`sampling._probe_image_prompt`), each
             with its pictures, so a row's cost holds its image tokens, the pixel tensors the
             processor makes and the vision tower's transient forward over them (measured on the
             tiny Qwen2-VL and LLaVA: a real run peaks at 98.7-99.7 % of the plan,
             `tests/eval/test_budget_vision.py`); an image prompt's keys are shared as a text one's
  decode     measured likewise: one decode step's forward; plus the shared-prefix attention's
             scores (4 tensors of rows × heads × c) and the sampling step: the logits (the
             model's dtype) and `next_token`'s float64 copies (scaled, softmax, cumulative sum:
             3 × 8 bytes per row and vocabulary entry; top-p < 1 sorts too: 41 bytes more), the
             prefill's logits of the distinct prompts, and the batch's token ids and uniforms
  uniforms   the window's random numbers, drawn before its batches (`BUCKET_BATCHES` batches):
             its rows × T × 8 bytes, twice while they are put together

need = held + uniforms + max(cache filled by the prefill + prefill, cache + decode), the maximum
over the batches the run will form (`sampling._windows`: the same grouping by length the sampler
uses), and the batch is the largest ≤ the number of samples whose need fits. Not counted: the
memory the C allocator keeps after it is freed and the kernels' own scratch (small); the probe
counts a forward's tensors at the run's longest prompt for every batch (an upper bound).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError
from ..memory import GiB, KiB, MiB, current_memory, parse_size, size_str  # noqa: F401 (re-exported)


class SamplingBudgetError(ConfigError):
    """--memory-budget too small for one row of sampling."""


@dataclass
class SamplingCosts:
    """The bytes a sampling batch is made of, measured on the loaded model (`sampling.measure_costs`)."""

    held: int  # the process now, the weights among it
    weights: int  # parameters and buffers
    cache_per_token: float  # KV cache bytes per row and position, all layers, keys and values
    cache_tensor_per_token: float  # the largest one cache tensor's bytes per row and position
    prefill: tuple[float, float]  # a forward over rows of the longest prompt: (fixed, per row)
    decode: tuple[float, float]  # one decode step's forward: (fixed, per row)
    vocab: int
    logits_bytes: int  # element size of the model's logits (and of its attention scores)
    heads: int  # query heads
    longest: int  # the run's longest prompt, tokens
    max_new_tokens: int
    top_p: float
    samples: int  # rows in all, every prompt's repeats


def batch_need(c: SamplingCosts, rows: int, distinct: int, longest: int, shared: bool, window_rows: int) -> dict:
    """The peak bytes of one batch (module docstring), by part."""
    T, cap = c.max_new_tokens, longest + c.max_new_tokens
    k = c.cache_per_token
    cache = (distinct * cap + rows * T) * k if shared else rows * cap * k
    cache += rows * cap * c.cache_tensor_per_token  # one tensor reordered: the new one before the old goes
    prefill = distinct * cap * k + c.prefill[0] + c.prefill[1] * distinct
    per_vocab = c.logits_bytes + 3 * 8 + (41 if c.top_p < 1 else 0)
    sampling = rows * c.vocab * per_vocab + distinct * c.vocab * c.logits_bytes + rows * T * 16 \
        + 4 * rows * c.heads * cap * c.logits_bytes
    decode = cache + c.decode[0] + c.decode[1] * rows + sampling
    uniforms = 2 * window_rows * T * 8
    total = c.held + uniforms + max(prefill, decode)
    return {"total": int(total), "cache": int(cache), "forward": int(max(prefill - distinct * cap * k,
                                                                       c.decode[0] + c.decode[1] * rows)),
            "sampling": int(sampling + uniforms), "rows": rows, "longest": longest}


def choose_batch(budget: int, costs: SamplingCosts, need, what: str = "--memory-budget") -> dict:
    """The largest batch b ≤ costs.samples with need(b)["total"] ≤ budget (`need`: batch size -> the
    largest `batch_need` of the batches it forms); `SamplingBudgetError` naming the minimum when
    not even one row fits."""
    one = need(1)
    if one["total"] > budget:
        raise SamplingBudgetError(
            f"{what} {size_str(budget)}: too small for sampling this run, which needs at least "
            f"{size_str(one['total'])} for one row ({size_str(costs.held)} held by the process, "
            f"{size_str(costs.weights)} of weights among it; {size_str(one['total'] - costs.held)} for its longest "
            f"prompt, {costs.longest} tokens, + {costs.max_new_tokens} new: the KV cache, the forward, the sampling)")
    lo, hi = 1, max(1, costs.samples)
    while lo < hi:  # need grows with the batch: bisect for the last one that fits
        mid = (lo + hi + 1) // 2
        if need(mid)["total"] <= budget:
            lo = mid
        else:
            hi = mid - 1
    return {"batch_size": lo, "budget": budget, **need(lo), "held": costs.held, "weights": costs.weights}


def format_choice(p: dict) -> str:
    return (f"sampling batch {p['batch_size']} rows for {size_str(p['budget'])}: needs {size_str(p['total'])} "
            f"({size_str(p['held'])} held, {size_str(p['weights'])} of weights among it; its largest batch, "
            f"{p['rows']} rows up to {p['longest']} prompt tokens: {size_str(p['cache'])} KV cache, "
            f"{size_str(p['forward'])} forward, {size_str(p['sampling'])} sampling); "
            f"--batch-size {p['batch_size']} reproduces its samples")


def live_bytes():
    """A context manager counting the bytes of the tensors made inside it while they live (`.peak`,
    `.now`): every tensor an op returns, through torch's dispatch (a `TorchDispatchMode`), by its
    storage, counted once however many views share it, until the storage is freed. Tensors made
    before it (the weights) and their views are not counted; nor a kernel's own scratch."""
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode

    def tensors(x):  # an op's arguments or results: tensors, in lists and tuples (pytree is slower)
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from tensors(v)

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live: dict[int, tuple] = {}  # storage -> (weak reference, bytes)
            self.now = self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # an output on an input's storage is a view or an in-place result: new bytes only if that
            # storage was made inside (then it is counted already), not a weight's transpose
            inputs = {t.untyped_storage()._cdata for t in tensors((args, tuple((kwargs or {}).values())))}
            for t in tensors(out):
                if t.device.type != "meta":
                    s = t.untyped_storage()
                    seen = self.live.get(s._cdata)
                    if seen is None and s._cdata in inputs:
                        continue
                    if seen is None or seen[0].expired():  # new, or a freed one's address reused
                        self.now += s.nbytes() - (seen[1] if seen else 0)
                        self.live[s._cdata] = (StorageWeakRef(s), s.nbytes())
            if self.now > self.peak:  # a new peak only counts storages still alive
                for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
                    self.now -= self.live.pop(key)[1]
                self.peak = max(self.peak, self.now)
            return out

    return LiveBytes()
