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

Image prompts (issue #30), with a vision-language `model`: the samples are drawn as `directpo sample`
draws them (`draw_samples` with the model's processor: conditioned on the images); rewards and
judges read the text (a text reward model scores the prompt's text, its image parts left out, and
the completion); the KL's log-probs come from forwards given each prompt's image tensors (and
Qwen2-VL's M-RoPE positions), the very encoding the sampler used, with the n samples of a prompt
the responses of one packed example (its images encoded once). `ref` must then be a
vision-language model of the same family: it is given the same image tensors.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from ..console import log, warn
from ..data import SkipReport, TokenizedExample, make_collate
from ..data.formats import write_jsonl
from ..data.prompts import load_prompts
from ..diskio import write_text
from ..errors import UserValueError
from ..logprobs import dataset_logps, packed_row_tokens
from ..models import check_vocab, load_model_or_adapter, load_tokenizer, pick_device, suppress_eos, unwrap_peft
from ..precision import resolve_precision
from .sample import Samples, draw_samples, encode_image_samples, encode_samples, image_processor
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


def image_completion_logps(model, samples: Samples, pad_id: int, batch_size: int = 16, precision: str = "fp32",
                           device=None) -> torch.Tensor:
    """(N,) log π(y|x) of image prompts' samples (`samples.vision`: each prompt as the sampler encoded
    it), from forwards given the prompt's image tensors and, for Qwen2-VL, its M-RoPE positions, as
    training computes a response's: the n samples of a prompt are the responses of one example of
    the packed layout (`collate_packed`), so its images are encoded once, each sample seeing the
    prompt and itself. `batch_size` counts samples, as for text.

    NaN for a sample holding the model's image placeholder token: the sampler fed it back as a
    plain token, but a forward given images takes every placeholder for an image's (and refuses
    the count), so its log-prob under π with the images cannot be computed."""
    device = device or next(model.parameters()).device
    n, comps = samples.n, samples.completion_ids
    placeholder = image_token_id(model)
    out = torch.full((len(comps),), float("nan"))
    examples, kept = [], []
    for i in range(len(comps) // n):
        ks = [k for k in range(i * n, (i + 1) * n) if placeholder not in comps[k]]
        if ks:  # (a sample is never empty, max_new_tokens ≥ 1 and the EOS kept, as a packed response must not be)
            examples.append(replace(samples.vision[i * n], response_ids=[list(comps[k]) for k in ks]))
            kept.append(ks)
    if examples:
        dtype = torch.bfloat16 if resolve_precision(precision, device)[0] == "bf16" else None
        collate = make_collate("packed", pad_id, packed_row_tokens(None, model))
        lp = dataset_logps(model, examples, collate, max(1, batch_size // n), device, dtype)
        for e, ks in enumerate(kept):
            out[ks] = lp[e, :len(ks)]
    return out


def image_token_id(model) -> int | None:
    """The id a vision-language model replaces with image features (its config's image_token_id)."""
    config = unwrap_peft(model).config
    return getattr(config, "image_token_id", getattr(config, "image_token_index", None))


def sample_logps(model, samples: Samples, pad_id: int, batch_size: int = 16, precision: str = "fp32") -> torch.Tensor:
    """(N,) log-probs of the samples' completions under `model`: with their prompts' images when
    they have them (`image_completion_logps`), else `completion_logps` on the ids."""
    if samples.vision is not None:
        return image_completion_logps(model, samples, pad_id, batch_size, precision)
    return completion_logps(model, samples.prompt_ids, samples.completion_ids, pad_id, batch_size, precision)


def sequence_kl(policy, ref, samples: Samples, pad_id: int, batch_size: int = 16,
                precision: str = "fp32") -> dict:
    """Sample estimate of KL(π‖πref): mean and standard error of log π(y|x) − log πref(y|x), y ~ π."""
    pol = sample_logps(policy, samples, pad_id, batch_size, precision)
    ref_lp = sample_logps(ref, samples, pad_id, batch_size, precision)
    diff, extra = pol - ref_lp, {}
    if samples.vision is not None:  # image prompts: samples holding an image placeholder are left out (NaN)
        extra["kl_excluded"] = int(diff.isnan().sum())
        diff = diff[~diff.isnan()]
        if extra["kl_excluded"]:
            warn(f"KL(π‖πref): {extra['kl_excluded']} of {len(samples.texts)} samples left out: they hold the "
                 "model's image placeholder token, which a forward given the images reads as an image's")
    kl, se = mean_se(diff.tolist())
    return {"kl_mean": kl, "kl_se": se, "kl_samples": len(diff), "logps": pol, "ref_logps": ref_lp, **extra}


def _finite_or_none(obj):
    """NaN/inf -> null, so the results file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


def check_image_ref(model: str, ref: str, items: list) -> None:
    """With image prompts, `ref` must read the images as `model` does: a vision-language model of
    the same family (both are given the same image tensors); else one line naming both, before
    anything loads."""
    from ..models import is_adapter_dir, load_config
    from ..vision import is_vision_model

    rows = sum(bool(it.images) for it in items)
    where = f"images in {items[0].source} ({rows} row{'s' * (rows != 1)})"
    if is_adapter_dir(ref):
        raise UserValueError(f"{where}, but --ref {ref} is an adapter directory: image prompts are not scored with "
                             "adapters yet (issue #30); give the vision-language model's directory")
    if not is_vision_model(ref):
        raise UserValueError(f"{where}: --model {model} reads them but --ref {ref} is a text-only model, which would "
                             "score the text alone; KL(π‖πref) needs a vision-language --ref of --model's family")
    kinds = [load_config(name).model_type for name in (model, ref)]
    if kinds[0] != kinds[1]:
        raise UserValueError(f"{where}: --ref {ref} is a {kinds[1]} model and --model {model} a {kinds[0]} one; "
                             "both are given the same image tensors, so --ref must be of --model's family")


def load_policy(model: str, ref: str | None, items: list, dev) -> tuple:
    """(tokenizer, policy, processor, load): the policy to sample from and how to load `ref`. With
    image prompts, a vision-language model, its processor and `load_vision_model` (a text-only model
    refused by `image_processor`); else the causal LM (or adapter), processor None. A reference that
    cannot score π's tokens (or images) is refused before the policy loads."""
    processor = image_processor(model, items)
    if processor is None:
        tokenizer, load = load_tokenizer(model), load_model_or_adapter
    else:
        from ..vision import load_vision_model

        if ref is not None:
            check_image_ref(model, ref, items)
        tokenizer, load = processor.tokenizer, load_vision_model
    if ref is not None:
        check_same_tokenizer(tokenizer, load_tokenizer(ref), model, ref)
    policy = load(model, dev)
    check_vocab(tokenizer, policy, model)
    policy.eval()
    return tokenizer, policy, processor, load


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


def _sampling_batch(policy, tokenizer, processor, items: list, n: int, max_prompt_length: int | None,
                    max_new_tokens: int, top_p: float, batch_size: int, memory_budget: str | None) -> int:
    """`batch_size`, or with `memory_budget` the batch that fits it, planned on the prompts as they are
    sampled: token ids, or with a processor the image prompts (their image tokens and pictures)."""
    if processor is None:
        return sampling_batch_size(policy, tokenizer, encode_samples(tokenizer, items, n, max_prompt_length),
                                   max_new_tokens, top_p, batch_size, memory_budget)
    vision = encode_image_samples(processor, items, n, max_prompt_length) if memory_budget is not None else None
    return sampling_batch_size(policy, tokenizer, [v.prompt_ids for v in vision or []], max_new_tokens, top_p,
                               batch_size, memory_budget, vision)


def evaluate_policy(model: str, prompts: str, out: str, ref: str | None = None, reward=None, judge=None, n: int = 1,
                    temperatures=(1.0,), max_new_tokens: int = 128, top_p: float = 1.0, seed: int = 0,
                    batch_size: int = 16, max_prompt_length: int | None = None, device: str | None = None,
                    precision: str = "fp32", plot: str | None = None, samples_out: str | None = None,
                    on_invalid: str = "error", split: str | None = None, progress: bool = True,
                    memory_budget: str | None = None, fixed_length: bool = False) -> dict:
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
    tokenizer, policy, processor, load = load_policy(model, ref, items, dev)
    suppress_eos(policy, tokenizer, fixed_length)  # --fixed-length: samples and KL are π''s (`models.suppress_token`)
    references = [it.reference for it in items]
    has_refs = all(r is not None for r in references)
    if judge is None and reward is not None and has_refs:
        judge = RewardJudge(reward, seed=seed)
    draws = _sampling_batch(policy, tokenizer, processor, items, n, max_prompt_length, max_new_tokens, top_p,
                            batch_size, memory_budget)  # the samples depend on it
    images = {} if processor is None else {"processor": processor}  # image prompts: sampled as `sample` does
    results: dict = {"model": model, "ref": ref, "prompts": prompts, "num_prompts": len(items),
                     "skipped_rows": report.total, "n": n, "max_new_tokens": max_new_tokens, "top_p": top_p,
                     "seed": seed, "precision": precision, "sampling_batch_size": draws, "temperatures": [],
                     **({"fixed_length": True} if fixed_length else {})}  # (absent otherwise: as before)
    if processor is not None:  # (absent for text prompts: their results file is as before)
        results["image_prompts"] = sum(bool(it.images) for it in items)
    sample_rows = []
    kl_samples = None
    for ti, t in enumerate(temperatures):
        s = draw_samples(policy, tokenizer, items, n, max_new_tokens, t, top_p, seed + 100_003 * ti, draws,
                         max_prompt_length, progress=f"sampling T={t:g}" if progress else None, **images)
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
                                      max_prompt_length, progress="sampling for KL (T=1)" if progress else None,
                                      **images)
        ref_model = load(ref, dev)
        check_vocab(tokenizer, policy, model, ref_model, ref)
        suppress_eos(ref_model, tokenizer, fixed_length)  # KL(π'‖πref'): both renormalised without EOS
        kl = sequence_kl(policy, ref_model, kl_samples, tokenizer.pad_token_id, batch_size, precision)
        results.update({k: kl[k] for k in ("kl_mean", "kl_se", "kl_samples", "kl_excluded") if k in kl})
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
