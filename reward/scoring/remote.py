"""A client for the HTTP reward server (``rlhf/serve/reward_server.py``), so RL can score rollouts on a remote reward model
instead of loading it in local reward workers.

``RemoteRewardClient(url).score(prompts, responses)`` posts to ``<url>/score`` in batches and returns one float
per sample. Connection errors, timeouts and 5xx answers are retried with exponential back-off (the server may be
restarting or briefly overloaded); 4xx answers are not (the request itself is wrong and would fail again).
Failures raise a one-line ``RuntimeError`` naming the URL and the status. Standard library only.
"""
from __future__ import annotations

import http.client
import json
import logging
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from rlhf.core.http.client import RedirectRefused, credential_opener

logger = logging.getLogger(__name__)

class RemoteRewardClient:
    """Scores (prompt, response) pairs on a reward server.

    ``url`` is the server's base URL (``http://host:port``; a URL already ending in ``/score`` is used as is).
    ``token_env`` names an environment variable holding the bearer token; the token is read once, here, and never
    logged. ``retries`` is the number of retries after the first attempt; waits are ``backoff_s * 2**k``.
    """

    def __init__(self, url: str, token_env: str | None = None, timeout_s: float = 30, retries: int = 3,
                 batch_size: int = 256, backoff_s: float = 0.5):
        if batch_size <= 0 or retries < 0 or timeout_s <= 0:
            raise ValueError("batch_size and timeout_s must be positive and retries non-negative")
        base = url.rstrip("/")
        self.url = base if base.endswith("/score") else base + "/score"
        parsed = urllib.parse.urlsplit(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"reward server URL must be http(s)://host:port, got {url!r}")
        self._token: str | None = None
        if token_env:
            self._token = os.environ.get(token_env) or None
            if self._token is None:
                raise ValueError(f"environment variable {token_env} (the reward server token) is not set")
        self.timeout_s, self.retries, self.batch_size, self.backoff_s = timeout_s, retries, batch_size, backoff_s
        # Redirects are refused (the token would follow them); a local server bypasses http_proxy.
        self._opener = credential_opener(parsed.hostname)

    def __repr__(self) -> str:  # never show the token
        return f"RemoteRewardClient({self.url!r}, token={'set' if self._token else 'none'})"

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """One reward per (prompt, response), in order, scored ``batch_size`` pairs per request."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rewards: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            batch_p = list(prompts[start:start + self.batch_size])
            batch_r = list(responses[start:start + self.batch_size])
            answer = self._post({"prompts": batch_p, "responses": batch_r})
            rewards.extend(self._check_rewards(answer, len(batch_p)))
        return rewards

    def _check_rewards(self, answer: Any, n: int) -> list[float]:
        got = answer.get("rewards") if isinstance(answer, dict) else None
        if not isinstance(got, list) or len(got) != n:
            raise RuntimeError(f"reward server {self.url} sent a malformed answer (expected {n} rewards)")
        try:
            rewards = [float(r) for r in got]
        except (TypeError, ValueError):
            raise RuntimeError(f"reward server {self.url} sent a non-numeric reward") from None
        if not all(math.isfinite(r) for r in rewards):
            raise RuntimeError(f"reward server {self.url} sent a non-finite reward")
        return rewards

    def _post(self, payload: dict[str, Any]) -> Any:
        body = json.dumps(payload).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        attempts, problem = self.retries + 1, ""
        for attempt in range(attempts):
            retry_after = 0.0
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    raw = response.read()
            except RedirectRefused as err:
                raise RuntimeError(f"reward server {self.url}: {err.reason}") from None
            except urllib.error.HTTPError as err:
                retry_after = _seconds(err.headers.get("Retry-After"))  # a busy server (503) says when to come back
                problem = f"HTTP {err.code}: {_error_message(err)}"
                if err.code < 500:
                    raise RuntimeError(f"reward server {self.url} refused the request: {problem}") from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
                reason = err.reason if isinstance(err, urllib.error.URLError) else err
                problem = f"connection error: {_oneline(repr(reason))}"
            else:
                try:
                    return json.loads(raw)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise RuntimeError(f"reward server {self.url} answered 200 with malformed JSON") from None
            if attempt + 1 < attempts:
                delay = max(self.backoff_s * 2 ** attempt, retry_after)
                logger.warning("reward server %s: %s; retry %d/%d in %.2fs", self.url, problem, attempt + 1,
                               self.retries, delay)
                time.sleep(delay)
        raise RuntimeError(f"reward server {self.url} failed after {attempts} attempts: {problem}")


def _seconds(value: str | None, most: float = 60.0) -> float:
    try:
        return min(most, max(0.0, float(value))) if value else 0.0
    except ValueError:
        return 0.0  # an HTTP date: our own back-off applies


def _oneline(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _error_message(err: urllib.error.HTTPError) -> str:
    """The server's ``{"error": ...}`` line when it sent one, else the HTTP reason phrase."""
    try:
        message = json.loads(err.read()).get("error")
    except Exception:  # a proxy's HTML page, an empty body: fall back to the reason
        message = None
    finally:
        err.close()
    return _oneline(str(message or err.reason))
