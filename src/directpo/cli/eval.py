"""`directpo score`, `sample`, `bon`, `eval`: scoring pairs, sampling, Best-of-N, evaluation."""
from __future__ import annotations

import argparse
import json
import os

from .args import (HelpFormatter, check_outputs, float_in, int_at_least, optional_int, overwrite_flag, positive)


def _temperatures(s: str) -> list[float]:
    try:
        values = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0.25,0.5,0.75,1.0; got {s!r}")
    if not values or any(not 0 <= v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected temperatures ≥ 0, got {s!r}")
    return values


def _rate_below_one(s: str) -> float:
    """A fraction in [0, 1): 1 would accept a judge that failed every call."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not 0 <= v < 1:  # NaN too
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {s}")
    return v


def _generation_flags(p: argparse.ArgumentParser, n_default: int | None = 1, temperature: bool = True) -> None:
    if n_default is not None:
        p.add_argument("--n", type=positive, default=n_default, help="samples per prompt (≥ 1)")
    p.add_argument("--max-new-tokens", type=positive, default=128, help="max tokens per completion (≥ 1)")
    if temperature:
        p.add_argument("--temperature", type=float_in(0, lo_open=False), default=1.0,
                       help="sampling temperature (≥ 0; 0: greedy)")
    p.add_argument("--top-p", type=float_in(0, 1), default=1.0, help="nucleus sampling threshold, in (0, 1] (1: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same settings, same samples)")
    p.add_argument("--batch-size", type=positive, default=16, help="sequences generated / scored at once (≥ 1)")
    p.add_argument("--max-prompt-length", type=optional_int, default=None,
                   help="max prompt tokens (≥ 1); longer prompts are cut from the left (default: no limit)")
    p.add_argument("--on-invalid", choices=["error", "skip"], default="error", help="bad prompt rows")
    p.add_argument("--data-split", default=None, help="split name for `datasets` sources (default: train)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    overwrite_flag(p)


def _reward_flags(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--reward-model", help="reward model directory (`directpo rm` output)")
    g.add_argument("--reward-fn", help="reward callable module:function, f(prompt, completion) -> float "
                                       "(module imported from sys.path, then the current directory); "
                                       "built in: directpo.eval.scorers:review_sentiment, "
                                       "directpo.eval.scorers:vader_sentiment")


def _score_flags(s) -> None:
    s.add_argument("--model", required=True, help="model to score with (hub id or local dir)")
    s.add_argument("--data", required=True, help="preference data (same formats as train)")
    s.add_argument("--out", required=True, help="output JSONL: one line per pair, in input order")
    s.add_argument("--ref", help="reference model: adds implicit rewards β·(log π − log πref)")
    s.add_argument("--beta", type=float_in(0), default=0.1, help="β of the implicit reward (> 0)")
    s.add_argument("--max-length", type=optional_int, default=512, help="max tokens of prompt + response (≥ 1)")
    s.add_argument("--max-prompt-length", type=optional_int, default=None,
                   help="max prompt tokens (≥ 1) (default: no limit)")
    s.add_argument("--batch-size", type=positive, default=8, help="pairs scored at once (≥ 1)")
    s.add_argument("--on-invalid", choices=["error", "skip"], default="error", help="bad rows")
    s.add_argument("--data-split", default=None, help="split name for `datasets` sources (default: train)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 where this device runs it fast, else fp32 (see `directpo train --help`)")
    s.add_argument("--layout", choices=["packed", "padded"], default="packed",
                   help="packed: each prompt computed once (exact); padded: one row per prompt+response")
    overwrite_flag(s)


def run_score(args) -> int:
    check_outputs({"--out": args.out}, {"--data": args.data}, args.overwrite)
    from ..eval.score import score

    result = score(args.model, args.data, args.out, ref=args.ref, beta=args.beta, max_length=args.max_length,
                   max_prompt_length=args.max_prompt_length, batch_size=args.batch_size, on_invalid=args.on_invalid,
                   device=args.device, precision=args.precision, split=args.data_split, layout=args.layout)
    print(json.dumps(result))
    return 0


def run_sample(args) -> int:
    check_outputs({"--out": args.out}, {"--prompts": args.prompts}, args.overwrite)
    from ..eval.sampling import sample

    print(json.dumps(sample(args.model, args.prompts, args.out, n=args.n, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            batch_size=args.batch_size, max_prompt_length=args.max_prompt_length,
                            device=args.device, on_invalid=args.on_invalid, split=args.data_split,
                            progress=args.progress)))
    return 0


def _scorer(args):
    from ..eval.scorers import load_reward_fn

    if args.reward_model is None and args.reward_fn is None:
        return None
    return load_reward_fn(args.reward_model, args.reward_fn, device=args.device, batch_size=args.batch_size)


def run_bon(args) -> int:
    check_outputs({"--out": args.out}, {"--prompts": args.prompts}, args.overwrite)
    from ..eval.bon import best_of_n

    print(json.dumps(best_of_n(args.model, args.prompts, args.out, args.n, _scorer(args),
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                               seed=args.seed, batch_size=args.batch_size, max_prompt_length=args.max_prompt_length,
                               device=args.device, on_invalid=args.on_invalid, split=args.data_split,
                               progress=args.progress)))
    return 0


_SUMMARY_KEYS = ("reward_mean", "reward_se", "kl_mean", "kl_se", "length_mean", "win_rate", "win_rate_ci",
                 "win_rate_lc", "win_rate_lc_ci", "judge_kind", "judge_consistency", "judge_failures",
                 "judge_parse_failures")


def run_eval(args) -> int:
    from ..eval.evaluate import evaluate_policy
    from ..eval.judge import build_judge

    template = args.judge_prompt if os.path.isfile(args.judge_prompt) else None  # a template file
    check_outputs({"--out": args.out, "--samples-out": args.samples_out, "--plot": args.plot},
                  {"--prompts": args.prompts, "--judge-prompt": template}, args.overwrite)
    local_judge = args.judge_reward_model or args.judge_classifier
    if args.reward_model is None and args.reward_fn is None and args.judge_url is None and not local_judge:
        raise ValueError("give --reward-model, --reward-fn or --judge-url (with --judge-model), or a local judge: "
                         "--judge-reward-model or --judge-classifier")
    if args.judge_model and not args.judge_url:
        raise ValueError("--judge-model names the model of --judge-url; give --judge-url too")
    judge = build_judge(url=args.judge_url, model=args.judge_model, prompt=args.judge_prompt,
                        reward_model=args.judge_reward_model, classifier=args.judge_classifier,
                        classifier_label=args.judge_classifier_label, device=args.device, seed=args.seed,
                        order=args.judge_order, retries=args.judge_retries, backoff=args.judge_backoff,
                        max_failure_rate=args.judge_max_failure_rate, timeout=args.judge_timeout,
                        workers=args.judge_workers)
    temps = args.temperatures if args.temperatures is not None else [args.temperature]
    res = evaluate_policy(args.model, args.prompts, args.out, ref=args.ref, reward=_scorer(args), judge=judge, n=args.n,
                   temperatures=temps, max_new_tokens=args.max_new_tokens, top_p=args.top_p, seed=args.seed,
                   batch_size=args.batch_size, max_prompt_length=args.max_prompt_length, device=args.device,
                   precision=args.precision, plot=args.plot, samples_out=args.samples_out,
                   on_invalid=args.on_invalid, split=args.data_split, progress=args.progress)
    summary = {k: res.get(k) for k in _SUMMARY_KEYS if k in res}
    summary.update({k: getattr(args, k) for k in ("out", "samples_out", "plot") if getattr(args, k)})  # final paths
    print(json.dumps(summary))
    return 0


def _sample_flags(s) -> None:
    s.add_argument("--model", required=True, help="model to sample from (hub id or local dir)")
    s.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field, or a preference file")
    s.add_argument("--out", required=True, help="output JSONL: prompt_index, index, prompt, completion")
    _generation_flags(s)


def _bon_flags(b) -> None:
    b.add_argument("--model", required=True, help="model to sample from")
    b.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field, or a preference file")
    b.add_argument("--out", required=True, help="output JSONL: one line per prompt, best completion and all rewards")
    b.add_argument("--n", type=positive, required=True, help="samples per prompt (N ≥ 1)")
    _reward_flags(b)
    _generation_flags(b, n_default=None)


def _judge_flags(e) -> None:
    g = e.add_mutually_exclusive_group()
    g.add_argument("--judge-url", help="OpenAI-compatible endpoint base URL (POST {url}/chat/completions); API key "
                                       "from DIRECTPO_JUDGE_API_KEY or OPENAI_API_KEY")
    g.add_argument("--judge-reward-model", metavar="DIR",
                   help="judge locally with a reward model (`directpo rm` output): higher wins; not an LLM judge")
    g.add_argument("--judge-classifier", metavar="NAME_OR_DIR",
                   help="judge locally with a Hugging Face sequence classifier: higher P(--judge-classifier-label) "
                        "wins (a one-output model: higher logit); not an LLM judge")
    e.add_argument("--judge-classifier-label", default=None,
                   help="the classifier's 'good' class, by name or index (default: the class named 'positive')")
    e.add_argument("--judge-model", help="model name sent to the judge endpoint")
    e.add_argument("--judge-prompt", default="dialogue",
                   help="judge prompt: dialogue, summary (the paper's GPT-4 prompts), or a template file with "
                        "{query}, {a}, {b}")
    e.add_argument("--judge-order", choices=["swap", "random"], default="swap",
                   help="swap: ask each comparison in both orders (disagreeing verdicts are a tie); random: once, "
                        "the policy's side a seeded coin flip")
    e.add_argument("--judge-workers", type=positive, default=4, help="parallel judge requests (≥ 1)")
    e.add_argument("--judge-timeout", type=float_in(0), default=60.0, help="seconds per judge request (> 0)")
    e.add_argument("--judge-retries", type=int_at_least(0), default=3,
                   help="retries of a judge call after a connection error, timeout or HTTP 408/429/5xx (≥ 0)")
    e.add_argument("--judge-backoff", type=float_in(0, lo_open=False), default=1.0,
                   help="seconds before the first retry, doubling (jittered, at most 30; a Retry-After is honoured)")
    e.add_argument("--judge-max-failure-rate", type=_rate_below_one, default=0.1,
                   help="stop with an error when more than this fraction of the comparisons fail after retries, "
                        "in [0, 1)")


def _eval_flags(e) -> None:
    e.add_argument("--model", required=True, help="the policy π")
    e.add_argument("--ref", required=True, help="the reference πref of the KL (same tokenizer)")
    e.add_argument("--prompts", required=True, help="prompts; a preference file's chosen responses (or a "
                                                    "'reference' field) are the references for win rates")
    e.add_argument("--out", required=True, help="results JSON")
    _reward_flags(e, required=False)
    _judge_flags(e)
    e.add_argument("--temperatures", type=_temperatures, default=None,
                   help="comma-separated sweep, e.g. 0.25,0.5,0.75,1.0 (default: --temperature)")
    e.add_argument("--plot", help="PNG of reward / win rate / length against temperature")
    e.add_argument("--samples-out", help="also write every sample (and its reward) to this JSONL")
    e.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="log-prob precision (KL); auto: bf16 where this device runs it fast, else fp32")
    _generation_flags(e)


_COMMANDS = {"score": (_score_flags, run_score), "sample": (_sample_flags, run_sample), "bon": (_bon_flags, run_bon),
             "eval": (_eval_flags, run_eval)}


def register(command: str, parser) -> None:
    add, run = _COMMANDS[command]
    parser.formatter_class = HelpFormatter
    add(parser)
    parser.set_defaults(func=run)
