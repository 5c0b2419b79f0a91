"""Judges for win rates: does the policy's completion beat the reference completion?

* `RewardJudge`: a reward model, a classifier or a callable scores both sides; the higher wins (a tie
  counts ½). A local model is no LLM or human judge, and its `judge_kind` says so.
* `ChatJudge`: an OpenAI-compatible chat endpoint (`POST {url}/chat/completions`) asked the paper's
  GPT-4 question ("which response is more helpful?" for dialogue, "which summary ...?" for
  summarization), with a one-sentence comparison first and the verdict ("A" or "B") on its own line.
  - `order="swap"` (the default): every comparison is asked twice, the policy shown as A, then as B.
    Two verdicts for the same completion give 1 or 0; two that disagree (the judge followed the
    position, not the content) give a tie, ½. `judge_consistency` is the fraction of judged
    comparisons whose two verdicts agree. `order="random"`: one call, the policy's side a seeded
    coin flip per comparison: position bias cancels on average only, and goes unseen.
  - Each call is one request of `directpo.eval.http.JsonPostClient`: bounded by a wall-clock
    deadline (`timeout` seconds for connect, send and the whole reply) and a reply-size cap
    (`max_reply_bytes`); connection errors, the deadline and HTTP 408/429/5xx retried with backoff
    (Retry-After honoured); a reply over the cap, other HTTP errors, redirects, malformed JSON and
    replies without a readable verdict not retried: they would fail again.
  - A comparison whose call (either call, when swapped) still failed after its retries is a failure:
    None, left out of the win rate, counted by kind. When more than `max_failure_rate` of the
    comparisons fail, `judge` raises `JudgeError` naming how many failed and why; it stops calling
    as soon as that is certain (a wrong key, URL or model name fails every call).
  - The API key is sent to `url` only: the client follows no redirect (a failure of kind
    `redirect_<code>`), so the key never reaches another address, and it is never printed.
* `build_judge`: the judge of `directpo eval` and of the experiment recipes, from their settings.

`Verdicts.summary()` computes the win rate, its bootstrap interval and the length-controlled win
rate (`directpo.eval.winrate`) from the outcomes, the word lengths of both sides and the prompt of
each comparison (its cluster).
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import threading
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import UserError, UserValueError
from .http import DEADLINE, MAX_REPLY_BYTES, TOO_LARGE, JsonPostClient, describe_http
from .http import backoff_delay, retry_after_seconds  # noqa: F401 (re-exported: they were defined here first)
from .winrate import win_rate_stats, word_count

# The paper's GPT-4 judge prompts (Rafailov et al., 2023, appendix C.2), with {query}, {a}, {b}. Our notes
# on the paper (shared/seed/dpo-paper-notes.md) stop at appendix B, so these are not checked against
# the paper's text: read them as written in our own words after the paper's description of its prompts.
PROMPTS = {
    "dialogue": (
        "For the following query to a chatbot, which response is more helpful?\n\n"
        "Query: {query}\n\n"
        "Response A:\n{a}\n\n"
        "Response B:\n{b}\n\n"
        "FIRST provide a one-sentence comparison of the two responses and explain which you feel is more "
        "helpful. SECOND, on a new line, state only \"A\" or \"B\" to indicate which response is more helpful. "
        "Your response should use the format:\n"
        "Comparison: <one-sentence comparison and explanation>\n"
        "More helpful: <\"A\" or \"B\">"),
    "summary": (
        "Which of the following summaries does a better job of summarizing the most important points in the "
        "given forum post, without including unimportant or irrelevant details? A good summary is both precise "
        "and concise.\n\n"
        "Post:\n{query}\n\n"
        "Summary A:\n{a}\n\n"
        "Summary B:\n{b}\n\n"
        "FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why. "
        "SECOND, on a new line, state only \"A\" or \"B\" to indicate your choice. Your response should use the "
        "format:\n"
        "Comparison: <one-sentence comparison and explanation>\n"
        "Preferred: <\"A\" or \"B\">"),
}

_VERDICT = re.compile(r"(?:more\s+helpful|preferred|more\s+harmless|verdict|choice|answer)\s*[:=\-]\s*"
                      r"[\s\"'*<(\[]*([AB])(?![A-Za-z])", re.IGNORECASE)
_BARE = re.compile(r"^[\s\"'*<(\[]*(?:response|summary)?\s*([AB])[\s\"'*>)\].]*$", re.IGNORECASE)


def parse_verdict(text: str) -> str | None:
    """'A' or 'B' from a judge's reply, or None: the last "More helpful: X"-style line, else a last
    line that is only the letter."""
    if not isinstance(text, str):
        return None
    found = _VERDICT.findall(text)
    if found:
        return found[-1].upper()
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if lines:
        m = _BARE.match(lines[-1])
        if m:
            return m.group(1).upper()
    return None


def _query_text(prompt) -> str:
    if isinstance(prompt, list):  # messages: a transcript
        return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in prompt)
    return prompt


@dataclass
class Verdicts:
    """Per comparison: 1 (policy wins), 0 (reference wins), 0.5 (tie), None (failed: no verdict), with
    what the statistics need: the word lengths of both sides and a cluster id (the prompt index)."""

    outcomes: list
    failures: Counter = field(default_factory=Counter)  # failed comparisons, by the kind of failure
    first_failure: dict = field(default_factory=dict)  # kind -> the start of the first such reply
    policy_shown_first: int = 0
    a_verdicts: int = 0
    policy_lengths: list | None = None
    reference_lengths: list | None = None
    clusters: list | None = None
    kind: str | None = None  # what judged, in words (`judge_kind`)
    order: str | None = None  # chat judges: "swap" or "random"
    verdicts: int = 0  # verdicts read in the judged comparisons (the denominator of judge_a_rate)
    consistent: int | None = None  # swapped order: judged comparisons whose two verdicts agree
    calls: int | None = None  # chat judges: calls made (retries not counted) ...
    retries: int | None = None  # ... and retries made
    n_boot: int = 2000
    seed: int = 0

    def summary(self) -> dict:
        out = win_rate_stats(self.outcomes, self.policy_lengths, self.reference_lengths, self.clusters,
                             n_boot=self.n_boot, seed=self.seed)
        failed = sum(self.failures.values())
        # judge_parse_failures: the same number under its older name, which results files already carry
        out.update(judge_failures=failed, judge_parse_failures=failed, judge_failure_kinds=dict(self.failures))
        if self.failures:
            out["judge_failure_examples"] = dict(self.first_failure)
        if self.kind:
            out["judge_kind"] = self.kind
        if self.calls is not None:
            out["judge_calls"], out["judge_retries"] = self.calls, self.retries
        if self.order == "random":
            out["judge_policy_first_rate"] = self.policy_shown_first / max(len(self.outcomes), 1)
        if self.verdicts:
            out["judge_a_rate"] = self.a_verdicts / self.verdicts
        if self.consistent is not None:
            out["judge_consistency"] = self.consistent / out["judged"] if out["judged"] else float("nan")
        return out


class RewardJudge:
    """Win = higher score under a reward model, classifier or callable (each side scored in one batch)."""

    def __init__(self, scorer, kind: str = "reward (higher wins)", n_boot: int = 2000, seed: int = 0):
        self.scorer, self.kind, self.n_boot, self.seed = scorer, kind, n_boot, seed

    def judge(self, prompts, completions, references, clusters=None) -> Verdicts:
        pol = self.scorer(prompts, completions)
        ref = self.scorer(prompts, references)
        # The same text is a tie whatever the scores: scored in different batches (other padding), one
        # answer can get two scores a rounding error apart, and would beat itself.
        outcomes = [0.5 if c == r else 1.0 if a > b else 0.0 if a < b else 0.5
                    for a, b, c, r in zip(pol, ref, completions, references)]
        return Verdicts(outcomes,
                        policy_lengths=[word_count(c) for c in completions],
                        reference_lengths=[word_count(r) for r in references],
                        clusters=None if clusters is None else list(clusters), kind=self.kind, n_boot=self.n_boot,
                        seed=self.seed)


class JudgeError(UserError, ValueError):
    """Too many of the judge's comparisons failed: the win rate would mean little (one line, exit 2)."""


_KEY_HINT = "check DIRECTPO_JUDGE_API_KEY / OPENAI_API_KEY"
_HINTS = {401: _KEY_HINT, 403: _KEY_HINT, 404: "check --judge-url (POST {url}/chat/completions) and --judge-model"}
_KINDS = {"malformed_json": "malformed JSON replies", "no_content": "replies without a message",
          "unparsable": 'replies without a readable verdict ("A" or "B")'}
ORDERS = ("swap", "random")


def describe_failure(kind: str, timeout: float | None = None, max_reply_bytes: int | None = None) -> str:
    """A failure kind ('http_401', 'redirect_302', 'connection (...)', 'deadline', ...) in words, with a
    hint; `timeout` and `max_reply_bytes`, when given, are named in the deadline's and the cap's."""
    if kind.startswith("connection"):
        return f"{kind}: check that --judge-url is reachable"
    if kind == DEADLINE:
        within = f" {timeout:g} s" if timeout is not None else ""
        return (f"deadline (no whole reply within --judge-timeout{within}: connect, send and reply): check that "
                "--judge-url is responsive, or raise --judge-timeout")
    if kind == TOO_LARGE:
        cap = f" {max_reply_bytes}" if max_reply_bytes is not None else ""
        return (f"reply_too_large (over --judge-max-reply-bytes{cap}, abandoned unread): check --judge-url, or "
                "raise --judge-max-reply-bytes")
    text = describe_http(kind)
    if text is None:
        return _KINDS.get(kind, kind)
    code = int(kind.partition("_")[2])
    return f"{text}: {_HINTS[code]}" if kind.startswith("http_") and code in _HINTS else text


def _reply_text(raw: bytes) -> tuple[str | None, str | None]:
    """The message content of a chat-completions reply, or (None, 'malformed_json' / 'no_content')."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, "malformed_json"
    try:
        text = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None, "no_content"
    return (text, None) if isinstance(text, str) else (None, "no_content")


def _check_settings(url, order, retries, backoff, max_failure_rate, timeout, workers, max_reply_bytes) -> None:
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise UserValueError(f"--judge-url {url}: expected an http:// or https:// URL")
    if order not in ORDERS:
        raise UserValueError(f"judge order {order!r}: expected one of {', '.join(ORDERS)}")
    checks = [("--judge-retries", retries, isinstance(retries, int) and retries >= 0, "an integer ≥ 0"),
              ("--judge-backoff", backoff, 0 <= backoff < math.inf, "a number ≥ 0"),
              ("--judge-max-failure-rate", max_failure_rate, 0 <= max_failure_rate < 1, "a number in [0, 1)"),
              ("--judge-timeout", timeout, 0 < timeout < math.inf, "a number > 0"),
              ("--judge-workers", workers, isinstance(workers, int) and workers >= 1, "an integer ≥ 1"),
              ("--judge-max-reply-bytes", max_reply_bytes,
               isinstance(max_reply_bytes, int) and max_reply_bytes >= 1024, "an integer ≥ 1024")]
    for name, value, ok, want in checks:
        if not ok:
            raise UserValueError(f"{name} must be {want}, got {value}")


class ChatJudge:
    """An OpenAI-compatible chat-completions endpoint as a pairwise judge (see the module's doc)."""

    def __init__(self, url: str, model: str, prompt: str = "dialogue", api_key: str | None = None,
                 timeout: float = 60.0, max_tokens: int = 256, workers: int = 4, seed: int = 0, order: str = "swap",
                 retries: int = 3, backoff: float = 1.0, max_failure_rate: float = 0.1, n_boot: int = 2000,
                 max_reply_bytes: int = MAX_REPLY_BYTES):
        _check_settings(url, order, retries, backoff, max_failure_rate, timeout, workers, max_reply_bytes)
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions"
        self.model = model
        if prompt in PROMPTS:
            self.template = PROMPTS[prompt]
        elif os.path.isfile(prompt):
            with open(prompt) as f:
                self.template = f.read()
        else:
            raise UserValueError(f"judge prompt {prompt!r}: neither one of {sorted(PROMPTS)} nor a template file "
                                 "(with {query}, {a}, {b})")
        for key in ("{query}", "{a}", "{b}"):
            if key not in self.template:
                raise UserValueError(f"judge prompt template lacks {key}")
        api_key = api_key if api_key is not None else (os.environ.get("DIRECTPO_JUDGE_API_KEY")
                                                       or os.environ.get("OPENAI_API_KEY"))
        # the HTTP side (deadline, size cap, retries, redirects) is the client's; its settings are read
        # through the properties below, so that there is one copy of each
        self.client = JsonPostClient(self.url, api_key=api_key, timeout=timeout, max_reply_bytes=max_reply_bytes,
                                     retries=retries, backoff=backoff)
        self.max_tokens, self.workers, self.seed = max_tokens, workers, seed
        self.order, self.max_failure_rate, self.n_boot = order, max_failure_rate, n_boot
        how = "position-swapped" if order == "swap" else "random order"
        self.kind = f"chat endpoint {self.url} model {model} ({how})"
        self._abort = self.client.abort  # set when the run has failed: waiting retries give up at once

    api_key = property(lambda self: self.client.api_key)
    timeout = property(lambda self: self.client.timeout)
    max_reply_bytes = property(lambda self: self.client.max_reply_bytes)
    retries = property(lambda self: self.client.retries)
    backoff = property(lambda self: self.client.backoff)

    def render(self, prompt, a: str, b: str) -> str:
        return (self.template.replace("{query}", _query_text(prompt)).replace("{a}", a).replace("{b}", b))

    def _ask(self, content: str) -> tuple[str | None, str | None, int]:
        """(reply text, None, retries) or (None, failure kind, retries): the client's kinds (see
        `directpo.eval.http`), or 'malformed_json' / 'no_content' for a reply that is no chat completion."""
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": content}],
                           "temperature": 0, "max_tokens": self.max_tokens}).encode()
        raw, failure, retries = self.client.post(body)
        if failure is not None:
            return None, failure, retries
        text, failure = _reply_text(raw)
        return text, failure, retries

    def ask(self, content: str) -> tuple[str | None, str | None]:
        """(reply text, None) or (None, failure kind), after the retries a transient failure gets."""
        text, failure, _ = self._ask(content)
        return text, failure

    def _redact(self, text: str) -> str:
        """A reply as kept for the summary, the API key blanked should the server echo it."""
        return text.replace(self.api_key, "[API key]") if self.api_key else text

    def _one(self, prompt, completion, reference, policy_first):
        """One call: (verdict, None, None, retries) or (None, failure kind, reply text or None, retries)."""
        a, b = (completion, reference) if policy_first else (reference, completion)
        text, failure, retries = self._ask(self.render(prompt, a, b))
        if failure is not None:
            return None, failure, None, retries
        verdict = parse_verdict(text)
        if verdict is None:
            return None, "unparsable", self._redact(text), retries
        return verdict, None, None, retries

    def judge(self, prompts, completions, references, clusters=None) -> Verdicts:
        """Judge each (prompt, completion, reference); `clusters`: one id per comparison (the prompt
        index; the n samples of one prompt are not independent), for the win rate's interval.

        With order "swap" each comparison takes two calls; a comparison where either call ultimately
        failed (after its retries) counts as failed: its outcome is None, it is left out of the win
        rate and counted in `judge_failures` by kind. More than `max_failure_rate` of the comparisons
        failing raises `JudgeError` (and ends the calls as soon as it is certain)."""
        n = len(prompts)
        if not n == len(completions) == len(references):
            raise ValueError(f"{n} prompts, {len(completions)} completions, {len(references)} references")
        if self.order == "swap":
            sides = [(True, False)] * n  # the policy as A, then as B
        else:
            rng = random.Random(self.seed)
            sides = [(rng.random() < 0.5,) for _ in range(n)]  # a coin flip: is the policy shown as A?
        results = self._run(prompts, completions, references, sides)
        v, unfinished = self._tally(results, sides, completions, references, clusters)
        self.check_failures(v, unfinished)
        return v

    def _run(self, prompts, completions, references, sides) -> dict:
        """{(comparison, policy shown first): _one's result} of the calls made. Once more than
        max_failure_rate of the comparisons have failed, the run has failed whatever the rest say:
        no further call starts (it would be paid for), and waiting retries give up."""
        limit = self.max_failure_rate * len(prompts)
        failed, lock = set(), threading.Lock()

        def call(key):
            if self._abort.is_set():
                return None
            i, first = key
            result = self._one(prompts[i], completions[i], references[i], first)
            if result[1] is not None:
                with lock:  # decided here, in the worker, so that its next call already sees it
                    failed.add(i)
                    if len(failed) > limit:
                        self._abort.set()
            return result

        keys = [(i, first) for i, firsts in enumerate(sides) for first in firsts]
        pool = ThreadPoolExecutor(max_workers=self.workers)
        try:
            return {key: r for key, r in zip(keys, pool.map(call, keys)) if r is not None}
        except BaseException:
            self._abort.set()  # an interrupt: calls waiting to retry give up, none starts
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self._abort.clear()  # for the next run, or a call of `ask`

    def _tally(self, results, sides, completions, references, clusters) -> tuple[Verdicts, int]:
        """The Verdicts of the calls made, and how many comparisons were left unjudged by an early stop."""
        v = Verdicts([], policy_lengths=[word_count(c) for c in completions],
                     reference_lengths=[word_count(r) for r in references],
                     clusters=None if clusters is None else list(clusters), kind=self.kind, order=self.order,
                     consistent=0 if self.order == "swap" else None, calls=len(results),
                     retries=sum(r[3] for r in results.values()), n_boot=self.n_boot, seed=self.seed,
                     policy_shown_first=sum(firsts[0] for firsts in sides) if self.order == "random" else 0)
        unfinished = 0
        for i, firsts in enumerate(sides):
            calls = [results.get((i, first)) for first in firsts]
            failed = next((c for c in calls if c is not None and c[1] is not None), None)
            if failed is not None or None in calls:
                v.outcomes.append(None)
                if failed is None:
                    unfinished += 1
                    continue
                v.failures[failed[1]] += 1
                v.first_failure.setdefault(failed[1], (failed[2] or "")[:200])
                continue
            wins = [(c[0] == "A") == first for c, first in zip(calls, firsts)]
            v.outcomes.append(sum(wins) / len(wins))  # swapped: both for the policy 1, neither 0, split ½
            v.a_verdicts += sum(c[0] == "A" for c in calls)
            v.verdicts += len(calls)
            if v.consistent is not None:
                v.consistent += len(set(wins)) == 1
        return v, unfinished

    def check_failures(self, v: Verdicts, unfinished: int = 0) -> None:
        """JudgeError when more than max_failure_rate of the comparisons failed, naming the kinds."""
        failed, total = sum(v.failures.values()), len(v.outcomes)
        if total and failed > self.max_failure_rate * total:
            kinds = "; ".join(f"{count} × {describe_failure(kind, self.timeout, self.max_reply_bytes)}"
                              for kind, count in v.failures.most_common())
            stopped = f"; stopped there, {unfinished} not judged" if unfinished else ""
            raise JudgeError(f"judge {self.url}: {failed} of {total} comparisons failed (over "
                             f"--judge-max-failure-rate {self.max_failure_rate:g}{stopped}): {kinds}")


def classifier_scorer(name_or_dir: str, device: str | None = None, label: str | int | None = None):
    """Any Hugging Face sequence classifier as a scorer: P(`label`) (default: the class named
    'positive'; a number is a class index), or the logit of a single-output model."""
    from .scorers import ClassifierReward

    if isinstance(label, str) and label.isdigit():
        label = int(label)
    return ClassifierReward(name_or_dir, device=device, positive_label=label)


def build_judge(url: str | None = None, model: str | None = None, prompt: str = "dialogue",
                reward_model: str | None = None, classifier: str | None = None, device: str | None = None,
                seed: int = 0, order: str = "swap", retries: int = 3, backoff: float = 1.0,
                max_failure_rate: float = 0.1, timeout: float = 60.0, workers: int = 4,
                classifier_label: str | int | None = None, n_boot: int = 2000,
                max_reply_bytes: int = MAX_REPLY_BYTES):
    """The win-rate judge from at most one of: `url` (with `model`: a ChatJudge), `reward_model` (a
    `directpo rm` output directory) or `classifier` (a Hugging Face sequence classifier, see
    `classifier_scorer`); None when none is given (the caller's reward then judges, if any).
    Local models are labelled as such in `judge_kind`: they are not an LLM or human judge."""
    given = [flag for flag, value in (("--judge-url", url), ("--judge-reward-model", reward_model),
                                      ("--judge-classifier", classifier)) if value]
    if len(given) > 1:
        raise UserValueError(f"give one judge, not {' and '.join(given)}")
    if url:
        if not model:
            raise UserValueError("--judge-url needs --judge-model NAME (the model the endpoint serves)")
        return ChatJudge(url, model, prompt=prompt, timeout=timeout, workers=workers, seed=seed, order=order,
                         retries=retries, backoff=backoff, max_failure_rate=max_failure_rate, n_boot=n_boot,
                         max_reply_bytes=max_reply_bytes)
    if reward_model:
        from .reward_model import RewardModel

        return RewardJudge(RewardModel(reward_model, device=device), n_boot=n_boot, seed=seed,
                           kind=f"local reward model {reward_model} (not an LLM/human judge)")
    if classifier:
        return RewardJudge(classifier_scorer(classifier, device, classifier_label), n_boot=n_boot, seed=seed,
                           kind=f"local classifier {classifier} (not an LLM/human judge)")
    return None
