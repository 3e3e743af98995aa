"""An OpenAI-compatible HTTP server for a policy checkpoint, so any OpenAI client (or our own ``OpenAITeacher``)
can talk to a student: ``distilrl serve CHECKPOINT``.

Endpoints (JSON; errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``):

- ``GET /v1/models``: the one model served.
- ``POST /v1/chat/completions``: ``messages`` (rendered with the tokenizer's chat template when it has one,
  otherwise the message contents joined by newlines), ``max_tokens`` (or ``max_completion_tokens``),
  ``temperature`` (0 = greedy), ``n``, ``seed``. Other OpenAI parameters are accepted and ignored; ``stream`` is
  refused. Generation goes through a rollout engine (rollout/engines.py: ``rollout.engine``, default
  ``hf_compact``), the same sampler RL and evaluation use.
- ``GET /health``.

One model, so generation is serialised with a lock; the HTTP side is threaded, so slow clients do not block each
other. Bodies over ``max_request_bytes`` (1 MB) get 413. Binds 127.0.0.1 unless told otherwise: there is no
authentication.

Usage in a test or script::

    server = make_server((model, tokenizer), port=0)   # port 0: the OS picks a free port; or a checkpoint directory
                                                       # (built with rollout.engine), or an engine object
    server.start()                                     # serve from a daemon thread
    ... POST f"{server.url}/v1/chat/completions" ...
    server.close()
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from http import HTTPStatus
from pathlib import Path
from typing import Any

import torch

from rlhf.core.config.run_config import RolloutConfig
from rlhf.core.http.server import BackgroundHTTPServer, GuardedHandler, parse_json
from rollout import vllm_engine  # noqa: F401 - registers the optional vllm engine (vllm itself loads when built)
from rollout.engines import ENGINES, HFEngine, RolloutEngine

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256  # when the request names none; also capped by the context left after the prompt
MAX_N = 64
MAX_SEED = 2**63 - 1  # torch's generator takes a 64-bit seed
_MAX_CHARS_PER_TOKEN = 256  # no token spans more characters (Qwen2.5's longest is 128 bytes)
# After refusing an oversized body, read and discard (up to a bound) what the client is still sending: closing a
# socket with unread input resets the connection, and the client would see "connection reset", not our 413.
_DRAIN_LIMIT_BYTES = 16 * 1024 * 1024
_DRAIN_TIMEOUT_S = 2.0
_SOCKET_TIMEOUT_S = 60.0  # a client that announces a body and stalls must not hold a thread forever


class _ApiError(Exception):
    """Answered as an OpenAI-style error JSON with this status."""

    def __init__(self, status: HTTPStatus, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def payload(self) -> dict[str, Any]:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": None}}


class PolicyServer(BackgroundHTTPServer):
    """The HTTP server holding the rollout engine, its tokenizer, the generation lock and a request counter."""

    def __init__(self, address: tuple[str, int], engine: RolloutEngine, model_name: str, max_request_bytes: int,
                 context_length: int | None):
        super().__init__(address, _Handler)
        self.engine, self.tokenizer, self.model_name = engine, engine.tokenizer, model_name
        self.model = getattr(engine, "model", None)  # the transformers model, for engines that hold one (hf)
        self.max_request_bytes = max_request_bytes
        self.context_length = context_length
        self.created = int(time.time())
        self.generate_lock = threading.Lock()  # one model: never generate from two threads at once
        self._count_lock = threading.Lock()
        self.request_count = 0  # every request answered, any path: lets tests and operators see traffic

    def count_request(self) -> None:
        with self._count_lock:
            self.request_count += 1


class _Handler(GuardedHandler):
    server: PolicyServer
    timeout = _SOCKET_TIMEOUT_S
    server_version = "distilrl-policy/1"

    _ROUTES = {"/v1/models": "GET", "/health": "GET", "/v1/chat/completions": "POST"}

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    # Other methods get 405 naming the allowed one (the base class would answer 501, a server error).
    do_PUT = do_DELETE = do_PATCH = do_POST

    def _dispatch(self) -> None:
        started = time.perf_counter()
        self._drain = 0
        try:
            status, payload = HTTPStatus.OK, self._route()
        except _ApiError as err:
            status, payload = err.status, err.payload()
        except Exception as err:  # a bug must cost one request, not leave the client hanging
            logger.exception("policy server failed on %s %s", self.command, self.path)
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, _ApiError(
                HTTPStatus.INTERNAL_SERVER_ERROR, _one_line(f"internal error: {err!r}")).payload()
        self.server.count_request()
        try:
            self._send_json(status, payload)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away
        logger.info("%s %s %s -> %d (%.1f ms)", self.client_address[0], self.command, self.path.split("?", 1)[0],
                    status, (time.perf_counter() - started) * 1000)

    def _route(self) -> dict[str, Any]:
        path = self.path.split("?", 1)[0].rstrip("/")
        method = self._ROUTES.get(path)
        if method is None:
            raise _ApiError(HTTPStatus.NOT_FOUND, f"unknown path {path!r}: use /v1/chat/completions or /v1/models")
        if self.command != method:
            raise _ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} accepts {method} only")
        if method == "GET":
            self.request_received()
        if path == "/health":
            return {"status": "ok"}
        if path == "/v1/models":
            return {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                "created": self.server.created, "owned_by": "distilrl"}]}
        return self._chat_completion(self._read_json())

    def _read_json(self) -> Any:
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self.close_connection = True
            raise _ApiError(HTTPStatus.LENGTH_REQUIRED, "Content-Length header required")
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise _ApiError(HTTPStatus.BAD_REQUEST, "bad Content-Length header") from None
        if length > self.server.max_request_bytes:
            self.close_connection = True
            self._drain = length
            raise _ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"request body of {length} bytes is over the limit of {self.server.max_request_bytes}")
        try:
            raw = self.rfile.read(length)
        except OSError as err:  # the client reset the connection, or missed the server's deadline
            self.close_connection = True
            raise _ApiError(HTTPStatus.BAD_REQUEST, f"request body not received: {type(err).__name__}") from None
        self.request_received()
        if len(raw) != length:
            self.close_connection = True
            raise _ApiError(HTTPStatus.BAD_REQUEST, f"request body ended after {len(raw)} of {length} bytes")
        try:
            return parse_json(raw)
        except ValueError as err:
            raise _ApiError(HTTPStatus.BAD_REQUEST, f"malformed JSON body: {err}") from None

    # ---- the completion ----

    def _chat_completion(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _ApiError(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object")
        if body.get("stream"):
            raise _ApiError(HTTPStatus.BAD_REQUEST, "streaming is not supported", "stream")
        messages = _messages(body.get("messages"))
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        n = _integer(body, "n", 1, 1, MAX_N)
        seed = _integer(body, "seed", None, 0, MAX_SEED)
        max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        requested = _integer(body, max_key, None, 1, None)

        server = self.server
        chars = sum(len(m["content"]) for m in messages)
        if server.context_length and chars > server.context_length * _MAX_CHARS_PER_TOKEN:
            # Surely over the context, and tokenizing it would hold the model's lock for a while: refuse it now.
            raise _ApiError(HTTPStatus.BAD_REQUEST, f"the messages hold {chars} characters: more than this model's "
                            f"maximum context length of {server.context_length} tokens", "messages")
        with server.generate_lock:  # tokenizer and engine together: neither is guaranteed thread-safe
            prompt = self._render(messages)
            prompt_tokens = len(server.tokenizer(prompt, add_special_tokens=False).input_ids)
            max_tokens = self._max_tokens(prompt_tokens, requested, max_key)
            try:
                # A seeded request samples from its own generator state: the global RNG (what unseeded requests
                # draw from) is put back as it was, so one client's seed never changes another's samples.
                with torch.random.fork_rng(devices=[], enabled=seed is not None):
                    if seed is not None:
                        torch.manual_seed(seed)
                    samples = server.engine.generate([prompt], n, max_tokens, temperature or 1.0, temperature == 0)
            except Exception as err:
                logger.exception("generation failed")
                raise _ApiError(HTTPStatus.INTERNAL_SERVER_ERROR,
                                _one_line(f"generation failed: {type(err).__name__}: {err}")) from None

        completion_tokens = sum(len(s.response_ids) for s in samples)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": server.model_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": s.text}, "logprobs": None,
                         "finish_reason": s.finish_reason} for i, s in enumerate(samples)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    def _render(self, messages: list[dict[str, str]]) -> str:
        tokenizer = self.server.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            return "\n".join(m["content"] for m in messages)
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # templates raise on what they do not accept (say, a role they do not know)
            raise _ApiError(HTTPStatus.BAD_REQUEST, _one_line(f"chat template refused the messages: {err}"),
                            "messages") from None

    def _max_tokens(self, prompt_tokens: int, requested: int | None, key: str) -> int:
        context = self.server.context_length
        if context is None:
            return requested or DEFAULT_MAX_TOKENS
        room = context - prompt_tokens
        if requested is None:
            if room < 1:
                raise _ApiError(HTTPStatus.BAD_REQUEST, f"the prompt has {prompt_tokens} tokens: no room left in "
                                f"this model's context of {context}", "messages")
            return min(DEFAULT_MAX_TOKENS, room)
        if requested > room:
            raise _ApiError(HTTPStatus.BAD_REQUEST, f"this model's maximum context length is {context} tokens; the "
                            f"prompt has {prompt_tokens} and {key} asks for {requested}", key)
        return requested

    # ---- answers ----

    def _send_json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        if self._drain:
            self._discard_input(self._drain)

    def _discard_input(self, length: int) -> None:
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
            pass  # the client closed or stalled: we close anyway

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol errors (bad request line, unknown method) the base class would answer in HTML: answer JSON."""
        self.close_connection = True
        self._drain = 0
        status = HTTPStatus(code)
        self._send_json(status, _ApiError(status, _one_line(message or status.phrase)).payload())

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _dispatch logs one line per request

    def log_message(self, format: str, *args: Any) -> None:
        logger.warning("%s %s", self.client_address[0], format % args)


def _messages(value: Any) -> list[dict[str, str]]:
    """Validated messages with text content; OpenAI's list-of-parts content is joined into one string."""
    if not isinstance(value, list) or not value:
        raise _ApiError(HTTPStatus.BAD_REQUEST, "'messages' must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _ApiError(HTTPStatus.BAD_REQUEST, f"messages[{i}] must be an object with a string 'role'",
                            "messages")
        content = message.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _ApiError(HTTPStatus.BAD_REQUEST, f"messages[{i}].content: only text parts are supported",
                                "messages")
            content = "".join(p["text"] for p in content)
        elif not isinstance(content, str):
            raise _ApiError(HTTPStatus.BAD_REQUEST, f"messages[{i}].content must be a string", "messages")
        out.append({"role": message["role"], "content": content})
    return out


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _ApiError(HTTPStatus.BAD_REQUEST, f"{key} must be a number in [{low}, {high}]", key)
    return float(value)


def _integer(body: dict[str, Any], key: str, default: int | None, low: int, high: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise _ApiError(HTTPStatus.BAD_REQUEST, f"{key} must be an integer {bounds}", key)
    return value


def _one_line(text: object, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def make_server(model: str | Path | tuple[Any, Any] | RolloutEngine, host: str = "127.0.0.1", port: int = 0,
                model_name: str | None = None, max_request_bytes: int = 1_000_000,
                rollout: RolloutConfig | None = None) -> PolicyServer:
    """Bind a policy server (not yet serving): ``.start()`` for a background thread, or ``.serve_forever()``.

    ``model`` is a checkpoint directory (Hugging Face format, safetensors), loaded into the engine that
    ``rollout.engine`` names (default ``hf_compact``, in ``rollout.dtype``); a loaded ``(model, tokenizer)`` pair,
    served by the hf engine as it is; or a built rollout engine. ``model_name`` defaults to the directory's name
    (``"distilrl-policy"`` otherwise).
    """
    if max_request_bytes <= 0:
        raise ValueError("max_request_bytes must be positive")
    model_dir = None
    if isinstance(model, (str, Path)):
        rollout = rollout or RolloutConfig()
        model_dir, model_name = str(model), model_name or Path(model).resolve().name
        engine = ENGINES[rollout.engine](model_dir, rollout)
    elif isinstance(model, tuple) and len(model) == 2:
        engine = HFEngine.from_model(*model)
    elif hasattr(model, "generate") and hasattr(model, "tokenizer"):
        engine = model
    else:
        raise ValueError("make_server takes a checkpoint directory, a (model, tokenizer) pair or a rollout engine")
    tokenizer = engine.tokenizer
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs a pad and an end-of-sequence token to batch and stop generation")
    return PolicyServer((host, port), engine, model_name or "distilrl-policy", max_request_bytes,
                        _context_length(engine, model_dir))


def _context_length(engine: RolloutEngine, model_dir: str | None) -> int | None:
    """The model's maximum positions: from the engine's transformers model, else the checkpoint's config.json."""
    config = getattr(getattr(engine, "model", None), "config", None)
    if config is not None:
        return getattr(config, "max_position_embeddings", None)
    if model_dir is None or not (Path(model_dir) / "config.json").is_file():
        return None
    return json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          rollout: RolloutConfig | None = None) -> None:
    """Serve a checkpoint with the engine ``rollout`` names until interrupted (Ctrl-C, or SIGTERM turned into
    KeyboardInterrupt)."""
    server = make_server(checkpoint, host, port, model_name, rollout=rollout)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("policy server on %s has no authentication: anyone who can reach it can use it", host)
    print(f"serving {server.model_name} at {server.url}/v1 (OpenAI-compatible; Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
