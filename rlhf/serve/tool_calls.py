"""OpenAI tool calling for ``distilrl serve``, as pure functions the server's request and reply code call: the
``tools`` a chat request offers, checked; and the ``tool_calls`` of an assistant message, read out of the text a
model trained with tools writes (Qwen2.5's ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks,
the format rollout/environments/tools.py reads in multi-turn RL).

A block that is not valid JSON or names a tool the request did not offer stays in the message's text: the client
sees what the model wrote rather than a call it cannot run.
"""
from __future__ import annotations

import json
import uuid
from typing import Any

from rollout.environments.tools import QWEN_CALL


def offered_tools(tools: Any, tool_choice: Any = None) -> dict[str, dict]:
    """The offered functions by name, from a request's ``tools`` (OpenAI's list of {"type": "function",
    "function": {"name", "description", "parameters"}}). Raises ValueError with one line for a malformed list or a
    ``tool_choice`` other than "auto", "none" or one offered function."""
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools must be a non-empty list of {\"type\": \"function\", \"function\": {...}}")
    by_name: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        if not isinstance(function.get("parameters", {}), dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON-schema object")
        by_name[function["name"]] = function
    check_tool_choice(tool_choice, by_name)
    return by_name


def check_tool_choice(tool_choice: Any, offered: dict[str, dict]) -> None:
    """Raises ValueError with one line unless ``tool_choice`` is absent, "auto", "none", "required" or names one
    offered function."""
    if tool_choice not in (None, "auto", "none", "required"):
        named = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
        if named not in offered:
            raise ValueError("tool_choice must be auto, none, required, or {\"type\": \"function\", \"function\": "
                             "{\"name\": NAME}} naming an offered tool")


def split_tool_calls(text: str, offered: dict[str, dict]) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of an assistant message: each readable call to an offered tool as an OpenAI tool call
    (arguments as a JSON string), the rest of the text as content (None when nothing else is left)."""
    calls: list[dict] = []
    kept, last = [], 0
    for match in QWEN_CALL.finditer(text):
        call = _call(match.group(1), offered)
        if call is None:
            continue
        calls.append(call)
        kept.append(text[last:match.start()])
        last = match.end()
    kept.append(text[last:])
    content = "".join(kept).strip()
    return (content or None), calls


def _call(body: str, offered: dict[str, dict]) -> dict | None:
    try:
        payload = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(payload, dict) or payload.get("name") not in offered:
        return None
    arguments = payload.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": payload["name"], "arguments": arguments}}
