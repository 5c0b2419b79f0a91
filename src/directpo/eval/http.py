"""The HTTP client of the chat judge: one JSON POST to one URL, bounded, retried, never redirected.

* `JsonPostClient.post(body)`: the reply's bytes, or the kind of failure of its last attempt.
* Bounded: each attempt (connect, send, status line, headers and the whole reply) has a wall-clock
  deadline of `timeout` seconds. The socket's timeout is set to the time left before every read, so
  a server dripping one byte at a time is cut off at the deadline (a per-read timeout alone let one
  call run for minutes). A reply is read in chunks up to `max_reply_bytes`: one byte more (or a
  Content-Length over it) and the reply is abandoned unread, so memory is bounded by the setting.
* Retried: connection errors, the deadline and HTTP 408/429/5xx (`retries` times; exponential
  backoff from `backoff` seconds, doubling, jittered, at most BACKOFF_CAP; a Retry-After in seconds
  is honoured, at most BACKOFF_CAP too). A reply over the size cap, other HTTP errors (401, 403,
  404, ...) and redirects are not: they would fail again (an endpoint does not shrink its reply
  because it is asked twice), and a retry costs money.
* Never redirected: the request carries the API key (`Authorization: Bearer`), which must reach no
  address but `url`; a redirect is a failure of kind `redirect_<code>`.

Failure kinds: 'http_<code>', 'redirect_<code>', 'connection (<error>)', 'deadline',
'reply_too_large'. `describe_http` puts the HTTP ones in words.
"""
from __future__ import annotations

import functools
import http
import http.client
import io
import math
import random
import threading
import time
import urllib.error
import urllib.request
from typing import NamedTuple

BACKOFF_CAP = 30.0  # seconds: the longest wait before a retry, whatever the server asks
MAX_REPLY_BYTES = 1 << 20  # a chat completion of a few hundred tokens is a few kB; 1 MB leaves ample room
CHUNK = 1 << 16  # bytes read at a time: the reply is never asked for whole
DEADLINE = "deadline"
TOO_LARGE = "reply_too_large"


class Attempt(NamedTuple):
    """One request: the reply's bytes, or the kind of failure, whether it is worth retrying, and the
    server's Retry-After in seconds (None when it gave none)."""

    body: bytes | None
    failure: str | None = None
    transient: bool = False
    retry_after: float | None = None


class Reply(NamedTuple):
    """The outcome of `post`: the reply's bytes or the last attempt's failure kind, and the retries made."""

    body: bytes | None
    failure: str | None
    retries: int


def retry_after_seconds(headers) -> float | None:
    """A Retry-After header given in seconds; None when absent or an HTTP date (then the backoff applies)."""
    value = headers.get("Retry-After") if headers is not None else None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def backoff_delay(retry: int, base: float, retry_after: float | None = None, rand=random.random) -> float:
    """Seconds to wait before retry number `retry` (0 first): the server's Retry-After when it gave one,
    else base·2^retry scaled by a random factor in [½, 1) (so that parallel calls do not retry in
    step); at most BACKOFF_CAP either way."""
    if retry_after is not None:
        return min(retry_after, BACKOFF_CAP)
    return min(base * 2 ** retry, BACKOFF_CAP) * (0.5 + 0.5 * rand())


def describe_http(kind: str) -> str | None:
    """'http_401' -> 'HTTP 401 Unauthorized', 'redirect_302' -> the same with why it was not followed;
    None for a kind that is no HTTP status."""
    prefix, _, code = kind.partition("_")
    if prefix not in ("http", "redirect") or not code.isdigit():
        return None
    code = int(code)
    try:
        text = f"HTTP {code} {http.HTTPStatus(code).phrase}"
    except ValueError:
        text = f"HTTP {code}"
    if prefix == "redirect":
        return f"{text}: redirect not followed (the API key is never sent across one); give the final URL"
    return text


class DeadlineExceeded(TimeoutError):
    """The attempt's wall-clock deadline passed (a TimeoutError, as a socket's own timeout is)."""


class _Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left; DeadlineExceeded when none are (a socket timeout of 0 would mean non-blocking)."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the call's deadline passed")
        return left


class _DeadlineReader(io.RawIOBase):
    """The socket reader under an HTTP response: before each read, the socket's timeout becomes the
    time left, so the status line, the headers and the body are all read within the deadline."""

    def __init__(self, raw, sock, deadline: _Deadline):
        super().__init__()
        self._raw, self._sock, self._deadline = raw, sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:
        self._sock.settimeout(self._deadline.left())
        return self._raw.readinto(buffer)

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        if not self.closed:
            self._raw.close()  # lets the socket close once the connection has let go of it too
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock, *args, deadline: _Deadline, **kwargs):
        super().__init__(sock, *args, **kwargs)
        # nothing has been read yet: the buffered reader can be rebuilt over the deadline-keeping one
        self.fp = io.BufferedReader(_DeadlineReader(self.fp.detach(), sock, deadline))


class _DeadlineConnection:
    """Mixed into http.client's connections: connect (and the TLS handshake, and the request's send)
    within the time left; responses read through `_DeadlineResponse`."""

    def __init__(self, *args, deadline: _Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self._deadline = deadline
        self.response_class = functools.partial(_DeadlineResponse, deadline=deadline)

    def connect(self):
        self.timeout = self._deadline.left()
        super().connect()
        self.sock.settimeout(self._deadline.left())  # sendall: its timeout bounds the whole send


class _DeadlineHTTP(_DeadlineConnection, http.client.HTTPConnection):
    pass


class _DeadlineHTTPS(_DeadlineConnection, http.client.HTTPSConnection):
    pass


class _DeadlineHandler:
    """Mixed into urllib's handlers (so proxies and TLS settings stay urllib's): each request opens a
    connection bound to that request's own deadline (`req.deadline`; the handler is shared by threads)."""

    def do_open(self, http_class, req, **kwargs):
        kind = _DeadlineHTTPS if issubclass(http_class, http.client.HTTPSConnection) else _DeadlineHTTP
        return super().do_open(functools.partial(kind, deadline=req.deadline), req, **kwargs)


class _HTTPHandler(_DeadlineHandler, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_DeadlineHandler, urllib.request.HTTPSHandler):
    pass


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: the request carries the API key, which must reach no other address."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} not followed", headers, fp)


class _TooLarge(Exception):
    pass


def read_capped(resp, cap: int) -> bytes:
    """The whole reply, read CHUNK bytes at a time; _TooLarge as soon as it is known to exceed `cap`
    bytes (a Content-Length over it, or cap + 1 bytes read), without reading further."""
    if resp.length is not None and resp.length > cap:
        raise _TooLarge
    chunks, size = [], 0
    while True:
        chunk = resp.read(min(CHUNK, cap + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > cap:
            raise _TooLarge


class JsonPostClient:
    """POST JSON bodies to `url` (see the module's doc). `abort`: once set, waiting retries give up
    and no retry starts (the caller's run has failed)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0,
                 max_reply_bytes: int = MAX_REPLY_BYTES, retries: int = 3, backoff: float = 1.0):
        self.url, self.api_key, self.timeout, self.max_reply_bytes = url, api_key, timeout, max_reply_bytes
        self.retries, self.backoff = retries, backoff
        self.abort = threading.Event()
        self._opener = urllib.request.build_opener(_RefuseRedirects, _HTTPHandler, _HTTPSHandler)

    def attempt(self, body: bytes) -> Attempt:
        """One request within its deadline."""
        req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"},
                                     method="POST")
        req.deadline = _Deadline(self.timeout)
        if self.api_key:  # unredirected as well: urllib would not copy it to a redirect's request
            req.add_unredirected_header("Authorization", f"Bearer {self.api_key}")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return Attempt(read_capped(resp, self.max_reply_bytes))
        except urllib.error.HTTPError as e:
            retry_after = retry_after_seconds(e.headers)
            e.close()
            if 300 <= e.code < 400:
                return Attempt(None, f"redirect_{e.code}")
            return Attempt(None, f"http_{e.code}", e.code in (408, 429) or e.code >= 500, retry_after)
        except _TooLarge:
            return Attempt(None, TOO_LARGE)
        except urllib.error.URLError as e:  # while connecting or sending; or no usable URL (not retried)
            if isinstance(e.reason, TimeoutError):
                return Attempt(None, DEADLINE, True)
            transient = isinstance(e.reason, OSError)
            return Attempt(None, f"connection ({type(e.reason).__name__ if transient else 'URLError'})", transient)
        except TimeoutError:  # the socket's timeout is the time left: any timeout is the deadline
            return Attempt(None, DEADLINE, True)
        except (OSError, http.client.HTTPException) as e:  # cut off while reading the reply
            return Attempt(None, f"connection ({type(e).__name__})", True)
        except ValueError as e:  # a URL urllib cannot use
            return Attempt(None, f"connection ({type(e).__name__})")

    def post(self, body: bytes) -> Reply:
        """The reply's bytes, after the retries a transient failure gets; or the last failure's kind."""
        retries = 0
        while True:
            a = self.attempt(body)
            if a.failure is None or not a.transient or retries >= self.retries or self.abort.is_set():
                return Reply(a.body, a.failure, retries)
            if self.abort.wait(backoff_delay(retries, self.backoff, a.retry_after)):  # the run failed meanwhile
                return Reply(a.body, a.failure, retries)
            retries += 1
