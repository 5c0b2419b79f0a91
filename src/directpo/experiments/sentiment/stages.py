"""The study's data and model stages, 1–5: corpus, πSFT, prompts, preference pairs, reward model.

Each is resumable: the data stages record their result (`resume.stage`), the trainers continue a
killed run from its last checkpoint and skip a finished one (their completion marker). Torch and
the trainers are imported where they are used: `directpo experiment sentiment --help` loads neither.
"""
from __future__ import annotations

import math
import random
import re
import statistics
import time
from pathlib import Path

from ...errors import UserValueError
from .config import SentimentConfig
from .corpus import default_corpus, read_corpus
from ...runfiles import read_metrics
from ..common import NO_LOG_LINES, read_jsonl, shared_run_settings, train_resumable  # noqa: F401 (re-exported)
from ..resume import stage

# ----------------------------------------------------------------------------------------------
# 1. Corpus

def stage_corpus(cfg: SentimentConfig, out: Path) -> dict:
    """Review texts split into disjoint pools: eval and train prompt pools, held-out LM texts, and
    the pretraining set (OUT/corpus/*.jsonl, as prompt/completion rows with an empty prompt)."""
    return stage(out, "corpus", lambda corpus_dir: split_corpus(cfg, corpus_dir))


def split_corpus(cfg: SentimentConfig, corpus_dir: Path) -> dict:
    from ...data.formats import write_jsonl

    source = cfg.corpus or default_corpus()
    texts = list(dict.fromkeys(t for t in read_corpus(source, cfg.corpus_field) if len(t.split()) >= 4))
    random.Random(cfg.seed).shuffle(texts)
    if cfg.max_corpus:
        texts = texts[:cfg.max_corpus]
    # Prompt pools take whole reviews away from pretraining: prompts are prefixes of unseen reviews.
    n_eval_pool, n_train_pool = 2 * cfg.n_eval_prompts, int(1.5 * cfg.n_train_prompts)
    n_lm_heldout = max(16, len(texts) // 50)
    if len(texts) < n_eval_pool + n_train_pool + n_lm_heldout + 64:
        raise UserValueError(f"{source}: {len(texts)} usable texts, too few for {cfg.n_train_prompts} train and "
                             f"{cfg.n_eval_prompts} eval prompts plus pretraining; lower the prompt counts")
    bounds = [0, n_eval_pool, n_eval_pool + n_train_pool, n_eval_pool + n_train_pool + n_lm_heldout, len(texts)]
    names = ("eval_pool", "train_pool", "lm_heldout", "pretrain")
    pools = {name: texts[lo:hi] for name, lo, hi in zip(names, bounds, bounds[1:])}
    for name, pool in pools.items():
        write_jsonl(({"prompt": "", "completion": t} for t in pool), corpus_dir / f"{name}.jsonl")
    return {"corpus": source, "texts": len(texts), **{name: len(pool) for name, pool in pools.items()}}


# ----------------------------------------------------------------------------------------------
# 2. πSFT

def stage_sft(cfg: SentimentConfig, out: Path) -> dict:
    """πSFT: the given base model, or a model (given, or a small Llama built here) trained on the
    pretraining texts, with its held-out perplexity."""
    if cfg.base_model:
        return {"sft": cfg.base_model, "pretrained": False}
    pretrain = out / "corpus" / "pretrain.jsonl"
    init = cfg.init_model or build_initial_model(cfg, out / "init", pretrain)
    steps_per_epoch = math.ceil(sum(1 for _ in open(pretrain)) / cfg.pretrain_batch)
    total_steps = max(1, round(cfg.pretrain_epochs * steps_per_epoch))
    sft_dir = out / "sft"
    train_resumable(model=init, data=str(pretrain), output_dir=str(sft_dir), loss="sft", optimizer="adamw",
                    lr=cfg.pretrain_lr, batch_size=cfg.pretrain_batch, micro_batch_size=cfg.pretrain_batch,
                    max_steps=total_steps, warmup_steps=min(100, total_steps // 10),
                    save_every=max(1, total_steps // 4), keep_last=1, **shared_run_settings(cfg))
    heldout_perplexity = perplexity(str(sft_dir), out / "corpus" / "lm_heldout.jsonl", cfg)
    return {"sft": str(sft_dir), "pretrained": True, "steps": total_steps, "heldout_perplexity": heldout_perplexity}


def build_initial_model(cfg: SentimentConfig, init_dir: Path, pretrain: Path) -> str:
    """A small random Llama with a BPE tokenizer trained on the pretraining texts (built once)."""
    from ...toy import build_tiny_model

    if not (init_dir / "config.json").exists():
        texts = [row["completion"] for row in read_jsonl(pretrain)]
        build_tiny_model(init_dir, texts, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                         vocab_size=cfg.vocab_size, seed=cfg.seed, add_bos=True)
    return str(init_dir)


def perplexity(model_dir: str, path: Path, cfg: SentimentConfig) -> float:
    """exp(token-level NLL) of held-out texts, EOS included."""
    from ...eval.evaluate import completion_logps
    from ...models import load_model, load_tokenizer, pick_device

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, pick_device(cfg.device))
    texts = [row["completion"] for row in read_jsonl(path)]
    start = tok("")["input_ids"] or [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    completions = [tok(t, add_special_tokens=False)["input_ids"][:cfg.max_length - len(start) - 1]
                   + [tok.eos_token_id] for t in texts]
    logps = completion_logps(model, [start] * len(completions), completions, tok.pad_token_id, cfg.eval_batch)
    return math.exp(-logps.sum().item() / sum(len(c) for c in completions))


# ----------------------------------------------------------------------------------------------
# 3. Prompts

def stage_prompts(cfg: SentimentConfig, out: Path, sft: str) -> dict:
    """2–8-token prefixes of held-out reviews: train prompts, and eval prompts disjoint from them."""
    return stage(out, "prompts", lambda prompts_dir: make_prompts(cfg, out / "corpus", prompts_dir, sft))


def make_prompts(cfg: SentimentConfig, corpus_dir: Path, prompts_dir: Path, sft: str) -> dict:
    from ...data.formats import write_jsonl
    from ...models import load_tokenizer

    tok = load_tokenizer(sft)
    rng = random.Random(cfg.seed + 1)
    train = review_prefixes(cfg, tok, rng, corpus_dir / "train_pool.jsonl", cfg.n_train_prompts, exclude=set())
    evals = review_prefixes(cfg, tok, rng, corpus_dir / "eval_pool.jsonl", cfg.n_eval_prompts, exclude=set(train))
    write_jsonl(({"prompt": p} for p in train), prompts_dir / "train.jsonl")
    write_jsonl(({"prompt": p} for p in evals), prompts_dir / "eval.jsonl")
    return {"train": len(train), "eval": len(evals), "examples": evals[:5]}


def review_prefixes(cfg: SentimentConfig, tok, rng: random.Random, pool: Path, n: int, exclude: set) -> list[str]:
    """`n` distinct prompts: the first k tokens (k random in the configured range) of the pool's
    reviews, extended to the end of the word the last token is part of (no prompt ends mid-word)."""
    prompts: list[str] = []
    for row in read_jsonl(pool):
        text = row["completion"]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        k = rng.randint(cfg.prompt_min_tokens, cfg.prompt_max_tokens)
        if len(ids) < k + 3:
            continue  # too short to leave a continuation worth judging
        prefix = tok.decode(ids[:k])
        if text.startswith(prefix):
            prefix += re.match(r"\S*", text[len(prefix):]).group(0)
        prefix = prefix.rstrip()
        if prefix and prefix not in exclude and prefix not in prompts:
            prompts.append(prefix)
        if len(prompts) == n:
            return prompts
    raise UserValueError(f"only {len(prompts)} distinct prompts from the {pool.stem} texts, {n} asked; lower the count")


# ----------------------------------------------------------------------------------------------
# 4. Preference pairs

def stage_pairs(cfg: SentimentConfig, out: Path, sft: str, scorer) -> dict:
    """N samples of πSFT per train prompt, scored by the ground truth, paired higher vs lower reward;
    9/10 of the pairs to train on, 1/10 held out (the reward model's accuracy)."""
    return stage(out, "pairs", lambda pairs_dir: make_pairs(cfg, out / "prompts" / "train.jsonl", pairs_dir, sft,
                                                            scorer))


def make_pairs(cfg: SentimentConfig, prompts: Path, pairs_dir: Path, sft: str, scorer) -> dict:
    from ...data.formats import write_jsonl
    from ...data.prompts import load_prompts
    from ...eval.sample import draw_samples
    from ...models import load_model, load_tokenizer, pick_device, suppress_eos

    began = time.perf_counter()
    items = load_prompts(str(prompts))
    n = cfg.samples_per_prompt
    model, tok = load_model(sft, pick_device(cfg.device)), load_tokenizer(sft)
    suppress_eos(model, tok, cfg.fixed_length)  # --fixed-length: the pairs' completions never end early
    samples = draw_samples(model, tok, items, n,
                           cfg.max_new_tokens, 1.0, 1.0, cfg.seed + 2, cfg.eval_batch,
                           progress="sampling πSFT for pairs" if cfg.progress else None)
    rewards = scorer(samples.prompts, samples.texts)
    rows, spreads = [], []
    for i, item in enumerate(items):
        group = slice(i * n, (i + 1) * n)
        spreads.append(max(rewards[group]) - min(rewards[group]))
        rows += labelled_pairs(cfg, item.prompt, samples.texts[group], rewards[group])
    if len(rows) < 8:
        raise UserValueError(f"only {len(rows)} pairs with a reward gap ≥ {cfg.pair_margin}: the scorer does not tell "
                             "πSFT's samples apart; lower --pair-margin or sample more per prompt")
    random.Random(cfg.seed + 3).shuffle(rows)
    n_heldout = max(4, len(rows) // 10)
    write_jsonl(rows[n_heldout:], pairs_dir / "train.jsonl")
    write_jsonl(rows[:n_heldout], pairs_dir / "heldout.jsonl")
    return {"pairs": len(rows) - n_heldout, "heldout_pairs": n_heldout, "samples": len(samples.texts),
            "median_spread": statistics.median(spreads), "sft_sample_reward": statistics.fmean(rewards),
            "empty_samples": sum(not t.strip() for t in samples.texts),
            "seconds": time.perf_counter() - began}  # sampling + labelling: the offline cost


def labelled_pairs(cfg: SentimentConfig, prompt: str, texts: list[str], rewards: list[float]) -> list[dict]:
    """The pairs of one prompt's samples (best vs worst, or all) whose reward gap reaches the margin."""
    # An empty sample (EOS first) has no tokens to train on: it cannot be either side of a pair.
    by_reward = sorted((j for j in range(len(texts)) if texts[j].strip()), key=lambda j: -rewards[j])
    if len(by_reward) < 2:
        return []
    if cfg.pairs == "best_worst":
        candidates = [(by_reward[0], by_reward[-1])]
    else:
        candidates = [(a, b) for x, a in enumerate(by_reward) for b in by_reward[x + 1:]]
    return [{"prompt": prompt, "chosen": texts[a], "rejected": texts[b], "chosen_reward": rewards[a],
             "rejected_reward": rewards[b]}
            for a, b in candidates if rewards[a] - rewards[b] >= cfg.pair_margin and texts[a] != texts[b]]


# ----------------------------------------------------------------------------------------------
# 5. Reward model

def stage_rm(cfg: SentimentConfig, out: Path, sft: str) -> dict:
    """A Bradley–Terry reward model on the train pairs, with its accuracy on the held-out pairs."""
    from ...rlhf.config import RewardModelConfig
    from ...rlhf.reward_model import train_reward_model
    from ...training.run import is_complete

    rm_dir = out / "rm"
    if not is_complete(rm_dir):
        train_reward_model(RewardModelConfig(
            model=sft, data=str(out / "pairs" / "train.jsonl"), eval_data=str(out / "pairs" / "heldout.jsonl"),
            output_dir=str(rm_dir), optimizer="adamw", lr=cfg.rm_lr, batch_size=cfg.batch_size,
            micro_batch_size=cfg.batch_size, max_steps=cfg.rm_steps, warmup_steps=cfg.warmup_steps, overwrite=True,
            **shared_run_settings(cfg)))
    evals = read_metrics(rm_dir, split="eval")
    return {"rm": str(rm_dir), "heldout_accuracy": evals[-1].get("accuracy") if evals else None}


def ground_truth(cfg: SentimentConfig):
    """The ground-truth reward: the configured sentiment classifier, else VADER (offline)."""
    from ...eval.scorers import ClassifierReward, callable_scorer, vader_sentiment

    if cfg.reward_model:
        classifier = ClassifierReward(cfg.reward_model, device=cfg.device, batch_size=cfg.eval_batch)
        return callable_scorer(classifier, cfg.reward_model)
    scorer = callable_scorer(vader_sentiment, "vader")
    scorer([""], ["a good test"])  # fail now, not after pretraining, if vaderSentiment is missing
    return scorer
