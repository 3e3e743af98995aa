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


# --- through `distilrl serve`: a scripted engine answers with a call; the request's tools reach the template ---

from rlhf.core.data.samples import Sample  # noqa: E402
from rlhf.core.models.build import build_tokenizer  # noqa: E402
from rlhf.serve.policy_server import make_server  # noqa: E402

CALL = ('Let me use it.<tool_call>{"name": "calculator", "arguments": {"expression": "7+5"}}</tool_call>'
        '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>')
# A template in the shape of Qwen2.5's: offered tools listed first, earlier calls and tool results rendered.
TEMPLATE = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }},{% endfor %}|{% endif %}"
            "{% for m in messages %}{{ m.role }}:{{ m.content }}"
            "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments.expression }}]"
            "{% endfor %};{% endfor %}")


class ScriptedEngine:
    """Answers every prompt with ``text`` and records the rendered prompts."""

    def __init__(self, text: str, template: str | None = TEMPLATE):
        self.tokenizer = build_tokenizer("char")
        self.tokenizer.chat_template = template
        self.text, self.prompts = text, []

    def generate(self, prompts, n, max_new_tokens, temperature, greedy):
        self.prompts += prompts
        ids = self.tokenizer(self.text, add_special_tokens=False).input_ids
        return [Sample(i, [1], ids, [-0.5] * len(ids), "stop", self.text) for i in range(len(prompts))
                for _ in range(n)]


@pytest.fixture(scope="module")
def served():
    engine = ScriptedEngine(CALL)
    srv = make_server(engine, port=0, model_name="agent")
    srv.start()
    yield srv, engine
    srv.close()


def _post(srv, **body):
    import urllib.error
    import urllib.request
    body = {"messages": [{"role": "user", "content": "7+5?"}], **body}
    request = urllib.request.Request(f"{srv.url}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            raw = answer.read().decode()
            return answer.status, (json.loads(raw) if not body.get("stream") else raw)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_serve_returns_tool_calls_and_shows_the_offered_tools_to_the_template(served):
    srv, engine = served
    status, body = _post(srv, tools=TOOLS, max_tokens=200)
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Let me use it."
    calls = choice["message"]["tool_calls"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"expression": "7+5"}, {"expression": "1+1"}]
    assert engine.prompts[-1] == "TOOLS:calculator,|user:7+5?;"
    # parallel_tool_calls false: the first call only; tool_choice none: no tools shown, the text comes back as is
    assert len(_post(srv, tools=TOOLS, parallel_tool_calls=False)[1]["choices"][0]["message"]["tool_calls"]) == 1
    status, body = _post(srv, tools=TOOLS, tool_choice="none")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": CALL}
    assert engine.prompts[-1] == "user:7+5?;"


def test_serve_renders_an_earlier_call_and_its_result(served):
    srv, engine = served
    messages = [{"role": "user", "content": "7+5?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "calculator", "arguments": '{"expression": "7+5"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "12"}]
    status, _ = _post(srv, tools=TOOLS, messages=messages)
    assert status == 200 and engine.prompts[-1] == "TOOLS:calculator,|user:7+5?;assistant:[calculator 7+5];tool:12;"
    messages[1]["tool_calls"][0]["function"]["arguments"] = "{not json"
    status, body = _post(srv, tools=TOOLS, messages=messages)
    assert status == 400 and "not JSON" in body["error"]["message"] and body["error"]["param"] == "messages"


@pytest.mark.parametrize("fields, param, says", [
    ({"tool_choice": "required"}, "tool_choice", "cannot force a call"),
    ({"tool_choice": {"type": "function", "function": {"name": "calculator"}}}, "tool_choice", "cannot force"),
    ({"tool_choice": {"type": "function", "function": {"name": "shell"}}}, "tool_choice", "offered tool"),
    ({"tools": [{"type": "function"}]}, "tools", "tools[0]"),
])
def test_serve_refuses_what_it_cannot_honour_naming_the_parameter(served, fields, param, says):
    status, body = _post(served[0], **{"tools": TOOLS, **fields})
    assert status == 400 and body["error"]["param"] == param and says in body["error"]["message"]


def test_tools_without_a_chat_template_are_refused():
    srv = make_server(ScriptedEngine(CALL, template=None), port=0, model_name="agent")
    srv.start()
    try:
        status, body = _post(srv, tools=TOOLS)
        assert status == 400 and body["error"]["param"] == "tools" and "chat template" in body["error"]["message"]
    finally:
        srv.close()


def test_openai_client_reads_tool_calls_plain_and_streamed(served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{served[0].url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="agent", messages=[{"role": "user", "content": "7+5?"}], tools=TOOLS)
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "calculator"
    assert json.loads(call.function.arguments) == {"expression": "7+5"}
    deltas = [c.choices[0] for c in client.chat.completions.create(
        model="agent", messages=[{"role": "user", "content": "7+5?"}], tools=TOOLS, stream=True) if c.choices]
    streamed = [t for d in deltas for t in (d.delta.tool_calls or [])]
    assert [t.index for t in streamed] == [0, 1] and streamed[1].function.arguments == '{"expression": "1+1"}'
    assert "".join(d.delta.content or "" for d in deltas) == "Let me use it."
    assert deltas[-1].finish_reason == "tool_calls"
