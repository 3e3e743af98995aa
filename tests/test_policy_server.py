"""The OpenAI-compatible policy server (rlhf/serve/policy_server.py), over real HTTP on 127.0.0.1 with a tiny random Qwen2."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from rlhf.core.config.run_config import ModelConfig
from rlhf.core.models.build import build_student, build_tokenizer, save_student
from rlhf.serve.policy_server import make_server

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def server():
    tokenizer = build_tokenizer("char")
    srv = make_server((build_student(TINY, tokenizer, 0), tokenizer), port=0, model_name="tiny-student")
    srv.start()
    yield srv
    srv.close()


def _request(url: str, body: bytes | None = None, method: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/json"} if body is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _chat(server, **fields) -> tuple[int, dict]:
    body = {"model": "tiny-student", "messages": [{"role": "user", "content": "7+5-3="}], **fields}
    return _request(f"{server.url}/v1/chat/completions", json.dumps(body).encode())


def test_models_lists_the_served_model(server):
    status, body = _request(f"{server.url}/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny-student"]


def test_chat_completion_has_the_openai_shape(server):
    status, body = _chat(server, max_tokens=6, temperature=1.0, n=2, seed=1)
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["model"] == "tiny-student"
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for choice in body["choices"]:
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == len("7+5-3=")  # one token per character
    assert 2 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # A random model rarely stops within 6 tokens: "length" must then come with exactly 6 tokens.
    if all(c["finish_reason"] == "length" for c in body["choices"]):
        assert usage["completion_tokens"] == 12


def test_greedy_is_deterministic_and_seeded_sampling_repeats(server):
    first, second = _chat(server, max_tokens=8, temperature=0)[1], _chat(server, max_tokens=8, temperature=0)[1]
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    a, b = _chat(server, max_tokens=8, seed=7)[1], _chat(server, max_tokens=8, seed=7)[1]
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


def test_bad_requests_get_openai_style_errors(server):
    url = f"{server.url}/v1/chat/completions"
    status, body = _request(url, b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and "JSON" in body["error"]["message"]
    status, body = _request(url, json.dumps({"model": "x"}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = _chat(server, max_tokens=1000)  # over the tiny model's 128-position context
    assert status == 400 and "context" in body["error"]["message"]
    status, body = _chat(server, temperature="hot")
    assert status == 400 and body["error"]["param"] == "temperature"


def test_oversized_body_gets_413(server):
    status, body = _request(f"{server.url}/v1/chat/completions", b" " * 1_100_000)
    assert status == 413 and "limit" in body["error"]["message"]


def test_unknown_path_and_wrong_method(server):
    status, body = _request(f"{server.url}/v1/completions", b"{}")
    assert status == 404 and "error" in body
    status, _ = _request(f"{server.url}/v1/models", b"{}")
    assert status == 405


def test_server_restarts_on_a_fresh_port_after_close():
    tokenizer = build_tokenizer("char")
    srv = make_server((build_student(TINY, tokenizer, 0), tokenizer), port=0)
    srv.start()
    assert _request(f"{srv.url}/health")[0] == 200
    srv.close()
    srv.close()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{srv.url}/health", timeout=5)


def test_serves_a_checkpoint_directory_with_its_chat_template(tmp_path):
    tokenizer = build_tokenizer("char")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }};{% endfor %}"
                               "{% if add_generation_prompt %}={% endif %}")
    save_student(build_student(TINY, tokenizer, 0), tokenizer, tmp_path / "policy-7")
    srv = make_server(tmp_path / "policy-7", port=0)
    srv.start()
    try:
        assert _request(f"{srv.url}/v1/models")[1]["data"][0]["id"] == "policy-7"
        status, body = _chat(srv, max_tokens=3, temperature=0)
        assert status == 200 and body["usage"]["prompt_tokens"] == len("7+5-3=;=")  # rendered by the template
    finally:
        srv.close()


def test_openai_client_talks_to_the_server(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="tiny-student", messages=[{"role": "user", "content": "1+2="}],
                                           max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.prompt_tokens == 4


def test_plain_http_openai_request_gets_the_models_generated_text(server):
    """The request an OpenAI client sends (POST /v1/chat/completions with a bearer header, JSON body), over plain
    HTTP; the answer's text is what the project's generation engine makes of the prompt, greedily."""
    from rollout.engine import generate

    body = json.dumps({"model": "tiny-student", "messages": [{"role": "user", "content": "12+7="}],
                       "max_tokens": 10, "temperature": 0}).encode()
    request = urllib.request.Request(f"{server.url}/v1/chat/completions", data=body, method="POST", headers={
        "Content-Type": "application/json", "Authorization": "Bearer unused", "User-Agent": "OpenAI/Python"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200 and answer.headers["Content-Type"].startswith("application/json")
        reply = json.loads(answer.read())
    text = reply["choices"][0]["message"]["content"]
    expected = generate(server.model, server.tokenizer, ["12+7="], 1, 10, greedy=True)[0]
    assert text and text == expected.text
    assert reply["usage"]["completion_tokens"] == len(expected.response_ids)
