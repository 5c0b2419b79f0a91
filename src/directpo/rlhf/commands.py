"""Command-line parsers of the RLHF and evaluation commands: rm, ppo, sample, bon, eval.

Registered by `directpo.cli.make_parser` (like `bench`); `rm` takes the trainer's flags
(`TrainConfig`), `ppo` those of `PPOConfig`, both with `--config FILE.yaml`.
"""
from __future__ import annotations

import argparse
import json


def _optional_int(s: str):
    return None if s.lower() in ("none", "null") else int(s)


def _temperatures(s: str) -> list[float]:
    try:
        values = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0.25,0.5,0.75,1.0; got {s!r}")
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected temperatures ≥ 0, got {s!r}")
    return values


def _generation_flags(p: argparse.ArgumentParser, n_default: int | None = 1, temperature: bool = True) -> None:
    if n_default is not None:
        p.add_argument("--n", type=int, default=n_default, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128, help="max tokens per completion")
    if temperature:
        p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same settings, same samples)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences generated / scored at once")
    p.add_argument("--max-prompt-length", type=_optional_int, default=None,
                   help="max prompt tokens; longer prompts are cut from the left")
    p.add_argument("--on-invalid", choices=["error", "skip"], default="error", help="bad prompt rows")
    p.add_argument("--data-split", default=None, help="split name for `datasets` sources")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _reward_flags(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--reward-model", help="reward model directory (`directpo rm` output)")
    g.add_argument("--reward-fn", help="reward callable module:function, f(prompt, completion) -> float "
                                       "(module imported from sys.path, the current directory included)")


def cmd_sample(args) -> int:
    from ..eval.sampling import sample

    print(json.dumps(sample(args.model, args.prompts, args.out, n=args.n, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            batch_size=args.batch_size, max_prompt_length=args.max_prompt_length,
                            device=args.device, on_invalid=args.on_invalid, split=args.data_split,
                            progress=args.progress)))
    return 0


def cmd_rm(args) -> int:
    from ..cli import build_config
    from .reward_model import train_reward_model

    summary = train_reward_model(build_config(args))
    print(json.dumps({k: summary[k] for k in ("output_dir", "train", "eval", "reward_offset")}))
    return 0


def cmd_ppo(args) -> int:
    from ..cli import build_config
    from .config import PPOConfig
    from .ppo import ppo

    summary = ppo(build_config(args, PPOConfig))
    print(json.dumps(summary))
    return 0


def _scorer(args):
    from .rewards import load_reward_fn

    if args.reward_model is None and args.reward_fn is None:
        return None
    return load_reward_fn(args.reward_model, args.reward_fn, device=args.device, batch_size=args.batch_size)


def cmd_bon(args) -> int:
    from ..eval.bon import best_of_n

    print(json.dumps(best_of_n(args.model, args.prompts, args.out, args.n, _scorer(args),
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                               seed=args.seed, batch_size=args.batch_size, max_prompt_length=args.max_prompt_length,
                               device=args.device, on_invalid=args.on_invalid, split=args.data_split,
                               progress=args.progress)))
    return 0


def cmd_eval(args) -> int:
    from ..eval.evaluate import evaluate
    from ..eval.judge import ChatJudge

    if args.reward_model is None and args.reward_fn is None and args.judge_url is None:
        raise ValueError("give --reward-model, --reward-fn or --judge-url (with --judge-model)")
    judge = None
    if args.judge_url:
        if not args.judge_model:
            raise ValueError("--judge-url needs --judge-model NAME (the model the endpoint serves)")
        judge = ChatJudge(args.judge_url, args.judge_model, prompt=args.judge_prompt, timeout=args.judge_timeout,
                          workers=args.judge_workers, seed=args.seed)
    temps = args.temperatures if args.temperatures is not None else [args.temperature]
    res = evaluate(args.model, args.prompts, args.out, ref=args.ref, reward=_scorer(args), judge=judge, n=args.n,
                   temperatures=temps, max_new_tokens=args.max_new_tokens, top_p=args.top_p, seed=args.seed,
                   batch_size=args.batch_size, max_prompt_length=args.max_prompt_length, device=args.device,
                   precision=args.precision, plot=args.plot, samples_out=args.samples_out,
                   on_invalid=args.on_invalid, split=args.data_split, progress=args.progress)
    print(json.dumps({k: res.get(k) for k in ("reward_mean", "reward_se", "kl_mean", "kl_se", "length_mean",
                                              "win_rate", "judge_parse_failures") if k in res}))
    return 0


def add_rlhf_parsers(sub, add_config_flags) -> None:
    from ..train.config import TrainConfig
    from .config import PPOConfig

    fmt = argparse.ArgumentDefaultsHelpFormatter
    s = sub.add_parser("sample", help="sample completions from a model for a prompt file (JSONL out)",
                       formatter_class=fmt)
    s.add_argument("--model", required=True, help="model to sample from (hub id or local dir)")
    s.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field, or a preference file")
    s.add_argument("--out", required=True, help="output JSONL: prompt_index, index, prompt, completion")
    _generation_flags(s)
    s.set_defaults(func=cmd_sample)

    r = sub.add_parser("rm", help="train a Bradley–Terry reward model (LM + scalar head) on preference pairs",
                       formatter_class=fmt)
    r.add_argument("--config", help="YAML file of settings (keys as the flags)")
    add_config_flags(r, TrainConfig)
    r.set_defaults(func=cmd_rm)

    b = sub.add_parser("bon", help="Best-of-N: N samples per prompt, scored, the best kept", formatter_class=fmt)
    b.add_argument("--model", required=True, help="model to sample from")
    b.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field, or a preference file")
    b.add_argument("--out", required=True, help="output JSONL: one line per prompt, best completion and all rewards")
    b.add_argument("--n", type=int, required=True, help="samples per prompt (N)")
    _reward_flags(b)
    _generation_flags(b, n_default=None)
    b.set_defaults(func=cmd_bon)

    e = sub.add_parser("eval", help="reward, KL(π‖πref), length and win rate of a policy on held-out prompts, "
                                    "over a temperature sweep", formatter_class=fmt)
    e.add_argument("--model", required=True, help="the policy π")
    e.add_argument("--ref", required=True, help="the reference πref of the KL (same tokenizer)")
    e.add_argument("--prompts", required=True, help="prompts; a preference file's chosen responses (or a "
                                                    "'reference' field) are the references for win rates")
    e.add_argument("--out", required=True, help="results JSON")
    _reward_flags(e, required=False)
    e.add_argument("--judge-url", help="OpenAI-compatible endpoint base URL (POST {url}/chat/completions)")
    e.add_argument("--judge-model", help="model name sent to the judge endpoint")
    e.add_argument("--judge-prompt", default="dialogue",
                   help="judge prompt: dialogue, summary (the paper's GPT-4 prompts), or a template file with "
                        "{query}, {a}, {b}")
    e.add_argument("--judge-workers", type=int, default=4, help="parallel judge requests")
    e.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge request")
    e.add_argument("--temperatures", type=_temperatures, default=None,
                   help="comma-separated sweep, e.g. 0.25,0.5,0.75,1.0 (default: --temperature)")
    e.add_argument("--plot", help="PNG of reward / win rate / length against temperature")
    e.add_argument("--samples-out", help="also write every sample (and its reward) to this JSONL")
    e.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="log-prob precision (KL)")
    _generation_flags(e)
    e.set_defaults(func=cmd_eval)

    pp = sub.add_parser("ppo", help="PPO against a reward model or callable with a KL penalty to πref (eq. 3)",
                        formatter_class=fmt)
    pp.add_argument("--config", help="YAML file of settings (keys as the flags)")
    add_config_flags(pp, PPOConfig)
    pp.set_defaults(func=cmd_ppo)
