"""`directpo bon`: Best-of-N (the paper's baseline, §6.2): N samples per prompt from a model, scored
by a reward model or callable, the best kept.

Best-of-N needs no training; its KL to the sampling model is at most log N − (N − 1)/N nats
(Stiennon et al., 2020; the bound is exact when rewards have no ties), which each output reports.
"""
from __future__ import annotations

import math

from ..console import log
from ..data.formats import SkipReport
from ..data.prompts import load_prompts
from ..errors import UserValueError
from ..models import suppress_eos
from .evaluate import mean_se
from .partial import Partial, identity, run_settings
from .sample import draw_resumably, load_sampler
from .sampling import decode
from .scorers import as_scorer


def bon_kl(n: int) -> float:
    """KL(best-of-n ‖ base) for distinct rewards: log n − (n − 1)/n."""
    return math.log(n) - (n - 1) / n


def best_of_n(model: str, prompts: str, out: str, n: int, reward, max_new_tokens: int = 128,
              temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
              max_prompt_length: int | None = None, device: str | None = None, on_invalid: str = "error",
              split: str | None = None, progress: bool = True, memory_budget: str | None = None,
              fixed_length: bool = False, overwrite: bool = False, reward_name: str | None = None) -> dict:
    """One JSON line per prompt: prompt_index, prompt, completion (the best), reward, index (which of
    the N), rewards (all N), completions (all N). `memory_budget`: the sampling batch that fits it
    instead of `batch_size` (in the result: `sampling_batch_size`). Written as it goes to
    `out`.partial, which a rerun continues (`eval.partial`; `overwrite`: not); `reward_name` (the
    --reward-model or --reward-fn) is part of its settings (default: the scorer's path or name)."""
    if n < 1:
        raise UserValueError(f"n must be ≥ 1, got {n}")
    path = getattr(reward, "path", None)  # a RewardModel's folder
    reward_name = reward_name or path or getattr(reward, "__qualname__", type(reward).__qualname__)
    reward = as_scorer(reward)
    report = SkipReport()
    items = load_prompts(prompts, on_invalid, split, report)
    partial = Partial(out, run_settings(model, prompts, device, n=n, max_new_tokens=max_new_tokens,
                                        temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                                        max_prompt_length=max_prompt_length, on_invalid=on_invalid, split=split,
                                        memory_budget=memory_budget, fixed_length=fixed_length, reward=reward_name,
                                        reward_files=identity(path)), 1, overwrite)
    tokenizer, policy, processor = load_sampler(model, items, device)  # image prompts: a vision-language model
    suppress_eos(policy, tokenizer, fixed_length)  # --fixed-length: the N samples never end early

    def rows_of(done: list[int], comps: list[list[list[int]]]) -> dict:
        # scored per batch as prompts complete (what a failing reward loses is the batch in flight); a
        # rerun completes the same prompts in the same batches, so the reward sees the same calls
        texts = [decode(tokenizer, c) for cs in comps for c in cs]
        rewards = reward([items[i].prompt for i in done for _ in range(n)], texts)
        rows = {}
        for a, i in enumerate(done):
            rs, ts = rewards[a * n:(a + 1) * n], texts[a * n:(a + 1) * n]
            j = max(range(n), key=lambda k: rs[k])  # first of the best on ties
            rows[i] = [{"prompt_index": i, "prompt": items[i].prompt, "completion": ts[j], "reward": rs[j],
                        "index": j, "rewards": rs, "completions": ts}]
        return rows

    used = draw_resumably(policy, tokenizer, items, n, partial, rows_of, max_new_tokens, temperature, top_p, seed,
                          batch_size, max_prompt_length, progress=f"sampling {n} per prompt" if progress else None,
                          memory_budget=memory_budget, processor=processor)
    rows = partial.finish()
    best, best_se = mean_se([r["reward"] for r in rows])
    base, base_se = mean_se([x for r in rows for x in r["rewards"]])
    result = {"prompts": len(items), "n": n, "skipped": report.total, "reward_mean": best, "reward_se": best_se,
              "sample_reward_mean": base, "sample_reward_se": base_se, "kl_bound": bon_kl(n),
              "sampling_batch_size": used, "out": out}
    log(f"best-of-{n} on {len(items)} prompts: reward {best:.4f} ± {best_se:.4f} (single samples "
        f"{base:.4f}), KL ≤ {bon_kl(n):.3f} nats -> {out}")
    return result
