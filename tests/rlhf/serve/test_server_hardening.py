"""Both HTTP servers against clients that misbehave: slow senders cannot hold the slots (whole-request deadline,
the slowest sender evicted when full), an over-long sample is refused with 400 naming the limit, JSON of any depth
and out-of-range numbers get 400, and a request's seed does not touch the global RNG. Real sockets on 127.0.0.1."""
from __future__ import annotations

import http.client
import json
import socket
import time

import pytest
import torch

from rlhf.serve.reward_server import make_reward_server
from rlhf.core.config.run_config import ModelConfig
from rlhf.core.models.build import build_student, build_tokenizer
from rlhf.serve.policy_server import make_server

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


def post(server, path: str, body: bytes, timeout: float = 20) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        conn.close()


def score(server, prompts: list[str], responses: list[str]) -> tuple[int, dict]:
    return post(server, "/score", json.dumps({"prompts": prompts, "responses": responses}).encode())


def chat(server, **fields) -> tuple[int, dict]:
    body = {"messages": [{"role": "user", "content": "7+5-3="}], "max_tokens": 8, **fields}
    return post(server, "/v1/chat/completions", json.dumps(body).encode())


@pytest.fixture(scope="module")
def reward_server():
    server = make_reward_server(lambda p, r: [float(len(x)) for x in r], count_tokens=lambda p, r: len(p) + len(r),
                                max_tokens=100)
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def policy_server():
    tokenizer = build_tokenizer("char")
    server = make_server((build_student(TINY, tokenizer, 0), tokenizer), port=0)
    server.start()
    yield server
    server.close()


def test_an_over_long_sample_gets_400_naming_the_limit(reward_server):
    assert score(reward_server, ["p"], ["x" * 99]) == (200, {"rewards": [99.0]})
    status, body = score(reward_server, ["p", "p"], ["ok", "x" * 100])
    assert status == 400 and "sample 1 has 101 tokens, over this server's limit of 100 tokens" in body["error"]
    status, body = score(reward_server, ["p"], ["x" * 900_000])  # not even tokenized
    assert status == 400 and "over this server's limit of 100 tokens" in body["error"]


def test_the_policy_server_refuses_a_prompt_over_its_context(policy_server):
    status, body = chat(policy_server, messages=[{"role": "user", "content": "1" * 300_000}])
    assert status == 400 and "maximum context length" in body["error"]["message"]


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
                                 b'{"prompts": [' + b"9" * 5000 + b"]}", b"\xff\xfe{", b'{"a": NaN'])
def test_malformed_json_of_any_depth_gets_400(reward_server, policy_server, raw):
    status, body = post(reward_server, "/score", raw)
    assert status == 400 and body["error"].startswith("malformed JSON")
    status, body = post(policy_server, "/v1/chat/completions", raw)
    assert status == 400 and body["error"]["message"].startswith("malformed JSON")


@pytest.mark.parametrize("field", [{"seed": 2**80}, {"seed": -1}, {"seed": 1.5}, {"n": 2**80},
                                   {"max_tokens": 2**80}, {"temperature": 1e308 * 10}])
def test_out_of_range_numbers_get_400(policy_server, field):
    status, body = chat(policy_server, **field)
    assert status == 400, body


def test_a_requests_seed_does_not_reseed_the_global_rng(policy_server):
    torch.manual_seed(123)
    unseeded = chat(policy_server)[1]["choices"][0]["message"]["content"]
    torch.manual_seed(123)
    first = chat(policy_server, seed=7)[1]["choices"][0]["message"]["content"]
    after = chat(policy_server)[1]["choices"][0]["message"]["content"]
    assert after == unseeded  # the seeded request in between changed nothing for the unseeded one
    assert chat(policy_server, seed=7)[1]["choices"][0]["message"]["content"] == first  # and it is reproducible


def wait_for(condition, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def slow_sender(server) -> socket.socket:
    """A client that sends the start of a request and then (as far as the test goes) nothing more."""
    sock = socket.create_connection(server.server_address[:2])
    sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n")
    return sock


@pytest.mark.parametrize("kind", ["reward", "policy"])
def test_slow_senders_cannot_hold_every_slot(kind, reward_server, policy_server):
    """Every slot held by a client trickling its headers: a normal request still gets in (the slowest sender is
    closed for it) instead of 503."""
    server = reward_server if kind == "reward" else policy_server
    wait_for(lambda: server.open_connections == 0)  # earlier tests' connections are gone
    cap, evicted = server.max_connections, server.evicted
    server.max_connections, server.evict_after_s = 4, 0.2
    slow = [slow_sender(server) for _ in range(4)]
    try:
        wait_for(lambda: server.open_connections == 4)
        time.sleep(0.3)
        for _ in range(3):
            status, _ = score(server, ["p"], ["ab"]) if kind == "reward" else chat(server)
            assert status == 200
        assert server.evicted - evicted >= 1
    finally:
        server.max_connections, server.evict_after_s = cap, type(server).evict_after_s
        for sock in slow:
            sock.close()


def test_a_request_must_arrive_whole_within_the_deadline(reward_server):
    """A header line now and then keeps each read short; the deadline counts the whole request."""
    reward_server.request_deadline_s = 1.0
    try:
        sock = slow_sender(reward_server)
        started = time.monotonic()
        sock.settimeout(10)
        closed = False
        while time.monotonic() - started < 8:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
                if sock.recv(1, socket.MSG_DONTWAIT) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = True
                break
            time.sleep(0.25)
        assert closed and time.monotonic() - started < 5  # cut at ~1 s (8 s of trickling were offered)
    finally:
        reward_server.request_deadline_s = type(reward_server).request_deadline_s
        sock.close()
