"""Scorers: `score(prompts, completions) -> list[float]`, from a trained reward model directory
(`--reward-model DIR`, `directpo.eval.reward_model.RewardModel`) or from a Python callable
(`--reward-fn module:function`). Evaluation, Best-of-N and PPO all score through this protocol.

A callable takes one `(prompt, completion)` and returns a number; one marked `fn.batched = True`
takes the two lists and returns one number per pair. `prompt` is the prompt as the file gives it
(text, or a list of {role, content} messages), `completion` the decoded text. The module is
imported from `sys.path` with the current directory searched last (and only for that import), so
`--reward-fn my_rewards:score` finds `./my_rewards.py` while a local folder named like an installed
package does not shadow it.
"""
from __future__ import annotations

import importlib
import math
import os
import re
import sys
from typing import Callable, Sequence

from ..errors import MissingPackageError, UserValueError

Scorer = Callable[[Sequence, Sequence[str]], list]


def load_callable(spec: str) -> Callable:
    """`module:function` (or `module:Class.attr`) -> the object."""
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise UserValueError(f"reward function {spec!r}: expected 'module:function' (e.g. my_rewards:score)")
    mod_name, attr = spec.split(":")
    # The current directory is searched last, and only for this import: a local folder named like an
    # installed package (`matplotlib/`, `json/`) must not shadow it, now or later. The module, once
    # imported, stays in sys.modules.
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    importlib.invalidate_caches()  # a module file written since the directory was last listed
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise UserValueError(f"reward function {spec!r}: cannot import module {mod_name!r}: {e}") from e
    finally:
        if added:
            for i in range(len(sys.path) - 1, -1, -1):  # our entry: the last one equal to cwd
                if sys.path[i] == cwd:
                    del sys.path[i]
                    break
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserValueError(f"reward function {spec!r}: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserValueError(f"reward function {spec!r}: {attr!r} is not callable")
    return obj


def callable_scorer(fn: Callable, name: str | None = None) -> Scorer:
    """Wrap a per-pair (or `batched`) callable into a checked batch scorer."""
    name = name or getattr(fn, "__qualname__", repr(fn))
    batched = bool(getattr(fn, "batched", False))

    def score(prompts: Sequence, completions: Sequence[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        values = _batch_values(fn(list(prompts), list(completions)), name, len(completions)) if batched else \
            [fn(p, c) for p, c in zip(prompts, completions)]
        if len(values) != len(completions):
            raise UserValueError(f"reward function {name}: returned {len(values)} values for {len(completions)} "
                                 "completions")
        out = []
        for i, v in enumerate(values):
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise UserValueError(f"reward function {name}: returned {v!r} for completion {i}, expected a "
                                     "number") from None
            if not math.isfinite(f):
                raise UserValueError(f"reward function {name}: returned {f} for completion {i}, expected a finite "
                                     "number")
            out.append(f)
        return out

    score.__name__ = f"reward_fn[{name}]"
    score.batched = True  # wrapping it again is harmless
    return score


def _batch_values(values, name: str, n: int) -> list:
    """A batched callable's reply as a list; one number (or None, a string, a dict) is refused here,
    since `list()` of it is a TypeError that would read as directpo's bug, or a list of its keys."""
    if not isinstance(values, (str, bytes, dict)):
        try:
            return list(values)
        except TypeError:  # not iterable (a 0-d tensor too)
            pass
    raise UserValueError(f"reward function {name}: returned {values!r}, expected a list of {n} numbers (a "
                         "`batched` function returns one number per completion)")


def as_scorer(reward) -> Scorer:
    """A checked batch scorer from a per-pair callable, a `batched` one, or a RewardModel."""
    return callable_scorer(reward)


def load_reward_fn(reward_model: str | None = None, reward_fn: str | Callable | None = None,
                   device: str | None = None, batch_size: int = 16, precision: str = "fp32") -> Scorer:
    """A scorer from exactly one of: a reward model directory, a `module:function` spec, a callable."""
    if (reward_model is None) == (reward_fn is None):
        raise UserValueError("give exactly one of --reward-model DIR and --reward-fn module:function")
    if reward_model is not None:
        from .reward_model import RewardModel

        return RewardModel(reward_model, device=device, batch_size=batch_size, precision=precision)
    fn = load_callable(reward_fn) if isinstance(reward_fn, str) else reward_fn
    return callable_scorer(fn, reward_fn if isinstance(reward_fn, str) else None)


# ----------------------------------------------------------------------------------------------
# A ground-truth reward for the built-in review task (`directpo.toy.review_task`): PPO-GT's scorer.

_WORD = re.compile(r"[a-z]+")


def review_sentiment(prompt, completion: str) -> float:
    """Praise minus criticism: (# positive words) − (# negative words) of `directpo.toy`'s lists.

    Use it as `--reward-fn directpo.eval.scorers:review_sentiment`.
    """
    from ..toy import NEGATIVE, POSITIVE

    words = _WORD.findall(completion.lower())
    pos, neg = set(POSITIVE), set(NEGATIVE)
    return float(sum(w in pos for w in words) - sum(w in neg for w in words))


# ----------------------------------------------------------------------------------------------
# Sentiment scorers: the ground-truth rewards of the controlled-sentiment experiment (paper §6.1).

def vader_sentiment(prompt, completion: str) -> float:
    """VADER compound sentiment (−1 … 1) of the whole review, prompt + completion: an offline
    stand-in for the paper's sentiment classifier (`pip install vaderSentiment`).

    Use it as `--reward-fn directpo.eval.scorers:vader_sentiment`.
    """
    from ..data.formats import message_text

    return _vader().polarity_scores(message_text(prompt) + completion)["compound"]


_VADER = None


def _vader():
    global _VADER
    if _VADER is None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise MissingPackageError("the VADER reward needs the vaderSentiment package: pip install vaderSentiment "
                                      "(or pip install 'directpo[experiments]')") from None
        _VADER = SentimentIntensityAnalyzer()
    return _VADER


class ClassifierReward:
    """P(positive | prompt + completion) from any Hugging Face sequence classifier (the paper used
    `siebert/sentiment-roberta-large-english`). The positive class is the label named like
    'positive' (case-insensitive) in the model's `id2label`, or `positive_label` if given. A
    single-output model (a reward model on the hub) scores by its logit: a softmax over one class
    would be 1 for every text."""

    batched = True

    def __init__(self, name_or_dir: str, device: str | None = None, batch_size: int = 32,
                 positive_label: str | int | None = None, max_length: int = 512):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..models import pick_device, quiet_transformers, remote_code_error

        quiet_transformers()
        self.device = pick_device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
            self.model, info = AutoModelForSequenceClassification.from_pretrained(name_or_dir, use_safetensors=True,
                                                                                  output_loading_info=True)
        except ValueError as e:  # its own code, refused: one line naming the code
            explained = remote_code_error(name_or_dir, e)
            if explained is None:
                raise
            raise explained from None
        new = [k for k in info.get("missing_keys", ()) if k.split(".")[0] in ("score", "classifier")]
        if new:  # a head drawn at random (a plain LM): every score would be noise
            raise UserValueError(f"{name_or_dir}: no classification head in its weights ({', '.join(new)}): it is not "
                                 "a sequence classifier; give one (e.g. a sentiment classifier from the hub)")
        self.model.to(self.device).eval()
        if self.tokenizer.pad_token is None:  # decoder-only classifiers often have none
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        labels = {int(k): str(v) for k, v in self.model.config.id2label.items()}
        if self.model.config.num_labels == 1:
            self.positive = None  # the logit itself
        elif isinstance(positive_label, int):
            self.positive = positive_label
        else:
            want = (positive_label or "positive").lower()
            hits = [i for i, name in labels.items() if name.lower() == want]
            if len(hits) != 1:
                raise UserValueError(f"{name_or_dir}: no class named {want!r} among its labels {labels}; pass "
                                     "positive_label")
            self.positive = hits[0]
        self.batch_size, self.max_length, self._torch = batch_size, max_length, torch

    def __call__(self, prompts, completions) -> list[float]:
        from ..data.formats import message_text

        torch = self._torch
        texts = [message_text(p) + c for p, c in zip(prompts, completions)]
        out: list[float] = []
        with torch.no_grad():
            for s in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[s:s + self.batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                logits = self.model(**enc).logits.float()
                out += (logits[:, 0] if self.positive is None else logits.softmax(-1)[:, self.positive]).tolist()
        return out
