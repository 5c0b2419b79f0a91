"""Judges for win rates: does the policy's completion beat the reference completion?

* `RewardJudge`: a reward model or callable scores both; the higher wins (a tie counts ½).
* `ChatJudge`: an OpenAI-compatible chat endpoint (`POST {url}/chat/completions`) asked the paper's
  GPT-4 question (appendix C.2: "which response is more helpful?" for dialogue, "which summary ...?"
  for summarization), with a one-sentence comparison first and the verdict ("A" or "B") on its own
  line. Which completion is shown as A is a fair coin per comparison (seeded), so a judge's
  position bias cancels out on average. A reply without a readable verdict, malformed JSON, an HTTP
  error, a redirect or a timeout is a *parse failure*: counted (by kind) and left out of the win
  rate while they are few; when more than half of the calls fail (a wrong key, URL or model name
  fails them all), `ChatJudge.judge` raises `JudgeError`, naming how many failed and why.
  The API key is sent to `url` only: the client follows no redirect (it is a failure of kind
  `redirect_<code>`), so the key never reaches another address.
"""
from __future__ import annotations

import http
import json
import math
import os
import random
import re
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

# The paper's GPT-4 prompts (Rafailov et al., 2023, appendix C.2), with {query}, {a}, {b}.
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
    """Per comparison: 1 (policy wins), 0 (reference wins), 0.5 (tie), None (no verdict)."""

    outcomes: list
    failures: Counter = field(default_factory=Counter)
    first_failure: dict = field(default_factory=dict)
    policy_shown_first: int = 0
    a_verdicts: int = 0

    def summary(self) -> dict:
        judged = [o for o in self.outcomes if o is not None]
        n = len(judged)
        p = sum(judged) / n if n else float("nan")
        out = {"win_rate": p, "win_rate_se": math.sqrt(p * (1 - p) / n) if n else float("nan"), "judged": n,
               "judge_parse_failures": sum(self.failures.values())}
        if self.failures:
            out["judge_failure_kinds"] = dict(self.failures)
            out["judge_failure_examples"] = dict(self.first_failure)
        if self.policy_shown_first or self.a_verdicts:
            out["judge_policy_first_rate"] = self.policy_shown_first / max(len(self.outcomes), 1)
            out["judge_a_rate"] = self.a_verdicts / n if n else float("nan")
        return out


class RewardJudge:
    """Win = higher score under a reward model or callable (scores both sides in one batch each)."""

    def __init__(self, scorer):
        self.scorer = scorer

    def judge(self, prompts, completions, references) -> Verdicts:
        pol = self.scorer(prompts, completions)
        ref = self.scorer(prompts, references)
        return Verdicts([1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(pol, ref)])


class JudgeError(ValueError):
    """More than half of the judge's calls failed: the win rate would mean nothing (one line, exit 2)."""


_KEY_HINT = "check DIRECTPO_JUDGE_API_KEY / OPENAI_API_KEY"
_HINTS = {401: _KEY_HINT, 403: _KEY_HINT, 404: "check --judge-url (POST {url}/chat/completions) and --judge-model"}
_KINDS = {"malformed_json": "malformed JSON replies", "no_content": "replies without a message",
          "unparsable": 'replies without a readable verdict ("A" or "B")'}


def describe_failure(kind: str) -> str:
    """A failure kind ('http_401', 'redirect_302', 'connection (...)', ...) in words, with a hint."""
    prefix, _, code = kind.partition("_")
    if kind.startswith("connection"):
        return f"{kind}: check that --judge-url is reachable"
    if prefix not in ("http", "redirect") or not code.isdigit():
        return _KINDS.get(kind, kind)
    code = int(code)
    try:
        text = f"HTTP {code} {http.HTTPStatus(code).phrase}"
    except ValueError:
        text = f"HTTP {code}"
    if prefix == "redirect":
        return f"{text}: redirect not followed (the API key is never sent across one); give the final URL"
    return f"{text}: {_HINTS[code]}" if code in _HINTS else text


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: the request carries the API key, which must reach no other address."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} not followed", headers, fp)


class ChatJudge:
    """An OpenAI-compatible chat-completions endpoint as a pairwise judge."""

    def __init__(self, url: str, model: str, prompt: str = "dialogue", api_key: str | None = None,
                 timeout: float = 60.0, max_tokens: int = 256, workers: int = 4, seed: int = 0):
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
            raise ValueError(f"judge prompt {prompt!r}: neither one of {sorted(PROMPTS)} nor a template file "
                             "(with {query}, {a}, {b})")
        for key in ("{query}", "{a}", "{b}"):
            if key not in self.template:
                raise ValueError(f"judge prompt template lacks {key}")
        self.api_key = api_key if api_key is not None else (os.environ.get("DIRECTPO_JUDGE_API_KEY")
                                                            or os.environ.get("OPENAI_API_KEY"))
        self.timeout, self.max_tokens, self.workers, self.seed = timeout, max_tokens, workers, seed
        self._opener = urllib.request.build_opener(_RefuseRedirects)

    def render(self, prompt, a: str, b: str) -> str:
        return (self.template.replace("{query}", _query_text(prompt)).replace("{a}", a).replace("{b}", b))

    def ask(self, content: str) -> tuple[str | None, str | None]:
        """(reply text, None) or (None, failure kind: 'http_<code>', 'redirect_<code>', 'connection (...)',
        'malformed_json', 'no_content')."""
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": content}],
                           "temperature": 0, "max_tokens": self.max_tokens}).encode()
        req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"},
                                     method="POST")
        if self.api_key:  # unredirected as well: urllib would not copy it to a redirect's request
            req.add_unredirected_header("Authorization", f"Bearer {self.api_key}")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            e.close()
            return None, f"{'redirect' if 300 <= e.code < 400 else 'http'}_{e.code}"
        except (urllib.error.URLError, OSError, ValueError) as e:  # refused, timeout, bad URL
            return None, f"connection ({type(e).__name__})"
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, "malformed_json"
        try:
            text = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return None, "no_content"
        if not isinstance(text, str):
            return None, "no_content"
        return text, None

    def _one(self, args):
        prompt, completion, reference, policy_first = args
        a, b = (completion, reference) if policy_first else (reference, completion)
        text, failure = self.ask(self.render(prompt, a, b))
        if failure is None:
            verdict = parse_verdict(text)
            if verdict is None:
                return None, "unparsable", text
            return verdict, None, None
        return None, failure, None

    def judge(self, prompts, completions, references) -> Verdicts:
        rng = random.Random(self.seed)
        firsts = [rng.random() < 0.5 for _ in prompts]  # which side the policy is shown on
        jobs = list(zip(prompts, completions, references, firsts))
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            results = list(pool.map(self._one, jobs))
        v = Verdicts([], policy_shown_first=sum(firsts))
        for (verdict, failure, text), first in zip(results, firsts):
            if verdict is None:
                v.outcomes.append(None)
                v.failures[failure] += 1
                v.first_failure.setdefault(failure, (text or "")[:200])
                continue
            v.a_verdicts += verdict == "A"
            v.outcomes.append(1.0 if (verdict == "A") == first else 0.0)
        self.check_failures(v)
        return v

    def check_failures(self, v: Verdicts) -> None:
        """JudgeError when more than half of the calls failed (all of them: a wrong key, URL or model)."""
        failed, total = sum(v.failures.values()), len(v.outcomes)
        if total and 2 * failed > total:
            kinds = "; ".join(f"{count} × {describe_failure(kind)}" for kind, count in v.failures.most_common())
            raise JudgeError(f"judge {self.url}: {failed} of {total} calls failed: {kinds}")
