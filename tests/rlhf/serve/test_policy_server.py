"""The OpenAI-compatible policy server (rlhf/serve/policy_server.py), over real HTTP on 127.0.0.1 with a tiny random
Qwen2; at the end, through the official ``openai`` client (a test dependency): chat, completions, streaming,
per-token log-probs with alternatives, stop strings, n, seed, top-k, and its errors for a wrong model (404) and an
unsupported parameter (400 naming it)."""
from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import pytest

from rlhf.core.config.run_config import ModelConfig
from rlhf.core.models.build import build_student, build_tokenizer, save_student
from rlhf.serve.policy_server import make_server

MESSAGES = [{"role": "user", "content": "7+5-3="}]
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
    status, body = _request(f"{server.url}/v1/embeddings", b"{}")
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
        status, body = _chat(srv, model="policy-7", max_tokens=3, temperature=0)
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


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_with_logprobs_and_alternatives(client):
    reply = client.chat.completions.create(model="tiny-student", messages=MESSAGES, max_tokens=6, temperature=0.8,
                                           top_p=0.9, logprobs=True, top_logprobs=3, seed=3)
    choice = reply.choices[0]
    tokens = choice.logprobs.content
    assert len(tokens) == reply.usage.completion_tokens and tokens
    special = set(build_tokenizer("char").all_special_tokens)  # in the tokens, not in the text
    assert "".join(t.token for t in tokens if t.token not in special) == choice.message.content
    for token in tokens:
        assert token.logprob <= 0 and 1 <= len(token.top_logprobs) <= 3
        alternatives = [a.logprob for a in token.top_logprobs]
        assert alternatives == sorted(alternatives, reverse=True)
        # The sampled token is in the nucleus, so its log-prob is at most the best alternative's.
        assert token.logprob <= alternatives[0] + 1e-4
        assert sum(math.exp(a) for a in alternatives) <= 1 + 1e-4


def test_streaming_chat_gives_the_same_text_as_the_unstreamed_reply(client):
    whole = client.chat.completions.create(model="tiny-student", messages=MESSAGES, max_tokens=8, temperature=0, n=2)
    stream = client.chat.completions.create(model="tiny-student", messages=MESSAGES, max_tokens=8, temperature=0, n=2,
                                            stream=True, stream_options={"include_usage": True})
    texts, reasons, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
        usage = chunk.usage or usage
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]
    assert [reasons[0], reasons[1]] == [c.finish_reason for c in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_completions_with_stop_n_seed_and_legacy_logprobs(client):
    first = client.completions.create(model="tiny-student", prompt="1+2=", max_tokens=10, n=2, seed=11, logprobs=2)
    again = client.completions.create(model="tiny-student", prompt="1+2=", max_tokens=10, n=2, seed=11, logprobs=2)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    for choice in first.choices:
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs)
        assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    text = first.choices[0].text
    if len(text) >= 3:  # a stop string from the middle of the seeded text cuts it there
        stopped = client.completions.create(model="tiny-student", prompt="1+2=", max_tokens=10, n=2, seed=11,
                                            stop=[text[1:3]])
        assert stopped.choices[0].text == text[:text.find(text[1:3])]
        assert stopped.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-student", prompt="1+2=", max_tokens=10, seed=11, stream=True) if c.choices)
    assert streamed == client.completions.create(model="tiny-student", prompt="1+2=", max_tokens=10, seed=11).choices[0].text


def test_top_k_one_is_greedy(client):
    greedy = client.chat.completions.create(model="tiny-student", messages=MESSAGES, max_tokens=8, temperature=0)
    top1 = client.chat.completions.create(model="tiny-student", messages=MESSAGES, max_tokens=8, extra_body={"top_k": 1},
                                          logprobs=True)
    assert top1.choices[0].message.content == greedy.choices[0].message.content
    assert all(t.logprob == pytest.approx(0.0, abs=1e-5) for t in top1.choices[0].logprobs.content)


def test_a_wrong_model_is_404_and_an_unsupported_parameter_400_naming_it(client):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    assert "gpt-4o" in str(missing.value) and "tiny-student" in str(missing.value)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny-student", messages=MESSAGES, max_tokens=2, frequency_penalty=0.5)
    assert refused.value.body["param"] == "frequency_penalty"
