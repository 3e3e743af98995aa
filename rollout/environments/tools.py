"""Tools a model may call: Python functions with JSON-schema signatures, and the parsing of calls out of a turn.

Two call formats are read:

- Qwen2.5's chat-template format, ``<tool_call>{"name": "calculator", "arguments": {"expression": "7+5"}}
  </tool_call>`` (JSON inside the tags);
- a plain format a character-level tokenizer can write (no braces or quotes): ``<call>calculator 7+5</call>``,
  the text after the name going to the tool's first required parameter.

A call that cannot be read (bad JSON, an unknown tool, arguments that do not fit the schema) is a ``ToolCall``
with ``error`` set: the environment answers it with an error observation, the rollout goes on.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable

from rollout.environments.sandbox import SandboxLimits, ToolResult, run_python

QWEN_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_PLAIN_CALL = re.compile(r"<call>\s*(\w+)[ :]?(.*?)</call>", re.DOTALL)
_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict,
               "array": list}


@dataclass
class Tool:
    """``fn(limits, **arguments) -> ToolResult``; ``parameters``: a JSON-schema object (properties, required)."""
    name: str
    description: str
    parameters: dict
    fn: Callable[..., ToolResult]

    def schema(self) -> dict:
        """The OpenAI / chat-template ``tools`` entry for this tool."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def check(self, arguments: object) -> str | None:
        """Why ``arguments`` do not fit the schema (one line), or None when they do."""
        if not isinstance(arguments, dict):
            return "arguments must be a JSON object"
        properties = self.parameters.get("properties", {})
        missing = [k for k in self.parameters.get("required", []) if k not in arguments]
        unknown = [k for k in arguments if k not in properties]
        if missing or unknown:
            return f"{self.name} takes {sorted(properties)}; missing {missing}, unknown {unknown}"
        for key, value in arguments.items():
            expected = _JSON_TYPES.get(properties[key].get("type", ""), object)
            if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
                return f"{self.name}: {key} must be a {properties[key]['type']}"
        return None


@dataclass
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)
    error: str | None = None      # why the call cannot be run; None for a call to run
    plain: bool = False           # written in the plain format (the answer comes back in it too)


def parse_calls(text: str, tools: dict[str, Tool]) -> list[ToolCall]:
    """Every tool call in a model turn, in order, in either format; unreadable ones carry their ``error``."""
    found = [(m.start(), _from_json(m.group(1), tools)) for m in QWEN_CALL.finditer(text)]
    found += [(m.start(), _from_plain(m.group(1), m.group(2), tools)) for m in _PLAIN_CALL.finditer(text)]
    return [call for _, call in sorted(found, key=lambda pair: pair[0])]


def _from_json(body: str, tools: dict[str, Tool]) -> ToolCall:
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall("", error=f"the tool call is not valid JSON ({e.msg} at character {e.pos})")
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return ToolCall("", error='a tool call is {"name": ..., "arguments": {...}}')
    arguments = payload.get("arguments", {})
    if isinstance(arguments, str):  # some templates send the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return ToolCall(payload["name"], error="the arguments string is not valid JSON")
    return _checked(ToolCall(payload["name"], arguments), tools)


def _from_plain(name: str, argument: str, tools: dict[str, Tool]) -> ToolCall:
    tool = tools.get(name)
    required = tool.parameters.get("required", []) if tool else []
    arguments = {required[0]: argument.strip()} if required else {}
    return _checked(ToolCall(name, arguments, plain=True), tools)


def _checked(call: ToolCall, tools: dict[str, Tool]) -> ToolCall:
    if call.name not in tools:
        call.error = f"unknown tool {call.name!r}; the tools are {', '.join(tools)}"
    else:
        call.error = tools[call.name].check(call.arguments)
    return call


# --------------------------------------------------------------------------------------------- built-in tools

# What the calculator accepts: numbers, + - * / // % **, parentheses, spaces. Anything else is refused before a
# process is started; what is accepted still runs in the sandbox (9**9**9 hangs, 10**10**8 floods).
_ARITHMETIC = re.compile(r"[0-9+\-*/%(). ]+")


def calculator(limits: SandboxLimits, expression: str) -> ToolResult:
    if not _ARITHMETIC.fullmatch(expression or ""):
        return ToolResult(False, "error: the calculator takes numbers, + - * / // % ** and parentheses", 0.0)
    result = run_python(f"print({expression})", limits)
    if result.ok and result.output.endswith(".0"):
        return ToolResult(True, result.output[:-2], result.seconds)  # 12/4 -> 3, as a person writes it
    return result


def python(limits: SandboxLimits, code: str) -> ToolResult:
    return run_python(code, limits)


CALCULATOR = Tool("calculator", "Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses.",
                  {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
                  calculator)
PYTHON = Tool("python", "Run a Python program in a sandbox (no network, no files outside its own directory); "
              "returns what it prints.",
              {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}, python)
