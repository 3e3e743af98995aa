"""An LLM judge behind an OpenAI-compatible ``/v1/chat/completions`` endpoint (OpenAI, vLLM, SGLang, our own
``rlhf.serve.policy_server`` policy server), using only the standard library.

Per row it sends the shared grading prompt asking for a JSON verdict and reads the reply with ``parse_verdict``.
Requests run in a pool of ``concurrency`` threads; connection errors, timeouts, 429 and 5xx are retried with
exponential back-off (other 4xx are not: asking again will not help); replies are cached on disk (``cache.py``)
so a second run over the same rows pays nothing. A row whose request fails for good, or whose reply cannot be
parsed, becomes an error verdict.

The API key is read from the environment variable the config names. It is sent in the Authorization header and
nowhere else: not in the cache key or file, not in errors, not in ``repr``.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from reward.teachers.base import Verdict, check_rows, failed, one_line
from reward.teachers.cache import ReplyCache, request_key
from reward.teachers.parsing import parse_verdict
from reward.teachers.prompts import JSON_INSTRUCTION, SYSTEM, rubric
from rlhf.core.http.client import RedirectRefused, credential_opener

_MAX_RETRY_AFTER_S = 60.0  # a server asking us to wait longer than this is treated as asking for the maximum


class _RequestFailed(Exception):
    """A request that failed for good; the message is the row's one-line error."""


class OpenAITeacher:
    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, concurrency: int = 8,
                 max_retries: int = 4, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 timeout_s: float = 120.0, cache_dir: str | Path | None = None, max_tokens: int = 512,
                 temperature: float = 0.0):
        self.url = _endpoint(base_url)
        if not model:
            raise ValueError("the judge model name is empty")
        if concurrency < 1 or max_retries < 0 or backoff_s < 0 or timeout_s <= 0 or max_tokens < 1:
            raise ValueError("judge settings out of range: need concurrency >= 1, max_retries >= 0, backoff_s >= 0, "
                             "timeout_s > 0, max_tokens >= 1")
        self._api_key: str | None = None
        if api_key_env:
            self._api_key = os.environ.get(api_key_env) or None
            if self._api_key is None:
                raise ValueError(f"environment variable {api_key_env} (the judge API key) is not set or empty")
        self.model = model
        self.concurrency = concurrency
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self.timeout_s = timeout_s
        self.max_tokens, self.temperature = max_tokens, temperature
        self.cache = ReplyCache(cache_dir) if cache_dir is not None else None
        self._opener = credential_opener(urllib.parse.urlsplit(self.url).hostname)  # never follows a redirect
        self._stats_lock = threading.Lock()
        self.stats = {"http_requests": 0, "retries": 0, "cache_hits": 0, "failed_rows": 0}

    def __repr__(self) -> str:
        return (f"OpenAITeacher(url={self.url!r}, model={self.model!r}, concurrency={self.concurrency}, "
                f"api_key={'set' if self._api_key else 'none'})")

    def judge(self, prompts: list[str], responses: list[str], references: list[str | None]) -> list[Verdict]:
        check_rows(prompts, responses, references)
        replies = self._replies([self._payload(p, r, ref) for p, r, ref in zip(prompts, responses, references)])
        verdicts = [self._verdict(reply) for reply in replies]
        self._count("failed_rows", sum(v.error is not None for v in verdicts))
        return verdicts

    def _replies(self, payloads: list[dict[str, Any]]) -> list[str | _RequestFailed]:
        """One reply per payload, in order: from the cache, else fetched concurrently (one request per distinct
        payload, however many rows share it); a request that failed for good comes back as ``_RequestFailed``."""
        keys = [request_key(p, self.url) for p in payloads]
        replies: dict[str, str | _RequestFailed] = {}
        todo: dict[str, dict[str, Any]] = {}
        for key, payload in zip(keys, payloads):
            cached = self.cache.get(key) if self.cache is not None else None
            if cached is not None:
                replies[key] = cached
            elif key not in replies:
                todo[key] = payload
        self._count("cache_hits", len(keys) - sum(k in todo for k in keys))
        if todo:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(todo)),
                                    thread_name_prefix="judge-http") as pool:
                for key, result in zip(todo, pool.map(self._fetch_or_error, todo.values(), todo.keys())):
                    replies[key] = result
        return [replies[key] for key in keys]

    # ---- one request ----

    def _payload(self, prompt: str, response: str, reference: str | None) -> dict[str, Any]:
        """The request body; also what the cache key hashes (so never anything secret)."""
        user = rubric(prompt, response, reference) + "\n" + JSON_INSTRUCTION
        return {"model": self.model, "messages": [{"role": "system", "content": SYSTEM},
                                                  {"role": "user", "content": user}],
                "temperature": self.temperature, "max_tokens": self.max_tokens}

    def _fetch_or_error(self, payload: dict[str, Any], key: str) -> str | _RequestFailed:
        try:
            reply = self._fetch(payload)
        except _RequestFailed as err:
            return err
        except Exception as err:  # a bug or an odd failure costs this row, never the labelling job
            return _RequestFailed(self._redact(f"judge request failed: {type(err).__name__}: {err}"))
        if self.cache is not None:
            self.cache.put(key, reply)
        return reply

    def _fetch(self, payload: dict[str, Any]) -> str:
        body = json.dumps(payload).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "distilrl-judge"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        reason = ""
        for attempt in range(self.max_retries + 1):
            wait = 0.0
            self._count("http_requests")
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with self._opener.open(request, timeout=self.timeout_s) as answer:
                    raw = answer.read()
                return self._content(raw)
            except RedirectRefused as err:
                raise _RequestFailed(self._redact(f"judge server {self.url}: {err.reason}")) from None
            except urllib.error.HTTPError as err:
                detail = _error_detail(err)
                reason = f"HTTP {err.code} from the judge server: {detail}"
                if err.code != 429 and err.code < 500:
                    raise _RequestFailed(self._redact(reason)) from None  # our request is wrong: retrying won't fix it
                wait = _retry_after(err.headers.get("Retry-After"))
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
                # URLError wraps refused/unreachable connections; socket timeouts and resets are OSErrors.
                cause = getattr(err, "reason", err)
                reason = f"cannot reach the judge server: {type(cause).__name__}: {cause}"
            if attempt < self.max_retries:
                self._count("retries")
                backoff = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
                # Jitter spreads out the retries of many threads that failed together (say, on one 429).
                time.sleep(max(wait, backoff * (1 + 0.25 * random.random())))
        raise _RequestFailed(self._redact(f"{reason} (gave up after {self.max_retries + 1} attempts)"))

    def _content(self, raw: bytes) -> str:
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _RequestFailed("malformed reply from the judge server (no choices[0].message.content)") from None
        if not isinstance(content, str):
            raise _RequestFailed("the judge server replied with no text content")
        return content

    def _verdict(self, reply: str | _RequestFailed) -> Verdict:
        if isinstance(reply, _RequestFailed):
            return failed(str(reply))
        try:
            parsed = parse_verdict(reply)
        except ValueError as err:
            return failed(f"unparseable judge reply: {err}")
        if parsed["quality"] is None:
            return failed("judge reply has no quality score")
        return Verdict(quality=parsed["quality"], correct=parsed["correct"], rv=parsed["rv"], cd=parsed["cd"])

    # ---- helpers ----

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[name] += n

    def _redact(self, text: str) -> str:
        """Error text can quote what a server sent back; make sure the key never rides along."""
        text = one_line(text)
        return text.replace(self._api_key, "***") if self._api_key else text


def _endpoint(base_url: str) -> str:
    """``https://host/v1`` (the OpenAI client's convention) or a bare ``http://host:port`` -> the chat URL."""
    parts = urllib.parse.urlsplit(base_url or "")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"judge base_url {base_url!r} is not an http(s) URL such as http://127.0.0.1:8000/v1")
    if parts.query or parts.fragment:
        raise ValueError(f"judge base_url {base_url!r} must not carry a query or fragment")
    path = parts.path.rstrip("/")
    if path.endswith("/chat/completions"):
        path = path[: -len("/chat/completions")]
    if not path:
        path = "/v1"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path + "/chat/completions", "", ""))


def _error_detail(err: urllib.error.HTTPError) -> str:
    try:
        raw = err.read(2000)
        message = json.loads(raw)["error"]
        message = message.get("message", message) if isinstance(message, dict) else message
    except Exception:
        message = err.reason
    return one_line(message, 160)


def _retry_after(value: str | None) -> float:
    try:
        return min(_MAX_RETRY_AFTER_S, max(0.0, float(value))) if value else 0.0
    except ValueError:
        return 0.0  # an HTTP-date: rare from APIs, and our own back-off applies anyway
