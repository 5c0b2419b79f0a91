"""The chat judge against a real HTTP server on 127.0.0.1 speaking the OpenAI chat-completions API,
scripted per test: position bias, a content judge, a length-biased judge, transient errors and
retries, refusals, the failure threshold, the API key's secrecy, the per-call deadline (a slow
drip) and the reply-size cap (a 200 MB reply), and `directpo eval` end to end."""
import json
import logging
import re
import socket
import threading
import time
import tracemalloc
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
        result = server.behaviour(a, b, attempt, self)
        if result is None:  # the behaviour wrote the reply itself (slowly, or streamed)
            return
        code, headers, payload = result
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
    srv.lock, srv.requests, srv.seen, srv.sent = threading.Lock(), [], {}, []
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


# --- the per-call deadline and the reply-size cap (issue #27, item 8) ---

HEAD = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"


def drip(where: str, every: float = 0.5, bytes_sent: int = 24):
    """A behaviour sending one byte every `every` seconds: of the status line and headers ("head"), or
    of a 100 kB body after them ("body"). A per-read timeout never fires on it: each byte comes in time.
    It hangs up after `bytes_sent` bytes (12 s), so that a client without a deadline fails the test's
    timing instead of hanging it."""
    def behaviour(a, b, attempt, h):
        data = HEAD if where == "head" else b" " * 100_000
        try:
            if where == "body":
                h.wfile.write(HEAD)
            for i in range(bytes_sent):
                h.wfile.write(data[i:i + 1])
                time.sleep(every)
        except OSError:  # the client hung up: what the test wants
            pass
    return behaviour


def stream(total: int, content_length: bool, chunk: int = 1 << 16):
    """A behaviour streaming `total` bytes of spaces, made chunk by chunk (never held whole), with or
    without a Content-Length (without: the client reads until the server closes). `server.sent` gets
    the bytes the server managed to send before the client hung up."""
    def behaviour(a, b, attempt, h):
        # a small send buffer, so that what was sent is close to what the client took in
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        if content_length:
            h.send_header("Content-Length", str(total))
        h.end_headers()
        piece, sent = b" " * chunk, 0
        try:
            while sent < total:
                h.wfile.write(piece[:total - sent])
                sent += min(chunk, total - sent)
        except OSError:
            pass
        finally:
            with h.server.lock:
                h.server.sent.append(sent)
    return behaviour


@pytest.mark.parametrize("where", ["head", "body"])
def test_a_slow_drip_fails_the_call_at_its_deadline(server, where):
    """Before, --judge-timeout bounded each socket read: a server sending a byte every 2 s held one
    call for minutes. Now the call (connect, send, the whole reply) has a wall-clock deadline: a drip
    in the headers or in the body fails at 2 s, a failure of kind `deadline`; the other comparison
    is judged as usual."""
    normal = verdict("A")
    server.behaviour = lambda a, b, attempt, h: drip(where)(a, b, attempt, h) if "DRIP" in a + b else normal
    start = time.monotonic()
    s = judge_of(server, timeout=2, retries=0, max_failure_rate=0.5).judge(
        ["q0", "q1"], ["DRIP", "fine"], ["r0", "r1"]).summary()
    elapsed = time.monotonic() - start
    assert 2 <= elapsed < 5, elapsed
    assert s["judge_failure_kinds"] == {"deadline": 1} and s["judged"] == 1 and s["judge_retries"] == 0
    # over the threshold: one line naming the deadline and the flag that sets it
    start = time.monotonic()
    with pytest.raises(JudgeError, match=r"1 of 1 comparisons failed .*: 1 × deadline \(no whole reply within "
                                         r"--judge-timeout 2 s: connect, send and reply\): check that --judge-url "
                                         r"is responsive, or raise --judge-timeout$"):
        judge_of(server, timeout=2, retries=0, order="random").judge(["q2"], ["DRIP"], ["r2"])
    assert time.monotonic() - start < 5


def test_a_deadline_is_retried_like_a_timeout(server):
    """The first attempt drips past its 1 s deadline, the retry is answered: a success, one retry."""
    server.behaviour = lambda a, b, attempt, h: drip("body")(a, b, attempt, h) if attempt == 1 else verdict("B")
    start = time.monotonic()
    s = judge_of(server, timeout=1, retries=1, order="random").judge(["q0"], ["x"], ["y"]).summary()
    assert time.monotonic() - start < 4
    assert s["judged"] == 1 and s["judge_failures"] == 0 and s["judge_retries"] == 1 and len(server.requests) == 2


@pytest.mark.parametrize("content_length", [True, False], ids=["content-length", "read-until-close"])
def test_a_200mb_reply_is_abandoned_at_the_cap(server, content_length):
    """Before, a 200 MB reply was read whole (1 GB RSS). Now at most --judge-max-reply-bytes (1 MB) + 1
    is read (none when its Content-Length says it is larger): a failure of kind `reply_too_large`,
    not retried (the endpoint would send it again), and Python's allocations stay small."""
    server.behaviour = lambda a, b, attempt, h: stream(200_000_000, content_length)(a, b, attempt, h)
    tracemalloc.start()
    try:
        start = time.monotonic()
        with pytest.raises(JudgeError, match=r"1 × reply_too_large \(over --judge-max-reply-bytes 1048576, "
                                             r"abandoned unread\): check --judge-url, or raise "
                                             r"--judge-max-reply-bytes$"):
            judge_of(server, order="random", retries=3).judge(["q0"], ["x"], ["y"])
        elapsed = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    for _ in range(100):  # the server's thread notices the hang-up on its next write
        if server.sent:
            break
        time.sleep(0.05)
    assert len(server.requests) == 1 and len(server.sent) == 1  # not retried
    # what the server got out before the client hung up: the cap (when read) and the two socket buffers
    assert server.sent[0] < 16_000_000, server.sent
    assert peak < 20_000_000, peak
    assert elapsed < 5, elapsed


@pytest.mark.parametrize("content_length", [True, False], ids=["content-length", "read-until-close"])
def test_the_cap_is_exact(server, content_length):
    """A reply of exactly --judge-max-reply-bytes is read and judged; one byte more is refused."""
    def padded(size):
        body = json.dumps({"choices": [{"message": {"content": "Comparison: x.\nMore helpful: A"}}]}).encode()
        return body + b" " * (size - len(body))  # trailing whitespace: still valid JSON

    def behaviour(a, b, attempt, h):
        payload = padded(1024 if "FITS" in a + b else 1025)
        h.send_response(200)
        if content_length:
            h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    server.behaviour = behaviour
    s = judge_of(server, order="random", max_reply_bytes=1024, max_failure_rate=0.5).judge(
        ["q0", "q1"], ["FITS", "over"], ["r0", "r1"]).summary()
    assert s["judged"] == 1 and s["judge_failure_kinds"] == {"reply_too_large": 1}
    with pytest.raises(ValueError, match="--judge-max-reply-bytes must be an integer ≥ 1024, got 1023"):
        judge_of(server, max_reply_bytes=1023)
