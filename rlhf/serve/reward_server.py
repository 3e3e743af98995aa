"""An HTTP reward server around any scoring function, so RL jobs (ours, OpenRLHF's ``--remote_rm_url``) can score
rollouts with one shared reward model instead of loading it in every reward worker.

The model itself is plugged in by the caller as ``score_fn(prompts, responses) -> rewards``; this module only
speaks HTTP and JSON, using the standard library alone (rlhf/core/http/: the server, handler and queue).

Endpoints (all JSON; errors are ``{"error": "<one line>"}``):

- ``POST /get_reward``: OpenRLHF's shape, ``{"query": [prompt+response, ...], "prompts": [prompt, ...]}``. With
  ``prompts``, each query must start with its prompt and the response is the rest; without, the prompt is ``""``
  and the response is the whole query. Extra keys (OpenRLHF also sends ``labels``) are ignored.
- ``POST /score``: explicit pairs, ``{"prompts": [...], "responses": [...]}``.
- ``GET /health``: ``{"status": "ok"}``, never behind the token so load balancers and probes can use it.

Both scoring endpoints answer ``{"rewards": [float, ...]}``, one per sample, in order.

Under load (rlhf/core/http/queue.py): requests queue for ``max_concurrency`` scoring threads (1 by default: one
model), light requests ahead of heavy ones, and the waiting requests are scored together in one ``score_fn``
call of up to ``max_batch`` samples and 4096 tokens; a heavier request is scored in parts of that size, so a
light one waits for one part, not the whole of it. At most ``max_queue`` requests wait, each for at most ``queue_timeout_s``;
beyond that the answer is ``503 {"error": "busy: ..."}`` with ``Retry-After``, which ``RemoteRewardClient``
retries. Each sample is checked against ``max_tokens`` before it queues, tokenizing a bounded prefix only
(rlhf/core/http/limits.py). Connections are capped too (``max_connections``, rlhf/core/http/server.py).

Usage::

    server = make_reward_server(score_fn, port=0)   # port 0: the OS picks a free port
    server.start()                                  # serve from a daemon thread
    print(server.url)
    ...
    server.close()                                  # stop serving and release the port

or, blocking (the ``distilrl serve-rm`` command): ``serve_reward(score_fn, "127.0.0.1", 5000, token)``.
"""
from __future__ import annotations

import hmac
import logging
import math
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any

from rlhf.core.http.json_handler import HttpError, JsonHandler
from rlhf.core.http.limits import FALLBACK_CHARS_PER_TOKEN, tokens_within
from rlhf.core.http.logs import configure_logging
from rlhf.core.http.queue import Busy, WorkQueue
from rlhf.core.http.server import BackgroundHTTPServer, serve_until_interrupted

logger = logging.getLogger(__name__)

ScoreFn = Callable[[list[str], list[str]], Sequence[float]]
CountTokensFn = Callable[[str, str], int]  # (prompt, response) -> the tokens the model would read


class RewardServer(BackgroundHTTPServer):
    """A threading HTTP server holding the scoring function, the limits and the queue in front of scoring."""

    def __init__(self, address: tuple[str, int], score_fn: ScoreFn, token: str | None,
                 max_request_bytes: int, max_batch: int, max_concurrency: int = 1, max_queue: int = 64,
                 queue_timeout_s: float = 30.0, max_connections: int = 256,
                 count_tokens: CountTokensFn | None = None, max_tokens: int | None = None,
                 chars_per_token: int = FALLBACK_CHARS_PER_TOKEN):
        super().__init__(address, _RewardHandler, max_connections)
        self.score_fn = score_fn
        self.count_tokens, self.max_tokens, self.chars_per_token = count_tokens, max_tokens, chars_per_token
        # Compare bytes so hmac.compare_digest accepts any token, not only ASCII ones.
        self.token_bytes = token.encode("utf-8") if token else None
        self.max_request_bytes, self.max_batch = max_request_bytes, max_batch
        # score_fn never runs in more threads at once than it was declared safe for (max_concurrency).
        self.queue = WorkQueue(self._score_batch, "scoring", max_queue, queue_timeout_s, max_concurrency, max_batch)

    def _score_batch(self, requests: list[tuple[list[str], list[str], int]]) -> list[list[float]]:
        """One score_fn call for the waiting requests (or parts of requests, each with its first sample's index);
        their rewards, checked, split back per request."""
        prompts = [p for request in requests for p in request[0]]
        responses = [r for request in requests for r in request[1]]
        rewards = [float(r) for r in self.score_fn(prompts, responses)]
        if len(rewards) != len(prompts):
            raise ValueError(f"score_fn returned {len(rewards)} rewards for {len(prompts)} samples")
        out, start = [], 0
        for request_prompts, _, first in requests:
            part = rewards[start:start + len(request_prompts)]
            for i, reward in enumerate(part):
                if not math.isfinite(reward):
                    # JSON has no NaN/Infinity; and a NaN reward would silently poison the advantage estimates.
                    raise ValueError(f"score_fn returned {reward} at index {first + i}")
            out.append(part)
            start += len(request_prompts)
        return out


class _RewardHandler(JsonHandler):
    server: RewardServer
    server_version = "distilrl-reward/1"
    routes = {"/health": ("GET", "health"), "/get_reward": ("POST", "get_reward"), "/score": ("POST", "score")}

    def authorize(self) -> None:
        expected = self.server.token_bytes
        if expected is None:
            return
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        # compare_digest takes time independent of where the strings differ, so the token cannot be guessed
        # byte by byte from response times.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8"), expected):
            raise HttpError(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token",
                            headers={"WWW-Authenticate": "Bearer"})

    def access_note(self) -> str:
        return f"n={getattr(self, '_batch', 0)}"

    def health(self) -> dict[str, Any]:
        return {"status": "ok"}

    def get_reward(self, body: Any) -> dict[str, Any]:
        body = _require_object(body)
        queries = _string_list(body, "query")
        if body.get("prompts") is None:
            return self._rewards([""] * len(queries), queries)
        prompts = _string_list(body, "prompts")
        _same_length(("query", queries), ("prompts", prompts))
        responses = []
        for i, (query, prompt) in enumerate(zip(queries, prompts)):
            if not query.startswith(prompt):
                raise HttpError(HTTPStatus.BAD_REQUEST, f"query[{i}] does not start with prompts[{i}]")
            responses.append(query[len(prompt):])
        return self._rewards(prompts, responses)

    def score(self, body: Any) -> dict[str, Any]:
        body = _require_object(body)
        prompts, responses = _string_list(body, "prompts"), _string_list(body, "responses")
        _same_length(("prompts", prompts), ("responses", responses))
        return self._rewards(prompts, responses)

    def _rewards(self, prompts: list[str], responses: list[str]) -> dict[str, Any]:
        n = self._batch = len(prompts)
        if n > self.server.max_batch:
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"batch of {n} samples is over the limit of {self.server.max_batch}")
        if n == 0:
            return {"rewards": []}
        costs = self._check_lengths(prompts, responses)
        # A heavy request is scored in parts of bounded cost, so lighter requests get turns between them.
        parts, start, budget = [], 0, self.server.queue.max_batch_cost
        while start < n:
            end, cost = start + 1, costs[start]
            while end < n and cost + costs[end] <= budget:
                cost, end = cost + costs[end], end + 1
            parts.append(((prompts[start:end], responses[start:end], start), cost, end - start))
            start = end
        try:
            rewards = [r for part in self.server.queue.submit_parts(parts, batch_key="score") for r in part]
        except Busy as err:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, f"busy: {err}; retry later",
                            headers={"Retry-After": str(self.server.retry_after_s)}) from None
        except Exception as err:  # a model error must cost one request, not the server
            logger.error("score_fn failed on a batch of %d: %s: %s", n, type(err).__name__, err)
            raise HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, f"score_fn failed: {type(err).__name__}: {err}")
        return {"rewards": rewards}

    def _check_lengths(self, prompts: list[str], responses: list[str]) -> list[int]:
        """Each sample's cost in tokens (characters without a token counter). One over-long sample would keep
        the model busy for minutes while every other client waits: it is refused (400, naming the limit) before
        it queues, tokenizing no more than a bounded prefix of it."""
        server = self.server
        count, limit = server.count_tokens, server.max_tokens
        if count is None or limit is None:
            return [len(p) + len(r) for p, r in zip(prompts, responses)]
        costs = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            # The prompt's tokens count with any prefix of the response: cut the joined text, split it back.
            joined = prompt + response
            tokens = tokens_within(lambda text: count(prompt[:len(text)], text[len(prompt):]), joined, limit,
                                   server.chars_per_token)
            if tokens is None or tokens > limit:
                raise HttpError(HTTPStatus.BAD_REQUEST, f"sample {i} has {tokens or f'more than {limit}'} tokens, "
                                f"over this server's limit of {limit} tokens per prompt + response")
            costs.append(tokens)
        return costs

    def error_payload(self, err: HttpError) -> dict[str, Any]:
        return {"error": err.message}


def _require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"body must be a JSON object, got {type(body).__name__}")
    return body


def _string_list(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key)
    if value is None:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"missing {key!r}: a list of strings")
    if not isinstance(value, list):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{key!r} must be a list of strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise HttpError(HTTPStatus.BAD_REQUEST, f"{key}[{i}] must be a string, got {type(item).__name__}")
    return value


def _same_length(a: tuple[str, list[str]], b: tuple[str, list[str]]) -> None:
    if len(a[1]) != len(b[1]):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{a[0]!r} has {len(a[1])} items but {b[0]!r} has {len(b[1])}")


def make_reward_server(score_fn: ScoreFn, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                       max_request_bytes: int = 1_000_000, max_batch: int = 1024, max_concurrency: int = 1,
                       max_queue: int = 64, queue_timeout_s: float = 30.0, max_connections: int = 256,
                       count_tokens: CountTokensFn | None = None, max_tokens: int | None = None,
                       chars_per_token: int = FALLBACK_CHARS_PER_TOKEN) -> RewardServer:
    """Bind a reward server (not yet serving): call ``.start()`` for a background thread or ``.serve_forever()``.

    ``port=0`` lets the OS pick a free port (see ``.url``). ``token``, when given, is required on the scoring
    endpoints as ``Authorization: Bearer <token>``. ``max_concurrency``: scoring calls at once (raise it only for
    a thread-safe ``score_fn``); ``max_queue``, ``queue_timeout_s``: how many requests may wait, and how long,
    before the answer is 503 busy; ``max_connections``: open connections (one thread each). ``count_tokens`` and
    ``max_tokens``: a sample (prompt + response) of more tokens is refused with 400; ``chars_per_token``: the
    most characters one token spans (rlhf/core/http/limits.py ``max_chars_per_token``), longer texts are refused
    untokenized.
    """
    if min(max_request_bytes, max_batch, max_concurrency, max_connections, chars_per_token) <= 0 \
            or max_queue < 0 or queue_timeout_s <= 0:
        raise ValueError("max_request_bytes, max_batch, max_concurrency, max_connections, chars_per_token and "
                         "queue_timeout_s must be positive and max_queue non-negative")
    if max_tokens is not None and (max_tokens <= 0 or count_tokens is None):
        raise ValueError("max_tokens must be positive and needs count_tokens")
    return RewardServer((host, port), score_fn, token or None, max_request_bytes, max_batch, max_concurrency,
                        max_queue, queue_timeout_s, max_connections, count_tokens, max_tokens, chars_per_token)


def serve_reward(score_fn: ScoreFn, host: str = "127.0.0.1", port: int = 5000, token: str | None = None,
                 max_request_bytes: int = 1_000_000, max_batch: int = 1024, **limits) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM turned into KeyboardInterrupt), then release the port; prints
    a ready line and one line per request (rlhf/core/http/logs.py). ``limits``: ``make_reward_server``'s
    max_concurrency, max_queue, queue_timeout_s, max_connections, count_tokens, max_tokens, chars_per_token."""
    server = make_reward_server(score_fn, host, port, token, max_request_bytes, max_batch, **limits)
    configure_logging()
    if not token and host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("reward server on %s has no token: anyone who can reach it can use it", host)
    serve_until_interrupted(server, f"distilrl serve-rm (token {'required' if token else 'off'})")
