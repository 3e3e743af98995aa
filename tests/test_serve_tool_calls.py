"""OpenAI tool calling for the server (rlhf/serve/tool_calls.py): offered tools checked, calls read out of a
model's text in Qwen2.5's format into OpenAI's ``tool_calls``."""
from __future__ import annotations

import json
import re

import pytest

from rlhf.serve.tool_calls import offered_tools, split_tool_calls
from rollout.environments.tools import CALCULATOR

TOOLS = [CALCULATOR.schema()]


def test_calls_to_offered_tools_become_openai_tool_calls_and_the_rest_stays_content():
    offered = offered_tools(TOOLS, "auto")
    text = ('Let me compute. <tool_call>\n{"name": "calculator", "arguments": {"expression": "7+5"}}\n</tool_call>'
            '<tool_call>{"name": "shell", "arguments": {}}</tool_call><tool_call>{"name": </tool_call>')
    content, calls = split_tool_calls(text, offered)
    assert [c["function"]["name"] for c in calls] == ["calculator"] and calls[0]["type"] == "function"
    assert json.loads(calls[0]["function"]["arguments"]) == {"expression": "7+5"}
    assert calls[0]["id"].startswith("call_")
    # an unoffered tool and a broken block are what the model wrote: left in the text
    assert content == ('Let me compute. <tool_call>{"name": "shell", "arguments": {}}</tool_call>'
                       '<tool_call>{"name": </tool_call>')
    content, calls = split_tool_calls('<tool_call>{"name": "calculator", "arguments": "{}"}</tool_call>', offered)
    assert content is None and calls[0]["function"] == {"name": "calculator", "arguments": "{}"}
    assert split_tool_calls("#12", offered) == ("#12", [])


@pytest.mark.parametrize("tools, choice, says", [
    ([], None, "non-empty list"),
    ([{"type": "function", "function": {}}], None, "tools[0]"),
    ([{"type": "code_interpreter"}], None, "tools[0]"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], None, "parameters"),
    (TOOLS, {"type": "function", "function": {"name": "shell"}}, "naming an offered tool"),
])
def test_malformed_tools_are_refused_in_one_line(tools, choice, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        offered_tools(tools, choice)
    assert "calculator" in offered_tools(TOOLS, {"type": "function", "function": {"name": "calculator"}})
