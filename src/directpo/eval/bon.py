"""`directpo bon`: Best-of-N (the paper's baseline, §6.2): N samples per prompt from a model, scored
by a reward model or callable, the best kept.

Best-of-N needs no training; its KL to the sampling model is at most log N − (N − 1)/N nats
(Stiennon et al., 2020; the bound is exact when rewards have no ties), which each output reports.
"""
from __future__ import annotations

import math

from ..console import log
from ..data.formats import SkipReport, write_jsonl
from ..data.prompts import load_prompts
from ..errors import UserValueError
from ..models import load_model_or_adapter, load_tokenizer, pick_device, suppress_eos
from .evaluate import mean_se
from .sample import draw_samples, image_processor
from .scorers import as_scorer


def bon_kl(n: int) -> float:
    """KL(best-of-n ‖ base) for distinct rewards: log n − (n − 1)/n."""
    return math.log(n) - (n - 1) / n


def best_of_n(model: str, prompts: str, out: str, n: int, reward, max_new_tokens: int = 128,
              temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
              max_prompt_length: int | None = None, device: str | None = None, on_invalid: str = "error",
              split: str | None = None, progress: bool = True, memory_budget: str | None = None,
              fixed_length: bool = False) -> dict:
    """One JSON line per prompt: prompt_index, prompt, completion (the best), reward, index (which of
    the N), rewards (all N), completions (all N). `memory_budget`: the sampling batch that fits it
    instead of `batch_size` (in the result: `sampling_batch_size`)."""
    if n < 1:
        raise UserValueError(f"n must be ≥ 1, got {n}")
    reward = as_scorer(reward)
    report = SkipReport()
    items = load_prompts(prompts, on_invalid, split, report)
    processor = image_processor(model, items)  # image prompts: a vision-language model's (None for text)
    if processor is not None:
        from ..vision import load_vision_model

        tokenizer, policy = processor.tokenizer, load_vision_model(model, pick_device(device))
    else:
        tokenizer, policy = load_tokenizer(model), load_model_or_adapter(model, pick_device(device))
    suppress_eos(policy, tokenizer, fixed_length)  # --fixed-length: the N samples never end early
    s = draw_samples(policy, tokenizer, items, n, max_new_tokens, temperature, top_p, seed, batch_size,
                     max_prompt_length, progress=f"sampling {n} per prompt" if progress else None,
                     memory_budget=memory_budget, processor=processor)
    rewards = reward(s.prompts, s.texts)
    rows, best_rewards, first_rewards = [], [], []
    for i, it in enumerate(items):
        rs = rewards[i * n:(i + 1) * n]
        j = max(range(n), key=lambda k: rs[k])  # first of the best on ties
        best_rewards.append(rs[j])
        first_rewards.append(rs[0])
        rows.append({"prompt_index": i, "prompt": it.prompt, "completion": s.texts[i * n + j], "reward": rs[j],
                     "index": j, "rewards": rs, "completions": s.texts[i * n:(i + 1) * n]})
    write_jsonl(rows, out)
    best, best_se = mean_se(best_rewards)
    base, base_se = mean_se(rewards)
    result = {"prompts": len(items), "n": n, "skipped": report.total, "reward_mean": best, "reward_se": best_se,
              "sample_reward_mean": base, "sample_reward_se": base_se, "kl_bound": bon_kl(n),
              "sampling_batch_size": s.batch_size, "out": out}
    log(f"best-of-{n} on {len(items)} prompts: reward {best:.4f} ± {best_se:.4f} (single samples "
          f"{base:.4f}), KL ≤ {bon_kl(n):.3f} nats -> {out}")
    return result
