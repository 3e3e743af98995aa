"""An HTTP reward server around any scoring function, so RL jobs (ours, OpenRLHF's ``--remote_rm_url``) can score
rollouts with one shared reward model instead of loading it in every reward worker.

The model itself is plugged in by the caller as ``score_fn(prompts, responses) -> rewards``; this module only
speaks HTTP and JSON, using the standard library alone.

Endpoints (all JSON; errors are ``{"error": "<one line>"}``):

- ``POST /get_reward``: OpenRLHF's shape, ``{"query": [prompt+response, ...], "prompts": [prompt, ...]}``. With
  ``prompts``, each query must start with its prompt and the response is the rest; without, the prompt is ``""``
  and the response is the whole query. Extra keys (OpenRLHF also sends ``labels``) are ignored.
- ``POST /score``: explicit pairs, ``{"prompts": [...], "responses": [...]}``.
- ``GET /health``: ``{"status": "ok"}``, never behind the token so load balancers and probes can use it.

Both scoring endpoints answer ``{"rewards": [float, ...]}``, one per sample, in order.

Under load: at most ``max_concurrency`` scoring calls run at once (1 by default: one model, one lock) and at most
``max_queue`` more requests wait for a turn, each for at most ``queue_timeout_s``. A request beyond that, or one
that waited too long, is answered at once with ``503 {"error": "busy: ..."}`` and ``Retry-After``, which
``RemoteRewardClient`` retries; so a burst costs latency or a clear refusal, never unbounded memory or threads.
Connections are capped too (``max_connections``, rlhf/core/http/server.py). A client that disconnects mid-request
(while sending its body, or while its batch is scored) only loses its own answer.

Usage::

    server = make_reward_server(score_fn, port=0)   # port 0: the OS picks a free port
    server.start()                                  # serve from a daemon thread
    print(server.url)
    ...
    server.close()                                  # stop serving and release the port

or, blocking (the ``distilrl serve-rm`` command): ``serve_reward(score_fn, "127.0.0.1", 5000, token)``.
"""
from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any

from rlhf.core.http.server import BackgroundHTTPServer, GuardedHandler, parse_json

logger = logging.getLogger(__name__)

ScoreFn = Callable[[list[str], list[str]], Sequence[float]]
CountTokensFn = Callable[[str, str], int]  # (prompt, response) -> the tokens the model would read

# After refusing a request without reading its body (oversized, no token, wrong path) we still read and discard,
# never keep, up to this much of it for at most _DRAIN_TIMEOUT_S: an HTTP/1.x client sends its whole body before
# reading the answer, and closing a socket with unread input makes the kernel reset the connection, so without
# this the client would see "connection reset" instead of our 413 or 401. Larger bodies still get a reset; the
# server is not harmed either way.
_DRAIN_LIMIT_BYTES = 16 * 1024 * 1024
_DRAIN_TIMEOUT_S = 2.0
# A client that announces a body and then stalls must not hold a handler thread forever.
_SOCKET_TIMEOUT_S = 60.0
# No token spans more characters than this (Qwen2.5's longest is 128 bytes); a text longer than limit * this many
# characters is over the limit without being tokenized (tokenizing 1 MB costs a second of the server's CPU).
_MAX_CHARS_PER_TOKEN = 256


class _RequestError(Exception):
    """An error answered to the client as ``{"error": message}`` with an HTTP status."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _busy(why: str) -> "_RequestError":
    return _RequestError(HTTPStatus.SERVICE_UNAVAILABLE, f"busy: {why}; retry later",
                         {"Retry-After": str(RewardServer.retry_after_s)})


def _one_line(text: str, limit: int = 300) -> str:
    """Error messages go into JSON and log lines: keep them to one bounded line."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class RewardServer(BackgroundHTTPServer):
    """A threading HTTP server holding the scoring function, the limits and the lock that serialises scoring."""

    def __init__(self, address: tuple[str, int], score_fn: ScoreFn, token: str | None,
                 max_request_bytes: int, max_batch: int, max_concurrency: int = 1, max_queue: int = 64,
                 queue_timeout_s: float = 30.0, max_connections: int = 256,
                 count_tokens: CountTokensFn | None = None, max_tokens: int | None = None):
        super().__init__(address, _RewardHandler, max_connections)
        self.score_fn = score_fn
        self.count_tokens, self.max_tokens = count_tokens, max_tokens
        # Compare bytes so hmac.compare_digest accepts any token, not only ASCII ones.
        self.token_bytes = token.encode("utf-8") if token else None
        self.max_request_bytes = max_request_bytes
        self.max_batch = max_batch
        self.max_concurrency, self.max_queue, self.queue_timeout_s = max_concurrency, max_queue, queue_timeout_s
        # One model by default: score_fn never runs in more threads at once than it was declared safe for.
        self._score_slots = threading.BoundedSemaphore(max_concurrency)
        self._admitted = 0  # requests scoring or waiting to
        self._admitted_lock = threading.Lock()

    @contextlib.contextmanager
    def scoring_turn(self):
        """Hold one of the ``max_concurrency`` scoring slots, queueing behind at most ``max_queue`` requests;
        raises the 503 "busy" answer when the queue is full or the wait exceeds ``queue_timeout_s``."""
        with self._admitted_lock:
            if self._admitted >= self.max_concurrency + self.max_queue:
                raise _busy(f"{self.max_queue} requests are already queued for scoring")
            self._admitted += 1
        try:
            if not self._score_slots.acquire(timeout=self.queue_timeout_s):
                raise _busy(f"no scoring slot within {self.queue_timeout_s:g} s")
            try:
                yield
            finally:
                self._score_slots.release()
        finally:
            with self._admitted_lock:
                self._admitted -= 1


class _RewardHandler(GuardedHandler):
    server: RewardServer
    timeout = _SOCKET_TIMEOUT_S
    server_version = "distilrl-reward/1"

    # Routing table: path -> (method, handler name). Anything else is 404 (unknown path) or 405 (known path).
    _ROUTES = {"/health": ("GET", "_health"), "/get_reward": ("POST", "_get_reward"), "/score": ("POST", "_score")}

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        started = time.perf_counter()
        self._status, self._batch, self._body_read = 0, 0, False
        headers: dict[str, str] = {}
        try:
            status, payload = HTTPStatus.OK, self._route()
        except _RequestError as err:
            status, payload, headers = err.status, {"error": err.message}, err.headers
        except Exception as err:  # a bug here must cost one request, not leave the client without an answer
            logger.exception("reward server failed on %s %s", self.command, self.path)
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": _one_line(f"internal error: {err!r}")}
        try:
            self._send_json(status, payload, headers)
            if not self._body_read:
                self._discard_unread_body()
        except OSError:
            self.close_connection = True  # the client went away (reset, broken pipe, timeout): nothing more to do
        finally:
            # One line per request; headers (and so the token) are never logged.
            logger.info("%s %s %s -> %d (n=%d, %.1f ms)", self.client_address[0], self.command,
                        self.path.split("?", 1)[0], self._status, self._batch, (time.perf_counter() - started) * 1000)

    def _route(self) -> dict[str, Any]:
        path = self.path.split("?", 1)[0]
        if path not in self._ROUTES:
            raise _RequestError(HTTPStatus.NOT_FOUND, f"unknown path {path!r}; use /get_reward, /score or /health")
        method, handler = self._ROUTES[path]
        if self.command != method:
            raise _RequestError(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} accepts {method} only, not {self.command}",
                                {"Allow": method})
        if method == "POST":
            self._check_token()  # before reading anything: unauthenticated clients cost us no body reads
            body = self._read_json_body()
            return getattr(self, handler)(body)
        self.request_received()
        return getattr(self, handler)()

    def _check_token(self) -> None:
        expected = self.server.token_bytes
        if expected is None:
            return
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        # compare_digest takes time independent of where the strings differ, so the token cannot be guessed
        # byte by byte from response times.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8"), expected):
            raise _RequestError(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token",
                                {"WWW-Authenticate": "Bearer"})

    def _read_json_body(self) -> Any:
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            # Chunked bodies are not supported: without a length we cannot refuse oversize requests up front.
            self.close_connection = True
            raise _RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length header required")
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {_one_line(length_header, 40)!r}")
        if length > self.server.max_request_bytes:
            self.close_connection = True
            raise _RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                f"body of {length} bytes is over the limit of {self.server.max_request_bytes}")
        try:
            raw = self.rfile.read(length)
        except OSError as err:  # the client reset the connection or stalled past the socket timeout
            self._body_read = self.close_connection = True
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"body not received: {type(err).__name__}") from None
        self._body_read = True
        self.request_received()
        if len(raw) != length:
            self.close_connection = True
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"body ended after {len(raw)} of {length} bytes")
        try:
            return parse_json(raw)
        except ValueError as err:
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"malformed JSON: {err}") from None

    # ---- endpoints ----

    def _health(self) -> dict[str, Any]:
        return {"status": "ok"}

    def _get_reward(self, body: Any) -> dict[str, Any]:
        body = _require_object(body)
        queries = _string_list(body, "query")
        prompts = body.get("prompts")
        if prompts is None:
            return self._rewards([""] * len(queries), queries)
        prompts = _string_list(body, "prompts")
        _same_length(("query", queries), ("prompts", prompts))
        responses = []
        for i, (query, prompt) in enumerate(zip(queries, prompts)):
            if not query.startswith(prompt):
                raise _RequestError(HTTPStatus.BAD_REQUEST, f"query[{i}] does not start with prompts[{i}]")
            responses.append(query[len(prompt):])
        return self._rewards(prompts, responses)

    def _score(self, body: Any) -> dict[str, Any]:
        body = _require_object(body)
        prompts, responses = _string_list(body, "prompts"), _string_list(body, "responses")
        _same_length(("prompts", prompts), ("responses", responses))
        return self._rewards(prompts, responses)

    def _rewards(self, prompts: list[str], responses: list[str]) -> dict[str, Any]:
        n = self._batch = len(prompts)
        if n > self.server.max_batch:
            raise _RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                f"batch of {n} samples is over the limit of {self.server.max_batch}")
        if n == 0:
            return {"rewards": []}
        self._check_lengths(prompts, responses)
        try:
            with self.server.scoring_turn():
                raw = self.server.score_fn(prompts, responses)
            rewards = [float(r) for r in raw]
        except _RequestError:
            raise
        except Exception as err:  # a model error must cost one request, not the server
            logger.exception("score_fn failed on a batch of %d", n)
            raise _RequestError(HTTPStatus.INTERNAL_SERVER_ERROR,
                                _one_line(f"score_fn failed: {type(err).__name__}: {err}"))
        if len(rewards) != n:
            raise _RequestError(HTTPStatus.INTERNAL_SERVER_ERROR,
                                f"score_fn returned {len(rewards)} rewards for {n} samples")
        for i, reward in enumerate(rewards):
            if not math.isfinite(reward):
                # JSON has no NaN/Infinity; and a NaN reward would silently poison the advantage estimates.
                raise _RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, f"score_fn returned {reward} at index {i}")
        return {"rewards": rewards}

    def _check_lengths(self, prompts: list[str], responses: list[str]) -> None:
        """One over-long sample would keep the model busy for minutes while every other client waits: refuse it
        (400, naming the limit) before it takes a scoring turn."""
        count, limit = self.server.count_tokens, self.server.max_tokens
        if count is None or limit is None:
            return
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            if len(prompt) + len(response) > limit * _MAX_CHARS_PER_TOKEN:
                tokens = f"more than {limit}"  # too long to be worth tokenizing
            else:
                n = count(prompt, response)
                if n <= limit:
                    continue
                tokens = str(n)
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"sample {i} has {tokens} tokens, over this server's limit "
                                f"of {limit} tokens per prompt + response")

    # ---- responses and logging ----

    def _send_json(self, status: HTTPStatus, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, allow_nan=False).encode("utf-8")
        self._status = int(status)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _discard_unread_body(self) -> None:
        """After answering without reading the body (413, 401, 404...), read and throw it away, bounded, so that
        closing does not reset the connection before the client has read our answer; see _DRAIN_LIMIT_BYTES."""
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return
        if length <= 0:
            return
        self.close_connection = True
        remaining = min(length, _DRAIN_LIMIT_BYTES)
        deadline = time.monotonic() + _DRAIN_TIMEOUT_S
        try:
            self.connection.settimeout(_DRAIN_TIMEOUT_S)
            while remaining > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(remaining, 65536))
                if not chunk:
                    break
                remaining -= len(chunk)
        except OSError:
            pass  # the client closed or stalled: we are closing anyway

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class answers protocol errors (bad request line, unsupported method) in HTML; answer JSON."""
        self.close_connection = True
        status = HTTPStatus(code)
        logger.info("%s %s -> %d (%s)", self.client_address[0], self.command, code, message or status.phrase)
        self._send_json(status, {"error": _one_line(message or status.phrase)})

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _dispatch logs one line per request itself, with the batch size and latency

    def log_message(self, format: str, *args: Any) -> None:
        logger.warning("%s %s", self.client_address[0], format % args)


def _require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _RequestError(HTTPStatus.BAD_REQUEST, f"body must be a JSON object, got {type(body).__name__}")
    return body


def _string_list(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key)
    if value is None:
        raise _RequestError(HTTPStatus.BAD_REQUEST, f"missing {key!r}: a list of strings")
    if not isinstance(value, list):
        raise _RequestError(HTTPStatus.BAD_REQUEST, f"{key!r} must be a list of strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"{key}[{i}] must be a string, got {type(item).__name__}")
    return value


def _same_length(a: tuple[str, list[str]], b: tuple[str, list[str]]) -> None:
    if len(a[1]) != len(b[1]):
        raise _RequestError(HTTPStatus.BAD_REQUEST,
                            f"{a[0]!r} has {len(a[1])} items but {b[0]!r} has {len(b[1])}")


def make_reward_server(score_fn: ScoreFn, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                       max_request_bytes: int = 1_000_000, max_batch: int = 1024, max_concurrency: int = 1,
                       max_queue: int = 64, queue_timeout_s: float = 30.0, max_connections: int = 256,
                       count_tokens: CountTokensFn | None = None, max_tokens: int | None = None) -> RewardServer:
    """Bind a reward server (not yet serving): call ``.start()`` for a background thread or ``.serve_forever()``.

    ``port=0`` lets the OS pick a free port (see ``.url``). ``token``, when given, is required on the scoring
    endpoints as ``Authorization: Bearer <token>``. ``max_concurrency``: scoring calls at once (raise it only for
    a thread-safe ``score_fn``); ``max_queue``, ``queue_timeout_s``: how many requests may wait, and how long,
    before the answer is 503 busy; ``max_connections``: open connections (one thread each). ``count_tokens`` and
    ``max_tokens``: a sample (prompt + response) of more tokens is refused with 400.
    """
    if min(max_request_bytes, max_batch, max_concurrency, max_connections) <= 0 or max_queue < 0 \
            or queue_timeout_s <= 0:
        raise ValueError("max_request_bytes, max_batch, max_concurrency, max_connections and queue_timeout_s must "
                         "be positive and max_queue non-negative")
    if max_tokens is not None and (max_tokens <= 0 or count_tokens is None):
        raise ValueError("max_tokens must be positive and needs count_tokens")
    return RewardServer((host, port), score_fn, token or None, max_request_bytes, max_batch, max_concurrency,
                        max_queue, queue_timeout_s, max_connections, count_tokens, max_tokens)


def serve_reward(score_fn: ScoreFn, host: str = "127.0.0.1", port: int = 5000, token: str | None = None,
                 max_request_bytes: int = 1_000_000, max_batch: int = 1024, **limits) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM turned into KeyboardInterrupt), then release the port.
    ``limits``: ``make_reward_server``'s max_concurrency, max_queue, queue_timeout_s, max_connections, count_tokens,
    max_tokens."""
    server = make_reward_server(score_fn, host, port, token, max_request_bytes, max_batch, **limits)
    if not token and host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("reward server on %s has no token: anyone who can reach it can use it", host)
    logger.info("reward server listening on %s (token %s)", server.url, "required" if token else "off")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("reward server interrupted; shutting down")
    finally:
        server.server_close()
