"""Issue #27, item 8: a judge call is bounded. `--judge-timeout` is a wall-clock deadline per call
(connect, send and the whole reply: a server dripping one byte at a time no longer holds a call for
minutes) and `--judge-max-reply-bytes` caps what is read of a reply (a 200 MB reply no longer takes
1 GB). Both are failures by kind (`deadline`, `reply_too_large`) in `directpo eval`'s results, and
over --judge-max-failure-rate one line and exit 2. Loopback only."""
import json
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from directpo.cli import main
from directpo.toy import review_task, write_jsonl

REPLY_MB = 200


class Misbehaving(BaseHTTPRequestHandler):
    """A chat-completions endpoint. Compared responses carrying DRIP get their reply one byte every
    0.5 s (of a 100 kB body, hanging up after 30 bytes: 15 s, so that a client without a deadline
    fails the test's timing instead of hanging it); HUGE, a 200 MB reply streamed without a
    Content-Length (so the client must read it to find its size); the rest a verdict."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        with self.server.lock:
            self.server.requests.append(content)
        try:
            if "DRIP" in content:
                self._drip()
            elif "HUGE" in content:
                self._huge()
            else:
                reply = {"choices": [{"message": {"content": "Comparison: fine.\nMore helpful: A"}}]}
                payload = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
        except OSError:  # the client hung up: what these tests want
            pass

    def _drip(self):
        start = time.monotonic()
        try:
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(30):
                self.wfile.write(b" ")
                time.sleep(0.5)
        finally:  # how long the client stayed: until it hung up (a failed write), or to the end
            with self.server.lock:
                self.server.drips.append(time.monotonic() - start)

    def _huge(self):
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        self.send_response(200)
        self.end_headers()
        piece, sent = b" " * (1 << 16), 0
        try:
            while sent < REPLY_MB * 1_000_000:  # made chunk by chunk: the test never holds 200 MB
                self.wfile.write(piece)
                sent += len(piece)
        finally:
            with self.server.lock:
                self.server.sent.append(sent)


@pytest.fixture
def endpoint():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    srv.lock, srv.requests, srv.sent, srv.drips = threading.Lock(), [], [], []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _wait_for(condition, seconds=5.0):
    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.05)


def test_a_200mb_reply_keeps_the_client_small(endpoint, tmp_path):
    """The judge in a fresh process (so that its peak RSS is its own) against a 200 MB reply: it
    reads at most the 1 MB cap, the peak RSS grows by a few MB (1 GB before), the server got out
    about the cap before the client hung up, and the call is not retried."""
    script = textwrap.dedent(f"""
        import json, resource, time
        from directpo.eval.judge import ChatJudge, JudgeError
        judge = ChatJudge({endpoint.url!r}, "m", order="random", retries=3, backoff=0.01)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.monotonic()
        try:
            judge.judge(["q"], ["HUGE"], ["r"])
            error = None
        except JudgeError as e:
            error = str(e)
        print(json.dumps(dict(error=error, seconds=time.monotonic() - start,
                              growth_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["error"].endswith("1 × reply_too_large (over --judge-max-reply-bytes 1048576, abandoned unread): "
                                 "check --judge-url, or raise --judge-max-reply-bytes")
    assert out["growth_kb"] < 100_000, out  # KB on Linux: under 100 MB
    assert out["seconds"] < 10, out
    _wait_for(lambda: endpoint.sent)
    assert len(endpoint.requests) == 1 and len(endpoint.sent) == 1  # not retried
    assert endpoint.sent[0] < 16_000_000, endpoint.sent  # of 200 MB: the cap and the socket buffers


def _eval(model, endpoint, out, *flags):
    return main(["eval", "--model", str(model), "--ref", str(model), "--prompts", "pairs.jsonl", "--n", "2",
                 "--max-new-tokens", "4", "--no-progress", "--judge-url", endpoint.url, "--judge-model", "m",
                 "--judge-timeout", "2", "--judge-retries", "0", "--out", out, *flags])


def test_eval_counts_deadline_and_oversized_failures_and_stops_over_the_rate(endpoint, tiny_model, tmp_path,
                                                                              monkeypatch, capsys):
    """6 prompts × 2 samples = 12 comparisons; the references of prompt 0 make the judge drip, those
    of prompt 1 make it send 200 MB: 4 comparisons fail. Within --judge-max-failure-rate the results
    count them by kind and judge the other 8; over it, one line naming both kinds and exit 2, no
    results file. Each dripping call ends at its 2 s deadline (before: when the server hung up)."""
    rows, _ = review_task(n_train=6, n_eval=1, seed=5)
    rows[0]["chosen"] += " DRIP"
    rows[1]["chosen"] += " HUGE"
    write_jsonl(rows, tmp_path / "pairs.jsonl")
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    assert _eval(tiny_model, endpoint, "ok.json", "--judge-max-failure-rate", "0.5") == 0
    assert time.monotonic() - start < 60
    _wait_for(lambda: len(endpoint.drips) == 4)
    # 4 dripping calls (2 comparisons × 2 orders), each left at its deadline: 2 s and the next drip
    assert len(endpoint.drips) == 4 and max(endpoint.drips) < 4, endpoint.drips
    res = json.loads((tmp_path / "ok.json").read_text())
    entry = res["temperatures"][0]  # the whole summary; its headline keys are copied to the top
    assert entry["judge_failure_kinds"] == {"deadline": 2, "reply_too_large": 2}
    assert res["judge_failures"] == entry["judge_failures"] == 4 and res["judged"] == entry["judged"] == 8
    assert entry["judge_calls"] == 24 and entry["judge_retries"] == 0
    capsys.readouterr()

    start = time.monotonic()
    assert _eval(tiny_model, endpoint, "over.json", "--judge-max-failure-rate", "0.25") == 2
    assert time.monotonic() - start < 60
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert re.fullmatch(
        r"directpo eval: error: judge http://127\.0\.0\.1:\d+/v1/chat/completions: 4 of 12 comparisons failed \(over "
        r"--judge-max-failure-rate 0\.25(; stopped there, \d+ not judged)?\): "
        r"(2 × deadline \(no whole reply within --judge-timeout 2 s: connect, send and reply\): check that "
        r"--judge-url is responsive, or raise --judge-timeout(; )?|2 × reply_too_large \(over "
        r"--judge-max-reply-bytes 1048576, abandoned unread\): check --judge-url, or raise "
        r"--judge-max-reply-bytes(; )?){2}", err), err
    assert not (tmp_path / "over.json").exists()
