"""An OpenAI-compatible HTTP server for a policy checkpoint, so any OpenAI client (or our own ``OpenAITeacher``)
can talk to a student: ``distilrl serve CHECKPOINT``.

Endpoints (JSON; errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``):

- ``GET /v1/models``: the one model served.
- ``POST /v1/chat/completions``: ``messages`` rendered with the tokenizer's chat template when it has one
  (otherwise the contents joined by newlines). ``POST /v1/completions``: ``prompt``, a string or a list of them.
  Parameters (rlhf/serve/openai_request.py): ``max_tokens``, ``temperature`` (0 = greedy), ``top_p``,
  ``top_k``, ``n``, ``seed``, ``stop``, log-probs of each token and its top alternatives, ``stream`` (server-sent
  events); anything else is refused with 400 naming the parameter, and a ``model`` other than the served one gets
  404. Generation goes through a rollout engine (rollout/engines.py: ``rollout.engine``, default
  ``hf_compact``), the same sampler RL and evaluation use; a stream is sent once its samples are complete (the
  engines return whole samples), token by token.
- ``GET /health``.

Under load (rlhf/core/http/queue.py): one model, so requests queue for one generation thread, light ones ahead of
heavy ones; waiting unseeded requests with the same sampling settings are generated in one batch. At most
``max_queue`` wait, each at most ``queue_timeout_s``; beyond, 503 with ``Retry-After``. A prompt is checked
against the model's context while it is tokenized, outside the queue (rlhf/core/http/limits.py). Bodies over
``max_request_bytes`` (1 MB) get 413. Binds 127.0.0.1 unless told otherwise: there is no authentication.

Usage in a test or script::

    server = make_server((model, tokenizer), port=0)   # port 0: the OS picks a free port; or a checkpoint directory
                                                       # (built with rollout.engine), or an engine object
    server.start()                                     # serve from a daemon thread
    ... POST f"{server.url}/v1/chat/completions" ...
    server.close()
"""
from __future__ import annotations

import inspect
import json
import logging
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import torch

from rlhf.core.config.run_config import RolloutConfig
from rlhf.core.http.json_handler import HttpError, JsonHandler, Streamed
from rlhf.core.http.limits import max_chars_per_token, tokens_within
from rlhf.core.http.logs import configure_logging
from rlhf.core.http.queue import Busy, WorkQueue
from rlhf.core.http.server import BackgroundHTTPServer, serve_until_interrupted
from rlhf.serve import openai_reply
from rlhf.serve.openai_request import GenerationRequest, bad, parse_request
from rlhf.serve.token_alternatives import top_alternatives
from rollout import vllm_engine  # noqa: F401 - registers the optional vllm engine (vllm itself loads when built)
from rollout import static_engine  # noqa: F401 - registers hf_static
from rollout.engines import ENGINES, HFEngine, RolloutEngine

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256  # when the request names none; also capped by the context left after the prompt
NO_CONTEXT_LIMIT = 1_000_000  # prompt tokens allowed for a model that declares no context length


class PolicyServer(BackgroundHTTPServer):
    """The HTTP server holding the rollout engine, its tokenizer and the queue in front of generation."""

    def __init__(self, address: tuple[str, int], engine: RolloutEngine, model_name: str, max_request_bytes: int,
                 context_length: int | None, max_queue: int = 64, queue_timeout_s: float = 120.0):
        super().__init__(address, _Handler)
        self.engine, self.tokenizer, self.model_name = engine, engine.tokenizer, model_name
        self.model = getattr(engine, "model", None)  # the transformers model, for engines that hold one (hf)
        self.max_request_bytes = max_request_bytes
        self.context_length = context_length
        self.chars_per_token = max_chars_per_token(self.tokenizer)
        self.truncates = "top_p" in inspect.signature(engine.generate).parameters  # takes top_p and top_k
        self.created = int(time.time())
        # Batches reach max_batch_items rows (prompts x n) at most: a batch of MAX_N samples is already a full one.
        self.queue = WorkQueue(self._generate, "generation", max_queue, queue_timeout_s, 1, 64)

    def _generate(self, jobs: list[tuple[GenerationRequest, list[str], int]]) -> list[list]:
        """One engine call for a batch of requests of equal settings (or one request): each request's samples,
        with its top alternatives when asked. Runs on the queue's one worker thread."""
        request, _, max_tokens = jobs[0]
        prompts = [p for _, job_prompts, _ in jobs for p in job_prompts]
        extra = {"top_p": request.top_p, "top_k": request.top_k} if self.truncates else {}
        # A seeded request samples from its own generator state: the global RNG (what unseeded requests draw
        # from) is put back as it was, so one client's seed never changes another's samples.
        with torch.random.fork_rng(devices=[], enabled=request.seed is not None):
            if request.seed is not None:
                torch.manual_seed(request.seed)
            samples = self.engine.generate(prompts, request.n, max_tokens, request.temperature or 1.0,
                                           request.greedy, **extra)
        out, start = [], 0
        for job_request, job_prompts, _ in jobs:
            part = samples[start:start + len(job_prompts) * request.n]
            start += len(part)
            tops = [top_alternatives(self.model, s, job_request.top_logprobs, request.temperature, request.top_k,
                                     request.top_p, request.greedy) for s in part] if job_request.top_logprobs else None
            out.append((part, tops))
        return out


class _Handler(JsonHandler):
    server: PolicyServer
    server_version = "distilrl-policy/1"
    routes = {"/v1/models": ("GET", "models"), "/health": ("GET", "health"),
              "/v1/chat/completions": ("POST", "chat"), "/v1/completions": ("POST", "completions")}

    def error_payload(self, err: HttpError) -> dict[str, Any]:
        kind = "server_error" if err.status >= 500 else "invalid_request_error"
        code = "model_not_found" if err.status == HTTPStatus.NOT_FOUND and err.param == "model" else None
        return {"error": {"message": err.message, "type": kind, "param": err.param, "code": code}}

    def health(self) -> dict[str, Any]:
        return {"status": "ok"}

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                            "created": self.server.created, "owned_by": "distilrl"}]}

    def chat(self, body: Any) -> Any:
        return self._complete(parse_request("chat", body))

    def completions(self, body: Any) -> Any:
        return self._complete(parse_request("text", body))

    def _complete(self, request: GenerationRequest) -> Any:
        server = self.server
        if request.model is not None and request.model != server.model_name:
            raise HttpError(HTTPStatus.NOT_FOUND, f"the model {request.model!r} does not exist: this server "
                            f"serves {server.model_name!r} (GET /v1/models)", "model")
        self._check_engine(request)
        if request.kind == "chat":
            request.prompts = [self._render(request)]
        key = "messages" if request.kind == "chat" else "prompt"
        prompt_tokens = [self._prompt_tokens(p, key) for p in request.prompts]
        max_tokens = self._max_tokens(max(prompt_tokens), request.max_tokens, request.max_key)
        cost = sum(prompt_tokens) + len(request.prompts) * request.n * max_tokens
        key = None if request.seed is not None else (request.n, max_tokens, request.temperature, request.top_p,
                                                     request.top_k)
        try:
            samples, tops = server.queue.submit((request, request.prompts, max_tokens), cost,
                                                len(request.prompts) * request.n, key)
        except Busy as err:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, f"busy: {err}; retry later",
                            headers={"Retry-After": str(server.retry_after_s)}) from None
        except Exception as err:
            logger.exception("generation failed")
            raise HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, f"generation failed: {type(err).__name__}: {err}")
        choices = [openai_reply.read_tool_calls(openai_reply.finish(server.tokenizer, s, request.stop), request)
                   for s in samples]
        for k, choice in enumerate(choices if tops else []):
            choice.top = tops[k][:len(choice.token_ids)]
        args = (request, server.tokenizer, server.model_name, choices, sum(prompt_tokens))
        if request.stream:
            return Streamed(lambda handler: _send_events(handler, openai_reply.chunks(*args)))
        return openai_reply.reply(*args)

    def _check_engine(self, request: GenerationRequest) -> None:
        """Refuse what the engine cannot do, naming the parameter."""
        name = type(self.server.engine).__name__
        if not self.server.truncates:
            for key, value, off in (("top_p", request.top_p, 1.0), ("top_k", request.top_k, 0)):
                if value != off:
                    raise bad(f"{key} is not supported by the {name} engine", key)
        if request.top_logprobs and self.server.model is None:
            key = "top_logprobs" if request.kind == "chat" else "logprobs"
            raise bad(f"top alternatives need a transformers model; the {name} engine has none", key)

    def _render(self, request: GenerationRequest) -> str:
        tokenizer, messages = self.server.tokenizer, request.messages
        if not getattr(tokenizer, "chat_template", None):
            if request.tools:
                raise bad("tools need a chat template to show them to the model; this model's tokenizer has none",
                          "tools")
            return "\n".join(m["content"] for m in messages)
        tools = [{"type": "function", "function": f} for f in request.tools.values()] or None
        try:
            return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # templates raise on what they do not accept (say, a role they do not know)
            raise bad(f"chat template refused the messages: {err}", "messages") from None

    def _prompt_tokens(self, prompt: str, key: str) -> int:
        """The prompt's tokens, counted in this handler's thread (outside the queue), tokenizing no more than a
        bounded prefix of a prompt over the context; a refusal names ``key``."""
        context = self.server.context_length or NO_CONTEXT_LIMIT
        if not prompt:
            raise bad("the prompt is empty", key)
        tokenizer = self.server.tokenizer
        tokens = tokens_within(lambda text: len(tokenizer(text, add_special_tokens=False).input_ids), prompt,
                               context, self.server.chars_per_token)
        if tokens is None or tokens >= context:
            raise bad(f"the prompt has {tokens or f'more than {context}'} tokens: over this model's maximum "
                      f"context length of {context} tokens", key)
        return tokens

    def _max_tokens(self, prompt_tokens: int, requested: int | None, key: str) -> int:
        context = self.server.context_length
        if context is None:
            return requested or DEFAULT_MAX_TOKENS
        room = context - prompt_tokens
        if requested is None:
            return min(DEFAULT_MAX_TOKENS, room)
        if requested > room:
            raise bad(f"this model's maximum context length is {context} tokens; the prompt has {prompt_tokens} "
                      f"and {key} asks for {requested}", key)
        return requested


def _send_events(handler: JsonHandler, chunks) -> None:
    """Server-sent events: one ``data:`` line per chunk, then ``data: [DONE]``; the connection closes after."""
    handler.send_head(HTTPStatus.OK, "text/event-stream", {"Cache-Control": "no-cache"})
    for chunk in chunks:
        handler.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    handler.wfile.write(b"data: [DONE]\n\n")
    handler.wfile.flush()


def make_server(model: str | Path | tuple[Any, Any] | RolloutEngine, host: str = "127.0.0.1", port: int = 0,
                model_name: str | None = None, max_request_bytes: int = 1_000_000,
                rollout: RolloutConfig | None = None, max_queue: int = 64,
                queue_timeout_s: float = 120.0) -> PolicyServer:
    """Bind a policy server (not yet serving): ``.start()`` for a background thread, or ``.serve_forever()``.

    ``model`` is a checkpoint directory (Hugging Face format, safetensors), loaded into the engine that
    ``rollout.engine`` names (default ``hf_compact``, in ``rollout.dtype``); a loaded ``(model, tokenizer)`` pair,
    served by the hf engine as it is; or a built rollout engine. ``model_name`` defaults to the directory's name
    (``"distilrl-policy"`` otherwise). ``max_queue``, ``queue_timeout_s``: requests that may wait for generation,
    and how long, before the answer is 503 busy.
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
                        _context_length(engine, model_dir), max_queue, queue_timeout_s)


def _context_length(engine: RolloutEngine, model_dir: str | None) -> int | None:
    """The model's maximum positions: from the engine's transformers model, else the checkpoint's config.json."""
    config = getattr(getattr(engine, "model", None), "config", None)
    if config is not None:
        return getattr(config, "max_position_embeddings", None)
    if model_dir is None or not (Path(model_dir) / "config.json").is_file():
        return None
    return json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          rollout: RolloutConfig | None = None, **limits) -> None:
    """Serve a checkpoint with the engine ``rollout`` names until interrupted (Ctrl-C, or SIGTERM turned into
    KeyboardInterrupt); prints a ready line and one line per request. ``limits``: ``make_server``'s max_queue,
    queue_timeout_s."""
    server = make_server(checkpoint, host, port, model_name, rollout=rollout, **limits)
    configure_logging()
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("policy server on %s has no authentication: anyone who can reach it can use it", host)
    serve_until_interrupted(server, f"distilrl serve ({server.model_name}, OpenAI-compatible at {server.url}/v1)")
