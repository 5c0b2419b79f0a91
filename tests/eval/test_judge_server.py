"""The chat judge against a real HTTP server on 127.0.0.1 speaking the OpenAI chat-completions API,
scripted per test: position bias, a content judge, a length-biased judge, transient errors and
retries, refusals, the failure threshold, the API key's secrecy, and `directpo eval` end to end."""
import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from directpo.cli import main
from directpo.eval.judge import ChatJudge, JudgeError
from directpo.toy import review_task, write_jsonl

KEY = "sk-DIRECTPO-test-7f3a9c1e5b"  # distinctive: found anywhere it leaked to
PAIR = re.compile(r"Response A:\n(.*?)\n\nResponse B:\n(.*?)\n\nFIRST", re.S)


def reply(content: str):
    body = {"id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}
    return 200, {}, json.dumps(body).encode()


def verdict(letter: str):
    return reply(f"Comparison: Response {letter} is better.\nMore helpful: {letter}")


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        content = body["messages"][0]["content"]
        with server.lock:
            server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            server.seen[content] = server.seen.get(content, 0) + 1
            attempt = server.seen[content]
        a, b = PAIR.search(content).groups()
        code, headers, payload = server.behaviour(a, b, attempt, self)
        self.send_response(code)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(payload)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def server():
    """A scripted chat-completions endpoint: set `server.behaviour(a, b, attempt, handler)` ->
    (status, headers, body), `attempt` counting the requests with the same prompt (1 first)."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.lock, srv.requests, srv.seen = threading.Lock(), [], {}
    srv.behaviour = lambda a, b, attempt, h: verdict("A")
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def judge_of(server, **kwargs) -> ChatJudge:
    kwargs = {"workers": 4, "backoff": 0.01, **kwargs}
    return ChatJudge(server.url, "judge-m", **kwargs)


def test_position_biased_judge_gives_ties_and_zero_consistency(server):
    server.behaviour = lambda a, b, attempt, h: verdict("A")
    n = 12
    v = judge_of(server).judge([f"q{i}" for i in range(n)], [f"mine {i}" for i in range(n)],
                               [f"theirs {i}" for i in range(n)])
    s = v.summary()
    assert v.outcomes == [0.5] * n
    assert s["win_rate"] == 0.5 and s["judge_consistency"] == 0.0 and s["judge_a_rate"] == 1.0
    assert s["judge_calls"] == 2 * n == len(server.requests)
    # both orders of every comparison were asked
    firsts = sorted(PAIR.search(r["body"]["messages"][0]["content"]).group(1) for r in server.requests)
    assert firsts == sorted([f"mine {i}" for i in range(n)] + [f"theirs {i}" for i in range(n)])


def test_content_judge_is_consistent_and_right(server):
    server.behaviour = lambda a, b, attempt, h: verdict("A" if "GOOD" in a else "B")
    n = 10
    pol = [f"GOOD answer {i}" if i < 7 else f"answer {i}" for i in range(n)]
    ref = [f"reference {i}" if i < 7 else f"GOOD reference {i}" for i in range(n)]
    v = judge_of(server).judge([f"q{i}" for i in range(n)], pol, ref)
    s = v.summary()
    assert v.outcomes == [1.0] * 7 + [0.0] * 3
    assert s["win_rate"] == pytest.approx(0.7) and s["judge_consistency"] == 1.0 and s["judge_a_rate"] == 0.5
    assert s["judge_failures"] == 0 and s["judge_retries"] == 0


def test_length_biased_judge_raw_rate_high_length_controlled_near_half(server):
    """The judge prefers the longer answer (equal length: "A", so a tie once swapped). The policy is
    longer in 18 of 30 comparisons, shorter in 6, as long in 6: raw 0.7, at equal length ½."""
    def longer(a, b, attempt, h):
        la, lb = len(a.split()), len(b.split())
        return verdict("A" if la >= lb else "B")

    server.behaviour = longer
    pol = ["word " * 9] * 18 + ["word " * 3] * 6 + ["word " * 5] * 6
    ref = ["word " * 5] * 30
    s = judge_of(server).judge([f"q{i}" for i in range(30)], pol, ref).summary()
    assert s["win_rate"] == pytest.approx(0.7) and s["judge_consistency"] == pytest.approx(0.8)
    assert s["length_diff_mean"] == pytest.approx((18 * 4 - 6 * 2) / 30)
    assert s["win_rate_lc"] < s["win_rate"] - 0.15
    assert s["win_rate_lc"] == pytest.approx(0.5, abs=0.02)
    lo, hi = s["win_rate_ci"]
    assert lo < 0.7 < hi


def test_transient_errors_are_retried_and_counted(server):
    # HTTP 500 twice, then an answer: every call succeeds on its third request
    server.behaviour = lambda a, b, attempt, h: (500, {}, b'{"error": "overloaded"}') if attempt <= 2 else \
        verdict("A" if "GOOD" in a else "B")
    s = judge_of(server).judge(["q0", "q1"], ["GOOD 0", "GOOD 1"], ["r0", "r1"]).summary()
    assert s["win_rate"] == 1.0 and s["judge_failures"] == 0
    assert s["judge_calls"] == 4 and s["judge_retries"] == 8 and len(server.requests) == 12
    # HTTP 429 with Retry-After: 0 is honoured: no wait, although the backoff would be 20 s
    server.requests.clear()
    server.seen.clear()
    server.behaviour = lambda a, b, attempt, h: (429, {"Retry-After": "0"}, b"{}") if attempt == 1 else verdict("B")
    start = time.monotonic()
    s = judge_of(server, backoff=20.0).judge(["q0"], ["x"], ["y"]).summary()
    assert time.monotonic() - start < 5
    assert s["judged"] == 1 and s["judge_retries"] == 2 and len(server.requests) == 4
    # retries run out: the last kind is the failure
    server.behaviour = lambda a, b, attempt, h: (503, {}, b"{}") if "DOWN" in a + b else verdict("B")
    s = judge_of(server, retries=2, max_failure_rate=0.5).judge(["q0", "q1"], ["x", "DOWN"], ["y", "z"]).summary()
    assert s["judge_failures"] == 1 and s["judge_failure_kinds"] == {"http_503": 1} and s["judged"] == 1
    assert s["judge_retries"] == 4  # the failing comparison: 2 calls × 2 retries


@pytest.mark.parametrize("code", [400, 401, 403, 404])
def test_client_errors_are_not_retried(server, code):
    server.behaviour = lambda a, b, attempt, h: (code, {}, b'{"error": "no"}')
    with pytest.raises(JudgeError) as e:
        judge_of(server, workers=1).judge(["q0", "q1", "q2"], ["a"] * 3, ["b"] * 3)
    assert len(server.requests) == 1  # one request: no retry, and the run stops at the first failure
    assert f"1 × HTTP {code}" in str(e.value)
    if code in (401, 403):
        assert str(e.value).endswith("check DIRECTPO_JUDGE_API_KEY / OPENAI_API_KEY")


def test_always_401_names_the_key_variable(server, monkeypatch):
    monkeypatch.setenv("DIRECTPO_JUDGE_API_KEY", "sk-wrong")
    server.behaviour = lambda a, b, attempt, h: (401, {}, b'{"error": {"message": "Incorrect API key"}}')
    with pytest.raises(JudgeError, match=r"comparisons failed \(over --judge-max-failure-rate 0.1; stopped there, "
                                         r"\d+ not judged\): \d+ × HTTP 401 Unauthorized: check "
                                         r"DIRECTPO_JUDGE_API_KEY / OPENAI_API_KEY$"):
        judge_of(server).judge([f"q{i}" for i in range(20)], ["a"] * 20, ["b"] * 20)
    assert len(server.requests) < 40  # it stopped calling once the run had failed


def test_failure_threshold(server):
    """Comparisons whose answers carry FAIL get HTTP 500 every time: above the threshold an error,
    at or below it counted and left out of the win rate."""
    server.behaviour = lambda a, b, attempt, h: (500, {}, b"{}") if "FAIL" in a + b else verdict(
        "A" if "GOOD" in a else "B")
    prompts, ref = [f"q{i}" for i in range(20)], [f"r{i}" for i in range(20)]
    with pytest.raises(JudgeError, match=r"^judge http://127.0.0.1:\d+/v1/chat/completions: 3 of 20 comparisons "
                                         r"failed \(over --judge-max-failure-rate 0.1.*\): 3 × HTTP 500 Internal "
                                         r"Server Error$"):
        judge_of(server, retries=1).judge(prompts, ["FAIL"] * 3 + ["GOOD"] * 17, ref)
    s = judge_of(server, retries=1).judge(prompts, ["FAIL"] * 2 + ["GOOD"] * 18, ref).summary()
    assert s["judge_failures"] == s["judge_parse_failures"] == 2 and s["judge_failure_kinds"] == {"http_500": 2}
    assert s["judged"] == 18 and s["win_rate"] == 1.0 and s["judge_retries"] == 4  # 2 comparisons × 2 calls
    with pytest.raises(JudgeError, match="1 of 20 comparisons failed"):
        judge_of(server, retries=0, max_failure_rate=0.0).judge(prompts, ["FAIL"] + ["GOOD"] * 19, ref)


def test_api_key_reaches_the_endpoint_only(server, monkeypatch, capsys, caplog, tmp_path):
    monkeypatch.setenv("DIRECTPO_JUDGE_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)

    def echo(a, b, attempt, h):  # a judge that repeats the request's headers back: kept replies must not
        if "ECHO" in a + b:
            return reply(f"Your headers: {h.headers.get('Authorization')}. No verdict.")
        return verdict("A" if "GOOD" in a else "B")

    server.behaviour = echo
    s = judge_of(server, max_failure_rate=0.5).judge(["q0", "q1"], ["GOOD", "ECHO"], ["r", "r"]).summary()
    assert {r["auth"] for r in server.requests} == {f"Bearer {KEY}"}
    assert s["judge_failure_kinds"] == {"unparsable": 1} and "[API key]" in s["judge_failure_examples"]["unparsable"]
    # a redirect elsewhere is not followed: the other address never sees the request
    other = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    other.lock, other.requests, other.seen = threading.Lock(), [], {}
    other.behaviour = lambda a, b, attempt, h: verdict("A")
    threading.Thread(target=other.serve_forever, daemon=True).start()
    target = f"http://127.0.0.1:{other.server_address[1]}/v1/chat/completions"
    server.behaviour = lambda a, b, attempt, h: (307, {"Location": target}, b"")
    try:
        with pytest.raises(JudgeError) as e:
            judge_of(server).judge(["q0", "q1"], ["a", "b"], ["c", "d"])
    finally:
        other.shutdown()
        other.server_close()
    assert other.requests == [] and "HTTP 307" in str(e.value) and "redirect not followed" in str(e.value)
    out, err = capsys.readouterr()
    for text in (out, err, caplog.text, json.dumps(s), str(e.value), repr(e.value)):
        assert KEY not in text


def test_eval_command_with_the_judge_endpoint(server, tiny_model, tmp_path, monkeypatch, capsys):
    """`directpo eval --judge-url`: a length-preferring judge; the results carry the interval, the
    length-controlled rate and the judge's description, per temperature and at the top; the key is
    in no output."""
    server.behaviour = lambda a, b, attempt, h: verdict("A" if len(a.split()) >= len(b.split()) else "B")
    rows, _ = review_task(n_train=4, n_eval=1, seed=3)
    write_jsonl(rows, tmp_path / "pairs.jsonl")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIRECTPO_JUDGE_API_KEY", KEY)
    assert main(["eval", "--model", str(tiny_model), "--ref", str(tiny_model), "--prompts", "pairs.jsonl",
                 "--n", "2", "--max-new-tokens", "6", "--no-progress", "--judge-url", server.url,
                 "--judge-model", "m", "--judge-backoff", "0.01", "--out", "res.json"]) == 0
    out, err = capsys.readouterr()
    text = (tmp_path / "res.json").read_text()
    assert KEY not in out + err + text
    res = json.loads(text)
    entry = res["temperatures"][0]
    for e in (res, entry):
        lo, hi = e["win_rate_ci"]
        assert lo <= e["win_rate"] <= hi and 0 <= e["win_rate_lc"] <= 1
        assert e["judge_kind"] == f"chat endpoint {server.url}/chat/completions model m (position-swapped)"
        assert 0 <= e["judge_consistency"] <= 1 and e["judged"] == 8
    assert entry["judge_calls"] == 16 == len(server.requests) and entry["n_boot"] == 2000
    printed = json.loads(out.strip().splitlines()[-1])
    assert printed["win_rate_lc"] == res["win_rate_lc"] and printed["win_rate_ci"] == res["win_rate_ci"]
