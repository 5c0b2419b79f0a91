"""The chat-endpoint judge against a local stub of the OpenAI chat API (127.0.0.1), malformed
replies included, and `directpo eval` end to end (reward, KL, win rate, sweep, plot)."""
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from directpo.cli import main
from directpo.eval.judge import PROMPTS, ChatJudge, JudgeError, RewardJudge, parse_verdict
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


def test_chat_judge_unbiased_order_and_failures(stub_url, monkeypatch):
    monkeypatch.setenv("DIRECTPO_JUDGE_API_KEY", "sk-test")
    StubJudge.requests.clear()
    judge = ChatJudge(stub_url, "stub-gpt", seed=0, workers=3)
    n = 40
    prompts = [f"Question {i}?" for i in range(n)]
    policy = [f"GOOD answer {i}" for i in range(n)]
    refs = [f"plain answer {i}" for i in range(n)]
    v = judge.judge(prompts, policy, refs).summary()
    assert v["win_rate"] == 1.0 and v["judged"] == n and v["judge_parse_failures"] == 0
    # the policy is shown as A about half the time, and the verdicts follow it
    assert 0.25 < v["judge_policy_first_rate"] < 0.75
    assert v["judge_a_rate"] == pytest.approx(v["judge_policy_first_rate"])
    req = StubJudge.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["body"]["model"] == "stub-gpt"
    assert req["auth"] == "Bearer sk-test" and req["body"]["temperature"] == 0
    assert "which response is more helpful?" in req["body"]["messages"][0]["content"]

    # A judge with a position bias ("always A"): randomised order turns it into a coin flip
    v = judge.judge(prompts, ["ALWAYS-A"] * n, refs).summary()
    assert v["win_rate"] == pytest.approx(v["judge_policy_first_rate"]) and v["judge_a_rate"] == 1.0

    # Malformed replies are counted by kind and never crash; the rest still count
    bad = ["BADJSON", "NOCHOICES", "NOVERDICT", "ERROR500"]
    policy = bad + [f"GOOD {i}" for i in range(6)]
    v = judge.judge(prompts[:10], policy, refs[:10]).summary()
    assert v["judge_parse_failures"] == 4 and v["judged"] == 6 and v["win_rate"] == 1.0
    assert v["judge_failure_kinds"] == {"malformed_json": 1, "no_content": 1, "unparsable": 1, "http_500": 1}
    assert "neither" in v["judge_failure_examples"]["unparsable"]

    # Exactly half failing is still counted (5 of 10); more than half is an error naming them by kind
    v = judge.judge(prompts[:10], ["ERROR500"] * 5 + [f"GOOD {i}" for i in range(5)], refs[:10]).summary()
    assert v["judge_parse_failures"] == 5 and v["judged"] == 5
    with pytest.raises(JudgeError, match=r"6 of 10 calls failed: 4 × HTTP 500 Internal Server Error; "
                                         r"2 × malformed JSON replies$"):
        judge.judge(prompts[:10], ["ERROR500"] * 4 + ["BADJSON"] * 2 + ["GOOD"] * 4, refs[:10])

    # Nothing listening: every call fails, an error (not a null win rate)
    dead = ChatJudge("http://127.0.0.1:9", "m", timeout=2)
    with pytest.raises(JudgeError, match=r"1 of 1 calls failed: 1 × connection"):
        dead.judge(["q"], ["a"], ["b"])


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
    assert "\n" not in msg and "5 of 5 calls failed" in msg
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
        judge = ChatJudge(f"http://127.0.0.1:{first.server_address[1]}/v1", "m", workers=2)
        with pytest.raises(JudgeError) as e:
            judge.judge(["q1", "q2", "q3"], ["a"] * 3, ["b"] * 3)
    finally:
        for server in (first, elsewhere):
            server.shutdown()
            server.server_close()
    assert Redirect.seen == ["Bearer sk-secret"] * 3  # the endpoint itself gets the key
    assert Elsewhere.seen == []  # the redirect is not followed: the key reaches no other address
    assert f"3 of 3 calls failed: 3 × HTTP {code}" in str(e.value) and "redirect not followed" in str(e.value)


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
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = [json.loads(line) for line in open(tmp_path / "s.jsonl")]
    assert len(samples) == 24 and all(s["reward"] == s["completion"].count("e") for s in samples)
    # The same with an LLM judge on the stub endpoint, and no reward: no reward keys, a win rate
    assert main(common + ["--judge-url", stub_url, "--judge-model", "stub", "--out", "j.json"]) == 0
    res = json.loads((tmp_path / "j.json").read_text())
    assert "reward_mean" not in res and res["judge_parse_failures"] == 0 and 0 <= res["win_rate"] <= 1
    # A judge refusing every call (HTTP 401): exit 2 with one line saying why, and no results file
    monkeypatch.setenv("DIRECTPO_JUDGE_API_KEY", "sk-wrong")
    capsys.readouterr()
    assert main(common + ["--judge-url", unauthorized_url, "--judge-model", "m", "--out", "u.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("directpo eval: error: judge ")
    assert "12 of 12 calls failed: 12 × HTTP 401 Unauthorized: check DIRECTPO_JUDGE_API_KEY / OPENAI_API_KEY" in err
    assert not (tmp_path / "u.json").exists()
    # Bad usage: a clear error, exit code 2
    assert main(common + ["--out", "x.json"]) == 2
    assert "give --reward-model, --reward-fn or --judge-url" in capsys.readouterr().err
    assert main(common + ["--judge-url", stub_url, "--out", "x.json"]) == 2
    assert "--judge-model" in capsys.readouterr().err
