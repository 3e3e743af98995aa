"""An OpenAI chat or completions request read into what the engine is asked (``GenerationRequest``), or refused
with a 400 naming the parameter: every parameter is either honoured, accepted at a value that changes nothing
(``frequency_penalty: 0``, ``response_format: {"type": "text"}``...), or refused; none is silently ignored.

Honoured: ``model`` (the served name; absent means it), ``messages`` / ``prompt`` (a string or a list of
strings), ``max_tokens`` / ``max_completion_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``top_k`` (vLLM's
extension; 0 or -1 = off), ``n``, ``seed``, ``stop`` (up to 4 strings), ``logprobs`` + ``top_logprobs`` (chat) or
``logprobs: k`` (completions), ``stream`` + ``stream_options.include_usage``, ``user`` (an identifier; nothing is
done with it, as with OpenAI's own abuse tracking off), ``tools`` with ``tool_choice`` "auto" or "none" and
``parallel_tool_calls`` (chat: the tools go to the chat template, the model's ``<tool_call>`` blocks come back as
``tool_calls``; assistant messages carrying ``tool_calls`` and ``tool`` messages are passed to the template).
``tool_choice`` "required" or one named function is refused: the engines cannot force a call.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from rlhf.core.http.json_handler import HttpError
from rlhf.serve.tool_calls import check_tool_choice, offered_tools

MAX_N = 64
MAX_PROMPTS = 16  # prompts in one completions request
MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_TOP_LOGPROBS = {"chat": 20, "text": 5}  # OpenAI's limits
MAX_SEED = 2**63 - 1  # torch's generator takes a 64-bit seed

_COMMON = {"model", "n", "seed", "temperature", "top_p", "top_k", "max_tokens", "stop", "stream", "stream_options",
           "user", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs"}
_KEYS = {"chat": _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                            "tool_choice", "parallel_tool_calls"},
         "text": _COMMON | {"prompt", "echo", "suffix", "best_of"}}
# Parameters accepted only at the value that leaves generation as it is: (values, why other values are refused).
_NEUTRAL = {"frequency_penalty": ((0, 0.0), "the engines have no frequency penalty"),
            "presence_penalty": ((0, 0.0), "the engines have no presence penalty"),
            "logit_bias": (({},), "the engines take no logit bias"),
            "response_format": (({"type": "text"},), "only plain text replies are supported"),
            "echo": ((False,), "echoing the prompt is not supported"),
            "suffix": (("",), "suffixes (insertion) are not supported")}


def bad(message: str, param: str | None) -> HttpError:
    return HttpError(HTTPStatus.BAD_REQUEST, message, param)


@dataclass
class GenerationRequest:
    kind: str  # "chat" (/v1/chat/completions) or "text" (/v1/completions)
    model: str | None
    messages: list[dict[str, Any]] = field(default_factory=list)  # chat
    prompts: list[str] = field(default_factory=list)  # text; chat: the rendered messages, set by the server
    n: int = 1
    max_tokens: int | None = None  # as requested; the server fits it to the context
    max_key: str = "max_tokens"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    include_usage: bool = False
    tools: dict[str, dict] = field(default_factory=dict)  # chat: the offered functions by name (none: no tools)
    parallel_tool_calls: bool = True  # false: at most one call per reply (the first)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def parse_request(kind: str, body: Any) -> GenerationRequest:
    """The request of ``kind`` ("chat" or "text") in ``body``; ``HttpError`` 400 naming the parameter."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None)
    for key, value in body.items():
        if key not in _KEYS[kind]:
            raise bad(f"unsupported parameter {key!r}", key)
        if key in _NEUTRAL and value is not None and value not in _NEUTRAL[key][0]:
            raise bad(f"{key}={value!r} is not supported: {_NEUTRAL[key][1]}", key)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model must be a string", "model")
    request = GenerationRequest(kind, model, n=integer(body, "n", 1, 1, MAX_N),
                                temperature=number(body, "temperature", 1.0, 0.0, 2.0),
                                top_p=number(body, "top_p", 1.0, 0.0, 1.0),
                                top_k=max(0, integer(body, "top_k", 0, -1, None)),
                                seed=integer(body, "seed", None, 0, MAX_SEED), stop=_stop(body.get("stop")))
    if request.top_p == 0:
        raise bad("top_p must be in (0, 1]", "top_p")
    request.max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    request.max_tokens = integer(body, request.max_key, None, 1, None)
    _stream(body, request)
    if kind == "chat":
        request.messages = messages(body.get("messages"))
        _tools(body, request)
        request.logprobs = flag(body, "logprobs")
        request.top_logprobs = integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS[kind])
        if request.top_logprobs and not request.logprobs:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    else:
        request.prompts = _prompts(body.get("prompt"))
        top = integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS[kind])
        request.logprobs, request.top_logprobs = top is not None, top or 0
        best_of = integer(body, "best_of", None, 1, MAX_N)
        if best_of is not None and best_of != request.n:
            raise bad("best_of other than n is not supported (no server-side ranking of samples)", "best_of")
    return request


def _stream(body: dict[str, Any], request: GenerationRequest) -> None:
    request.stream = flag(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return
    if not request.stream:
        raise bad("stream_options needs stream: true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad("stream_options supports include_usage only", "stream_options")
    request.include_usage = flag(options, "include_usage")


def _tools(body: dict[str, Any], request: GenerationRequest) -> None:
    """The offered tools, or none where ``tool_choice`` is "none" (the model is then shown no tools at all)."""
    choice = body.get("tool_choice")
    if not body.get("tools"):
        if choice not in (None, "none", "auto"):
            raise bad("tool_choice needs tools: offer them in 'tools'", "tool_choice")
        return
    try:
        offered = offered_tools(body["tools"])
    except ValueError as err:
        raise bad(str(err), "tools") from None
    try:
        check_tool_choice(choice, offered)
    except ValueError as err:
        raise bad(str(err), "tool_choice") from None
    if choice not in (None, "auto", "none"):
        raise bad("tool_choice other than auto or none is not supported: the engines cannot force a call",
                  "tool_choice")
    request.tools = {} if choice == "none" else offered
    request.parallel_tool_calls = body.get("parallel_tool_calls") is None or flag(body, "parallel_tool_calls")


def messages(value: Any) -> list[dict[str, Any]]:
    """Validated messages with text content; OpenAI's list-of-parts content is joined into one string. An
    assistant's ``tool_calls`` keep their arguments as objects (what chat templates render) and a ``tool``
    message its ``tool_call_id`` and ``name``."""
    if not isinstance(value, list) or not value:
        raise bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string 'role'", "messages")
        out.append({"role": message["role"], "content": _content(message.get("content"), i)})
        if message.get("tool_calls") is not None:
            out[-1]["tool_calls"] = _message_tool_calls(message["tool_calls"], i)
        for key in ("tool_call_id", "name"):
            if isinstance(message.get(key), str):
                out[-1][key] = message[key]
    return out


def _content(content: Any, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise bad(f"messages[{i}].content: only text parts are supported", "messages")
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise bad(f"messages[{i}].content must be a string", "messages")
    return content


def _message_tool_calls(calls: Any, i: int) -> list[dict[str, Any]]:
    """An assistant message's earlier calls, their JSON-string arguments read back into objects."""
    out = []
    for call in calls if isinstance(calls, list) else [None]:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad(f"messages[{i}].tool_calls must be a list of {{\"type\": \"function\", \"function\": "
                      "{\"name\": ..., \"arguments\": ...}}}", "messages")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except json.JSONDecodeError:
                raise bad(f"messages[{i}].tool_calls: arguments of {function['name']!r} are not JSON",
                          "messages") from None
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})
    return out


def _prompts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        if len(value) > MAX_PROMPTS:
            raise bad(f"at most {MAX_PROMPTS} prompts per request", "prompt")
        return value
    if isinstance(value, list) and value and all(isinstance(p, (int, list)) for p in value):
        raise bad("prompts as token ids are not supported: send text", "prompt")
    raise bad("'prompt' must be a string or a non-empty list of strings", "prompt")


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise bad(f"stop must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    return stops


def flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"{key} must be true or false", key)
    return value


def number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad(f"{key} must be a number in [{low}, {high}]", key)
    return float(value)


def integer(body: dict[str, Any], key: str, default: int | None, low: int, high: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise bad(f"{key} must be an integer {bounds}", key)
    return value
