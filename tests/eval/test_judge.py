"""The chat-endpoint judge against a local stub of the OpenAI chat API (127.0.0.1), malformed
replies included, both orders (swapped, random), the local judges of `build_judge`, and `directpo
eval` end to end (reward, KL, win rate, sweep, plot). More server scenarios: test_judge_server.py."""
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from directpo.cli import main
from directpo.eval.judge import (PROMPTS, ChatJudge, JudgeError, RewardJudge, backoff_delay, build_judge,
                                 parse_verdict, retry_after_seconds)
from directpo.toy import review_task, write_jsonl


pytestmark = pytest.mark.usefixtures("one_thread")


class StubJudge(BaseHTTPRequestHandler):
    """POST /v1/chat/completions. The reply depends on markers in the compared responses:
    'GOOD' wins (the verdict names its position); 'ALWAYS-A' answers A; 'BADJSON' / 'NOCHOICES' /
    'NOVERDICT' / 'ERROR500' misbehave in those ways."""

    requests: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StubJudge.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        text = body["messages"][0]["content"]
        m = re.search(r"Response A:\n(.*?)\n\nResponse B:\n(.*?)\n\nFIRST", text, re.S)
        a, b = m.group(1), m.group(2)
        both = a + b
        if "ERROR500" in both:
            return self._send(500, b'{"error": "boom"}')
        if "BADJSON" in both:
            return self._send(200, b'{"choices": [{"message": {"content": "More helpful: A"')
        if "NOCHOICES" in both:
            return self._send(200, json.dumps({"object": "chat.completion", "choices": []}).encode())
        if "NOVERDICT" in both:
            content = "Comparison: both are fine.\nMore helpful: neither"
        elif "ALWAYS-A" in both:
            content = "Comparison: A reads better.\nMore helpful: A"
        else:
            winner = "A" if "GOOD" in a else "B"
            content = f"Comparison: Response {winner} is the good one.\nMore helpful: \"{winner}\""
        reply = {"id": "x", "object": "chat.completion", "model": body["model"],
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                              "finish_reason": "stop"}]}
        self._send(200, json.dumps(reply).encode())

    def _send(self, code, payload: bytes):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture(scope="module")
def stub_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_parse_verdict():
    assert parse_verdict("Comparison: A is longer but B is right.\nMore helpful: B") == "B"
    assert parse_verdict('Comparison: x\nMore helpful: "A"') == "A"
    assert parse_verdict("Comparison: x\nPreferred: <B>") == "B"
    assert parse_verdict("Comparison: x\n**More helpful:** A") == "A"
    assert parse_verdict("Some text.\nA") == "A"
    for bad in ("", "More helpful: neither", "I cannot decide.", None, "More helpful: C"):
        assert parse_verdict(bad) is None


def test_chat_judge_swapped_order_and_failures(stub_url, monkeypatch):
    monkeypatch.setenv("DIRECTPO_JUDGE_API_KEY", "sk-test")
    StubJudge.requests.clear()
    judge = ChatJudge(stub_url, "stub-gpt", seed=0, workers=3, backoff=0.0, max_failure_rate=0.5)
    n = 20
    prompts = [f"Question {i}?" for i in range(n)]
    policy = [f"GOOD answer {i}" for i in range(n)]
    refs = [f"plain answer {i}" for i in range(n)]
    v = judge.judge(prompts, policy, refs).summary()
    assert v["win_rate"] == 1.0 and v["judged"] == n and v["judge_parse_failures"] == 0
    # each comparison asked twice, the policy once as A and once as B: consistent verdicts, half of them A
    assert v["judge_calls"] == 2 * n == len(StubJudge.requests) and v["judge_retries"] == 0
    assert v["judge_consistency"] == 1.0 and v["judge_a_rate"] == 0.5
    assert v["judge_kind"] == f"chat endpoint {stub_url}/chat/completions model stub-gpt (position-swapped)"
    shown_first = [r["body"]["messages"][0]["content"].split("Response A:\n")[1].startswith("GOOD")
                   for r in StubJudge.requests]
    assert sum(shown_first) == n
    req = StubJudge.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["body"]["model"] == "stub-gpt"
    assert req["auth"] == "Bearer sk-test" and req["body"]["temperature"] == 0
    assert "which response is more helpful?" in req["body"]["messages"][0]["content"]

    # A judge with a position bias ("always A"): each comparison's two verdicts disagree, a tie
    v = judge.judge(prompts, ["ALWAYS-A"] * n, refs).summary()
    assert v["win_rate"] == 0.5 and v["judge_consistency"] == 0.0 and v["judge_a_rate"] == 1.0

    # Malformed replies are counted by kind (once per comparison) and never crash; the rest still count.
    # HTTP 500 is retried (3 times per call, both calls), the others are not.
    bad = ["BADJSON", "NOCHOICES", "NOVERDICT", "ERROR500"]
    policy = bad + [f"GOOD {i}" for i in range(6)]
    v = judge.judge(prompts[:10], policy, refs[:10]).summary()
    assert v["judge_parse_failures"] == v["judge_failures"] == 4 and v["judged"] == 6 and v["win_rate"] == 1.0
    assert v["judge_failure_kinds"] == {"malformed_json": 1, "no_content": 1, "unparsable": 1, "http_500": 1}
    assert "neither" in v["judge_failure_examples"]["unparsable"]
    assert v["judge_retries"] == 6 and v["judge_calls"] == 20

    # Exactly the allowed fraction failing is still counted (5 of 10 at 0.5); more is an error by kind
    v = judge.judge(prompts[:10], ["ERROR500"] * 5 + [f"GOOD {i}" for i in range(5)], refs[:10]).summary()
    assert v["judge_parse_failures"] == 5 and v["judged"] == 5
    with pytest.raises(JudgeError, match=r"6 of 10 comparisons failed \(over --judge-max-failure-rate 0.5"
                                         r"(; stopped there, \d not judged)?\): 4 × HTTP 500 Internal Server "
                                         r"Error; 2 × malformed JSON replies$"):
        judge.judge(prompts[:10], ["ERROR500"] * 4 + ["BADJSON"] * 2 + ["GOOD"] * 4, refs[:10])

    # Nothing listening: every call fails (retried: refused connections are transient), an error
    dead = ChatJudge("http://127.0.0.1:9", "m", timeout=2, retries=1, backoff=0.01)
    with pytest.raises(JudgeError, match=r"1 of 1 comparisons failed .*: 1 × connection \(ConnectionRefusedError\): "
                                         r"check that --judge-url is reachable$"):
        dead.judge(["q"], ["a"], ["b"])


def test_chat_judge_random_order(stub_url):
    """The older mode: one call per comparison, the policy's side a seeded coin flip; a position
    bias then turns into a coin flip, unseen in the verdicts' consistency (there is none)."""
    judge = ChatJudge(stub_url, "stub-gpt", seed=0, workers=3, order="random")
    n = 40
    prompts = [f"Question {i}?" for i in range(n)]
    refs = [f"plain answer {i}" for i in range(n)]
    v = judge.judge(prompts, [f"GOOD answer {i}" for i in range(n)], refs).summary()
    assert v["win_rate"] == 1.0 and v["judge_calls"] == n and "judge_consistency" not in v
    assert 0.25 < v["judge_policy_first_rate"] < 0.75
    assert v["judge_a_rate"] == pytest.approx(v["judge_policy_first_rate"])
    assert v["judge_kind"].endswith("(random order)")
    v = judge.judge(prompts, ["ALWAYS-A"] * n, refs).summary()
    assert v["win_rate"] == pytest.approx(v["judge_policy_first_rate"]) and v["judge_a_rate"] == 1.0


def test_backoff_and_retry_after():
    assert [backoff_delay(k, 1.0, rand=lambda: 1.0) for k in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff_delay(2, 1.0, rand=lambda: 0.0) == 2.0  # jitter: between half and all of it
    assert backoff_delay(0, 1.0, retry_after=0.0) == 0.0 and backoff_delay(0, 1.0, retry_after=600) == 30
    assert retry_after_seconds({"Retry-After": "7"}) == 7.0
    assert retry_after_seconds({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert retry_after_seconds({"Retry-After": "-3"}) is None and retry_after_seconds({}) is None


class Always401(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        payload = b'{"error": {"message": "Incorrect API key provided"}}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class Elsewhere(BaseHTTPRequestHandler):
    """The redirect's target: records every request and whether it carried the API key."""

    seen: list = []

    def log_message(self, *args):
        pass

    def _record(self):
        Elsewhere.seen.append({"method": self.command, "auth": self.headers.get("Authorization")})
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _record


def _serve(handler):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def unauthorized_url():
    server = _serve(Always401)
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_judge_answering_401_always_is_an_error(unauthorized_url, monkeypatch):
    monkeypatch.setenv("DIRECTPO_JUDGE_API_KEY", "sk-wrong")
    judge = ChatJudge(unauthorized_url, "m", workers=2)
    with pytest.raises(JudgeError) as e:
        judge.judge([f"q{i}" for i in range(5)], ["a"] * 5, ["b"] * 5)
    msg = str(e.value)
    assert "\n" not in msg and re.search(r"[1-5] of 5 comparisons failed", msg)
    assert "HTTP 401 Unauthorized: check DIRECTPO_JUDGE_API_KEY / OPENAI_API_KEY" in msg


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_judge_follows_no_redirect_and_never_sends_the_key_elsewhere(code, monkeypatch):
    elsewhere = _serve(Elsewhere)
    target = f"http://127.0.0.1:{elsewhere.server_address[1]}/v1/chat/completions"

    class Redirect(BaseHTTPRequestHandler):
        seen: list = []

        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            Redirect.seen.append(self.headers.get("Authorization"))
            self.send_response(code)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

    first = _serve(Redirect)
    Elsewhere.seen.clear()
    monkeypatch.setenv("DIRECTPO_JUDGE_API_KEY", "sk-secret")
    try:
        judge = ChatJudge(f"http://127.0.0.1:{first.server_address[1]}/v1", "m", workers=1, order="random")
        with pytest.raises(JudgeError) as e:
            judge.judge(["q1", "q2", "q3"], ["a"] * 3, ["b"] * 3)
    finally:
        for server in (first, elsewhere):
            server.shutdown()
            server.server_close()
    # one worker: the first failure ends the run; a redirect is not retried
    assert Redirect.seen == ["Bearer sk-secret"]  # the endpoint itself gets the key
    assert Elsewhere.seen == []  # the redirect is not followed: the key reaches no other address
    assert f"1 of 3 comparisons failed (over --judge-max-failure-rate 0.1; stopped there, 2 not judged): " \
           f"1 × HTTP {code}" in str(e.value) and "redirect not followed" in str(e.value)


def test_judge_prompt_choices(tmp_path):
    assert "summaries" in ChatJudge("http://x", "m", prompt="summary").render("post", "a", "b")
    tpl = tmp_path / "t.txt"
    tpl.write_text("Q {query} A {a} B {b}")
    assert ChatJudge("http://x", "m", prompt=str(tpl)).render("q", "1", "2") == "Q q A 1 B 2"
    with pytest.raises(ValueError):
        ChatJudge("http://x", "m", prompt="nonexistent-style")
    assert set(PROMPTS) == {"dialogue", "summary"}
    assert RewardJudge(lambda p, c: [len(x) for x in c]).judge(["p"] * 3, ["aa", "a", "aaa"],
                                                               ["a", "a", "aaaa"]).outcomes == [1.0, 0.5, 0.0]


def test_eval_command(tiny_model, tmp_path, stub_url, unauthorized_url, monkeypatch, capsys):
    (tmp_path / "rew.py").write_text("def n_e(prompt, completion):\n    return completion.count('e')\n")
    rows, _ = review_task(n_train=6, n_eval=1, seed=8)
    write_jsonl(rows, tmp_path / "pairs.jsonl")
    monkeypatch.chdir(tmp_path)
    common = ["eval", "--model", str(tiny_model), "--ref", str(tiny_model), "--prompts", "pairs.jsonl", "--n", "2",
              "--max-new-tokens", "5", "--no-progress"]
    # π = πref: KL exactly 0; reward and win rate (judged by the reward) with a temperature sweep and plot
    assert main(common + ["--reward-fn", "rew:n_e", "--temperatures", "0.5,1.0", "--out", "r.json",
                          "--plot", "r.png", "--samples-out", "s.jsonl"]) == 0
    # it reports the final paths (written atomically: never the temporary names)
    out, err = capsys.readouterr()
    printed = json.loads(out.strip().splitlines()[-1])
    assert (printed["out"], printed["samples_out"], printed["plot"]) == ("r.json", "s.jsonl", "r.png")
    assert ".tmp" not in out + err and "-> r.json, s.jsonl, r.png" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl", "r.json", "r.png", "rew.py", "s.jsonl"]
    res = json.loads((tmp_path / "r.json").read_text())
    for key in ("reward_mean", "reward_se", "kl_mean", "kl_se", "length_mean", "win_rate"):
        assert key in res, key
    assert res["kl_mean"] == 0.0 and res["kl_se"] == 0.0 and res["kl_samples"] == 12
    assert [e["temperature"] for e in res["temperatures"]] == [0.5, 1.0]
    assert all(e["samples"] == 12 and 0 <= e["win_rate"] <= 1 for e in res["temperatures"])
    for e in res["temperatures"] + [res]:  # each temperature, and the headline (T = 1) copied to the top
        assert e["judge_kind"] == "reward (higher wins)" and e["judged"] == 12
        lo, hi = e["win_rate_ci"]
        assert lo <= e["win_rate"] <= hi and 0 <= e["win_rate_lc"] <= 1 and len(e["win_rate_lc_ci"]) == 2
    assert res["win_rate_ci"] == res["temperatures"][1]["win_rate_ci"]
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = [json.loads(line) for line in open(tmp_path / "s.jsonl")]
    assert len(samples) == 24 and all(s["reward"] == s["completion"].count("e") for s in samples)
    # The same with an LLM judge on the stub endpoint, and no reward: no reward keys, a win rate
    assert main(common + ["--judge-url", stub_url, "--judge-model", "stub", "--out", "j.json"]) == 0
    res = json.loads((tmp_path / "j.json").read_text())
    assert "reward_mean" not in res and res["judge_parse_failures"] == 0 and 0 <= res["win_rate"] <= 1
    assert res["judge_kind"].endswith("model stub (position-swapped)") and 0 <= res["judge_consistency"] <= 1
    assert res["temperatures"][0]["judge_calls"] == 24
    # A judge refusing every call (HTTP 401): exit 2 with one line saying why, and no results file
    monkeypatch.setenv("DIRECTPO_JUDGE_API_KEY", "sk-wrong")
    capsys.readouterr()
    assert main(common + ["--judge-url", unauthorized_url, "--judge-model", "m", "--out", "u.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("directpo eval: error: judge ")
    assert re.search(r"\d+ of 12 comparisons failed \(over --judge-max-failure-rate 0.1; stopped there, \d+ not "
                     r"judged\): \d+ × HTTP 401 Unauthorized: check DIRECTPO_JUDGE_API_KEY / OPENAI_API_KEY$", err)
    assert not (tmp_path / "u.json").exists()
    # Bad usage: a clear error, exit code 2
    assert main(common + ["--out", "x.json"]) == 2
    assert "give --reward-model, --reward-fn or --judge-url" in capsys.readouterr().err
    assert main(common + ["--judge-url", stub_url, "--out", "x.json"]) == 2
    assert "--judge-model" in capsys.readouterr().err


def test_build_judge_choices_and_mistakes(stub_url):
    assert build_judge() is None
    j = build_judge(url=stub_url, model="m", order="random", retries=0, backoff=0.5, max_failure_rate=0.3,
                    timeout=5, workers=2, seed=3)
    assert isinstance(j, ChatJudge) and (j.order, j.retries, j.backoff, j.max_failure_rate) == ("random", 0, 0.5, 0.3)
    assert (j.timeout, j.workers, j.seed) == (5, 2, 3)
    for kwargs, message in [
            (dict(url=stub_url), "--judge-url needs --judge-model"),
            (dict(url=stub_url, model="m", classifier="c"), "give one judge, not --judge-url and --judge-classifier"),
            (dict(url=stub_url, model="m", order="both"), "judge order 'both': expected one of swap, random"),
            (dict(url=stub_url, model="m", max_failure_rate=1.0),
             r"--judge-max-failure-rate must be a number in \[0, 1\)"),
            (dict(url=stub_url, model="m", retries=-1), "--judge-retries must be an integer ≥ 0, got -1"),
            (dict(url="ftp://host/v1", model="m"), "expected an http:// or https:// URL")]:
        with pytest.raises(ValueError, match=message):
            build_judge(**kwargs)


def test_local_judges_are_labelled_and_judge(tiny_model, tmp_path):
    """A reward model and a Hugging Face classifier judge locally; `judge_kind` says that they are
    no LLM or human judge. A one-output classifier is read by its logit (a softmax over one class
    would be 1 for every answer: all ties)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    prompts, pol = ["Review: the film"] * 4, ["was great fun", "bored me", "is a film", "shines"]
    refs = ["was dull", "was lovely and warm", "is a film", "drags"]
    torch.manual_seed(0)
    one = AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=1)
    one.save_pretrained(tmp_path / "one")  # a saved head (a plain LM is refused: its head would be drawn at random)
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(tmp_path / "one")
    rm = build_judge(reward_model=str(tmp_path / "one"), device="cpu")
    s = rm.judge(prompts, pol, refs, clusters=[0, 0, 1, 1]).summary()
    assert s["judge_kind"] == f"local reward model {tmp_path / 'one'} (not an LLM/human judge)"
    assert s["judged"] == 4 and set(rm.judge(prompts, pol, refs).outcomes) <= {0.0, 0.5, 1.0}
    assert rm.judge(prompts, pol, refs).outcomes[2] == 0.5  # the same text scores the same: a tie

    clf = build_judge(classifier=str(tmp_path / "one"), device="cpu")
    v = clf.judge(prompts, pol, refs)
    assert v.kind == f"local classifier {tmp_path / 'one'} (not an LLM/human judge)"
    assert v.outcomes[2] == 0.5 and {v.outcomes[i] for i in (0, 1, 3)} <= {0.0, 1.0}  # decided, not tied
    two = AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=2)
    two.save_pretrained(tmp_path / "two")
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(tmp_path / "two")
    with pytest.raises(ValueError, match="no class named 'positive'"):
        build_judge(classifier=str(tmp_path / "two"), device="cpu")
    two_dir = str(tmp_path / "two")
    a = build_judge(classifier=two_dir, classifier_label="LABEL_1", device="cpu").judge(prompts, pol, refs)
    b = build_judge(classifier=two_dir, classifier_label="0", device="cpu").judge(prompts, pol, refs)
    # P(class 1) = 1 − P(class 0): the two labels judge every decided comparison the other way
    assert [1 - o for o in a.outcomes] == b.outcomes


def test_sweep_plot_error_bars_come_from_the_bootstrap_interval():
    from directpo.eval.evaluate import _error_bars

    entries = [{"win_rate": 0.6, "win_rate_se": 0.05, "win_rate_ci": [0.5, 0.75]},
               {"win_rate": 0.4, "win_rate_se": 0.05, "win_rate_ci": [None, None]}]  # NaN, after the JSON
    ys = [e["win_rate"] for e in entries]
    below, above = _error_bars(entries, "win_rate", ys)
    assert below == pytest.approx([0.1, 0.0]) and above == pytest.approx([0.15, 0.0])
    # without an interval: ± the standard error, as for the reward
    assert _error_bars([{"win_rate": 0.6, "win_rate_se": 0.05}], "win_rate", [0.6]) == [0.05]
    assert _error_bars([{"reward_mean": 1.0, "reward_se": 0.2}], "reward_mean", [1.0]) == [0.2]
