"""`directpo eval`: reward, KL to the reference, length and win rate of a policy (paper §6, Fig. 2/3).

For each sampling temperature: n completions per held-out prompt from π, then
* reward: mean ± standard error of a reward model or callable over the samples;
* win rate against the prompts' reference completions (a preference file's `chosen`, or a
  `reference` field), judged by a chat endpoint (`--judge-url`), a local reward model or classifier
  (`directpo.eval.judge.build_judge`), else by the reward (higher wins); with its bootstrap interval
  over prompts and the length-controlled win rate (`directpo.eval.winrate`);
* length: generated tokens per completion (EOS not counted).

KL(π‖πref) at the sequence level is estimated from samples of π itself (temperature 1, top-p 1):
the mean over samples of log π(y|x) − log πref(y|x), both computed by `directpo.logprobs` on the
same token ids (the ids generated, EOS included) at the same precision. It is an unbiased
estimate of Σ_y π(y|x)·log(π(y|x)/πref(y|x)) (over sequences of at most max_new_tokens tokens);
its standard error is the samples' standard deviation / √N. Samples at other temperatures come
from another distribution, so the KL is computed once, from temperature-1 samples (drawn for the
purpose when 1.0 is not in the sweep).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..console import log
from ..data import SkipReport, TokenizedExample, make_collate
from ..data.formats import write_jsonl
from ..data.prompts import load_prompts
from ..diskio import write_text
from ..errors import UserValueError
from ..logprobs import dataset_logps
from ..models import check_vocab, load_model_or_adapter, load_tokenizer, pick_device
from ..precision import resolve_precision
from .sample import Samples, draw_samples, encode_samples
from .sampling import sampling_batch_size
from .scorers import as_scorer

# Copied from the headline temperature's entry to the top level of the results.
HEADLINE_KEYS = ("reward_mean", "reward_se", "length_mean", "win_rate", "win_rate_se", "win_rate_ci", "win_rate_lc",
                 "win_rate_lc_ci", "judged", "judge_kind", "judge_consistency", "judge_failures",
                 "judge_parse_failures")


def mean_se(values) -> tuple[float, float]:
    x = torch.as_tensor(list(values), dtype=torch.float64)
    if x.numel() == 0:
        return float("nan"), float("nan")
    se = x.std(unbiased=True).item() / math.sqrt(x.numel()) if x.numel() > 1 else float("nan")
    return x.mean().item(), se


def completion_logps(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                     batch_size: int = 16, precision: str = "fp32", device=None) -> torch.Tensor:
    """(N,) log π(y|x) of given completions (token ids) after given prompts, via directpo.logprobs."""
    device = device or next(model.parameters()).device
    examples = [TokenizedExample(list(p), [list(c)]) for p, c in zip(prompt_ids, completion_ids)]
    dtype = torch.bfloat16 if resolve_precision(precision, device)[0] == "bf16" else None
    return dataset_logps(model, examples, make_collate("padded", pad_id), batch_size, device, dtype)[:, 0]


def sequence_kl(policy, ref, samples: Samples, pad_id: int, batch_size: int = 16,
                precision: str = "fp32") -> dict:
    """Sample estimate of KL(π‖πref): mean and standard error of log π(y|x) − log πref(y|x), y ~ π."""
    pol = completion_logps(policy, samples.prompt_ids, samples.completion_ids, pad_id, batch_size, precision)
    ref_lp = completion_logps(ref, samples.prompt_ids, samples.completion_ids, pad_id, batch_size, precision)
    kl, se = mean_se((pol - ref_lp).tolist())
    return {"kl_mean": kl, "kl_se": se, "kl_samples": len(samples.texts), "logps": pol, "ref_logps": ref_lp}


def _finite_or_none(obj):
    """NaN/inf -> null, so the results file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


def check_same_tokenizer(tok, ref_tok, model: str, ref: str) -> None:
    if tok.get_vocab() != ref_tok.get_vocab():
        raise UserValueError(f"--ref {ref}: its tokenizer differs from {model}'s; KL(π‖πref) needs both models to "
                             "score the same token ids")


def _error_bars(entries: list, key: str, ys: list):
    """The error bars of a panel: the bootstrap interval of the win rate when the entries carry one
    (asymmetric, [below, above]), else ± the standard error; 0 where unknown."""
    def known(v):
        return v is not None and not (isinstance(v, float) and math.isnan(v))

    if key == "win_rate" and any(known((e.get("win_rate_ci") or [None])[0]) for e in entries):
        below, above = [], []
        for e, y in zip(entries, ys):
            lo, hi = e.get("win_rate_ci") or [None, None]
            ok = known(lo) and known(hi) and known(y)
            below.append(max(y - lo, 0.0) if ok else 0.0)
            above.append(max(hi - y, 0.0) if ok else 0.0)
        return [below, above]
    err = [e.get(key.replace("_mean", "_se") if key.endswith("_mean") else key + "_se") for e in entries]
    return [v if known(v) else 0.0 for v in err]


def plot_sweep(results: dict, path: str) -> None:
    """Reward, win rate and length against the sampling temperature (the paper's Fig. 2 right / Fig. 3);
    the win rate's error bars are its bootstrap interval when the results carry one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = results["temperatures"]
    temps = [e["temperature"] for e in entries]
    panels = [(k, label) for k, label in (("reward_mean", "mean reward"), ("win_rate", "win rate vs reference"),
                                          ("length_mean", "length (tokens)"))
              if any(k in e and e[k] is not None and not math.isnan(e[k]) for e in entries)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        ys = [float("nan") if e.get(key) is None else e[key] for e in entries]
        ax.errorbar(temps, ys, yerr=_error_bars(entries, key, ys), marker="o", capsize=3)
        ax.set_xlabel("sampling temperature")
        ax.set_ylabel(label)
        if key == "win_rate":
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    kl = results.get("kl_mean")
    title = Path(results["model"]).name + (f"   KL(π‖πref) = {kl:.3g} ± {results['kl_se']:.2g} nats"
                                            if kl is not None else "")
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_policy(model: str, prompts: str, out: str, ref: str | None = None, reward=None, judge=None, n: int = 1,
                    temperatures=(1.0,), max_new_tokens: int = 128, top_p: float = 1.0, seed: int = 0,
                    batch_size: int = 16, max_prompt_length: int | None = None, device: str | None = None,
                    precision: str = "fp32", plot: str | None = None, samples_out: str | None = None,
                    on_invalid: str = "error", split: str | None = None, progress: bool = True,
                    memory_budget: str | None = None) -> dict:
    """`reward`: a scorer `(prompts, completions) -> list[float]` (or None); `judge`: a ChatJudge or
    RewardJudge for win rates, e.g. from `directpo.eval.judge.build_judge` (None: the reward judges,
    when references exist). Each temperature's entry carries the judge's summary (win_rate,
    win_rate_ci, win_rate_lc, win_rate_lc_ci, judge_kind, ...); the n samples of a prompt are one
    cluster of the win rate's bootstrap. `memory_budget`: the sampling batch that fits it (one plan for
    every temperature) instead of `batch_size`, which still scores."""
    from .judge import RewardJudge

    reward = as_scorer(reward) if reward is not None else None
    temperatures = [float(t) for t in temperatures]
    if not temperatures:
        raise UserValueError("give at least one temperature")
    dev = pick_device(device)
    precision = resolve_precision(precision, dev)[0]
    report = SkipReport()
    items = load_prompts(prompts, on_invalid, split, report)
    tokenizer = load_tokenizer(model)
    if ref is not None:  # before sampling: a reference that cannot score π's tokens is refused first
        check_same_tokenizer(tokenizer, load_tokenizer(ref), model, ref)
    policy = load_model_or_adapter(model, dev)
    check_vocab(tokenizer, policy, model)
    policy.eval()
    references = [it.reference for it in items]
    has_refs = all(r is not None for r in references)
    if judge is None and reward is not None and has_refs:
        judge = RewardJudge(reward, seed=seed)
    draws = sampling_batch_size(policy, tokenizer, encode_samples(tokenizer, items, n, max_prompt_length),
                                max_new_tokens, top_p, batch_size, memory_budget)  # the samples depend on it
    results: dict = {"model": model, "ref": ref, "prompts": prompts, "num_prompts": len(items),
                     "skipped_rows": report.total, "n": n, "max_new_tokens": max_new_tokens, "top_p": top_p,
                     "seed": seed, "precision": precision, "sampling_batch_size": draws, "temperatures": []}
    sample_rows = []
    kl_samples = None
    for ti, t in enumerate(temperatures):
        s = draw_samples(policy, tokenizer, items, n, max_new_tokens, t, top_p, seed + 100_003 * ti, draws,
                         max_prompt_length, progress=f"sampling T={t:g}" if progress else None)
        entry: dict = {"temperature": t, "samples": len(s.texts)}
        lengths = s.lengths(tokenizer.eos_token_id)
        entry["length_mean"], entry["length_se"] = mean_se(lengths)
        rewards = None
        if reward is not None:
            rewards = reward(s.prompts, s.texts)
            entry["reward_mean"], entry["reward_se"] = mean_se(rewards)
        if judge is not None and has_refs:
            refs = [references[k // n] for k in range(len(s.texts))]
            clusters = [k // n for k in range(len(s.texts))]  # the prompt: its n samples are not independent
            entry.update(judge.judge(s.prompts, s.texts, refs, clusters=clusters).summary())
        results["temperatures"].append(entry)
        if t == 1.0 and top_p == 1.0:
            kl_samples = s
        sample_rows += _sample_rows(s, t, lengths, rewards)
    if ref is not None:
        if kl_samples is None:  # KL needs samples of π itself
            kl_samples = draw_samples(policy, tokenizer, items, n, max_new_tokens, 1.0, 1.0, seed + 7, draws,
                                      max_prompt_length, progress="sampling for KL (T=1)" if progress else None)
        ref_model = load_model_or_adapter(ref, dev)
        check_vocab(tokenizer, policy, model, ref_model, ref)
        kl = sequence_kl(policy, ref_model, kl_samples, tokenizer.pad_token_id, batch_size, precision)
        results.update({k: kl[k] for k in ("kl_mean", "kl_se", "kl_samples")})
        results["kl_temperature"] = 1.0
    # Headline numbers: the temperature-1 entry if swept, else the first.
    main = next((e for e in results["temperatures"] if e["temperature"] == 1.0), results["temperatures"][0])
    for key in HEADLINE_KEYS:
        if key in main:
            results[key] = main[key]
    results["headline_temperature"] = main["temperature"]
    results = _finite_or_none(results)
    written = write_outputs(results, sample_rows, out, samples_out, plot)
    parts = [f"{k} {results[k]:.4g}" for k in ("reward_mean", "kl_mean", "win_rate", "win_rate_lc", "length_mean")
             if results.get(k) is not None]
    log(f"eval of {model} on {len(items)} prompts × {n}: {', '.join(parts)} -> {', '.join(written)}")
    return results


def _sample_rows(s: Samples, t: float, lengths: list[int], rewards: list[float] | None) -> list[dict]:
    """The --samples-out lines of one temperature's samples."""
    rows = []
    for k, text in enumerate(s.texts):
        row = {"temperature": t, "prompt_index": k // s.n, "index": k % s.n, "prompt": s.prompt_of(k).prompt,
               "completion": text, "completion_tokens": lengths[k]}
        if rewards is not None:
            row["reward"] = rewards[k]
        rows.append(row)
    return rows


def write_outputs(results: dict, sample_rows: list, out: str, samples_out: str | None, plot: str | None) -> list[str]:
    """The results JSON, the samples JSONL and the plot; their final paths (what to report)."""
    written = [str(write_json(results, out))]
    if samples_out:
        written.append(str(write_jsonl(sample_rows, samples_out)))
    if plot:
        plot_sweep(results, plot)
        written.append(str(plot))
    return written


def write_json(obj, path) -> Path:
    """`obj` as indented JSON, written to a temporary sibling and renamed (whole or absent); the
    final path, never the temporary one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, json.dumps(obj, indent=2))
