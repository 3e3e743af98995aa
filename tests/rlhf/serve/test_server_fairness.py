"""Both servers under heavy clients (issue 37): the work a request may cost is bounded before it queues (tokenized
outside any lock, a bounded prefix only), light requests are served before heavy ones that wait, the queue is
bounded in length and in wait (503 with Retry-After), waiting requests are batched, a refused body is closed
within about 2 s, and HEAD/OPTIONS/TRACE get 405. Real servers on 127.0.0.1; every wait is bounded."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from rlhf.core.data.samples import Sample
from rlhf.core.models.build import build_tokenizer
from rlhf.serve.policy_server import make_server
from rlhf.serve.reward_server import make_reward_server


class GatedEngine:
    """Answers each prompt with "ok"; every generate call blocks until ``gate`` is set and is recorded."""

    def __init__(self):
        self.tokenizer = build_tokenizer("char")
        self.gate, self.started, self.calls = threading.Event(), threading.Semaphore(0), []

    def generate(self, prompts, n, max_new_tokens, temperature, greedy):
        self.calls.append(list(prompts))
        self.started.release()
        assert self.gate.wait(20)
        ids = self.tokenizer("ok", add_special_tokens=False).input_ids
        return [Sample(i, [1], ids, [0.0] * len(ids), "stop", "ok") for i in range(len(prompts)) for _ in range(n)]


class GatedScorer:
    def __init__(self):
        self.gate, self.started, self.calls = threading.Event(), threading.Semaphore(0), []

    def __call__(self, prompts, responses):
        self.calls.append(list(responses))
        self.started.release()
        assert self.gate.wait(20)
        return [float(len(r)) for r in responses]


def request(server, method: str, path: str, body: dict | bytes | None = None, timeout: float = 20):
    """(status, headers, JSON body) of one request on its own connection."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=timeout)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, data, {"Content-Type": "application/json"})
        answer = conn.getresponse()
        raw = answer.read()
        return answer.status, dict(answer.getheaders()), json.loads(raw) if raw else None
    finally:
        conn.close()


def in_thread(fn, *args):
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", fn(*args)), daemon=True)
    thread.start()
    return thread, box


def wait_for(condition, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def chat(content: str, **fields) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}


@pytest.fixture()
def gated_policy():
    engine = GatedEngine()
    server = make_server(engine, port=0, max_queue=2, queue_timeout_s=5.0)
    server.start()
    yield server, engine
    engine.gate.set()
    server.close()


def test_a_light_request_is_served_before_heavy_ones_that_wait(gated_policy):
    server, engine = gated_policy
    first = in_thread(request, server, "POST", "/v1/chat/completions", chat("h" * 3000, seed=1))
    assert engine.started.acquire(timeout=10)  # the first heavy request holds the model
    heavy = in_thread(request, server, "POST", "/v1/chat/completions", chat("H" * 3000, seed=2))
    wait_for(lambda: server.queue.waiting == 1)
    light = in_thread(request, server, "POST", "/v1/chat/completions", chat("light", seed=3))
    wait_for(lambda: server.queue.waiting == 2)
    engine.gate.set()
    for thread, box in (first, heavy, light):
        thread.join(20)
        assert box["result"][0] == 200
    assert [call[0][-1] for call in engine.calls] == ["h", "t", "H"]  # light ("...t") before the waiting heavy


def test_the_policy_queue_is_bounded_in_length_and_refuses_with_retry_after(gated_policy):
    server, engine = gated_policy
    threads = [in_thread(request, server, "POST", "/v1/chat/completions", chat(f"q{i}", seed=i)) for i in range(3)]
    assert engine.started.acquire(timeout=10)
    wait_for(lambda: server.queue.waiting == 2)
    started = time.monotonic()
    status, headers, body = request(server, "POST", "/v1/chat/completions", chat("one too many"))
    assert time.monotonic() - started < 2 and status == 503 and headers["Retry-After"] == "1"
    assert "busy" in body["error"]["message"]
    engine.gate.set()
    for thread, box in threads:
        thread.join(20)
        assert box["result"][0] == 200


def test_a_long_prompt_is_refused_while_the_model_is_busy(gated_policy):
    """Counting a prompt's tokens happens outside the queue: an over-long prompt gets its 400 at once even while
    generation holds the model (it used to wait for the generation lock, then tokenize under it)."""
    server, engine = gated_policy
    server.context_length = 1000
    first = in_thread(request, server, "POST", "/v1/chat/completions", chat("busy"))
    assert engine.started.acquire(timeout=10)
    started = time.monotonic()
    status, _, body = request(server, "POST", "/v1/chat/completions", chat("1 " * 200_000))
    assert status == 400 and "maximum context length of 1000" in body["error"]["message"]
    assert body["error"]["param"] == "messages"
    assert time.monotonic() - started < 3
    engine.gate.set()
    first[0].join(20)


def test_the_reward_server_tokenizes_a_bounded_prefix_of_a_long_sample():
    seen = []

    def count(prompt, response):
        seen.append(len(prompt) + len(response))
        return len((prompt + response).split())

    # chars_per_token as a tokenizer with a 10k-character token would have it: the length alone proves nothing.
    with make_reward_server(lambda p, r: [0.0] * len(p), count_tokens=count, max_tokens=100,
                            chars_per_token=10_000) as server:
        server.start()
        status, _, body = request(server, "POST", "/score", {"prompts": ["p "], "responses": ["w " * 100_000]})
        assert status == 400 and "over this server's limit of 100 tokens" in body["error"]
        assert seen and max(seen) <= 800  # prefixes of 400 then 800 characters, not the 200k of the sample
        seen.clear()
        assert request(server, "POST", "/score", {"prompts": ["p "], "responses": ["w " * 90]})[2] == {"rewards": [0.0]}
        assert seen == [182]  # under the limit: counted once, whole


def test_waiting_reward_requests_are_scored_in_one_batch_in_order():
    scorer = GatedScorer()
    with make_reward_server(scorer) as server:
        server.start()
        first = in_thread(request, server, "POST", "/score", {"prompts": ["p"], "responses": ["a"]})
        assert scorer.started.acquire(timeout=10)
        waiting = []
        for response in ("bb", "ccc", "dddd"):
            waiting.append(in_thread(request, server, "POST", "/score", {"prompts": ["p"], "responses": [response]}))
            wait_for(lambda n=len(waiting): server.queue.waiting == n)
        scorer.gate.set()
        for (thread, box), expected in zip([first, *waiting], (1.0, 2.0, 3.0, 4.0)):
            thread.join(20)
            assert box["result"][0] == 200 and box["result"][2] == {"rewards": [expected]}
    assert scorer.calls == [["a"], ["bb", "ccc", "dddd"]]


def test_a_heavy_reward_request_is_scored_in_parts_with_a_light_one_in_between():
    scorer = GatedScorer()
    with make_reward_server(scorer) as server:
        server.queue.max_batch_cost = 9  # tokens per call (characters here: no token counter)
        server.start()
        first = in_thread(request, server, "POST", "/score", {"prompts": ["p"], "responses": ["a"]})
        assert scorer.started.acquire(timeout=10)
        heavy = in_thread(request, server, "POST", "/score", {"prompts": ["p"] * 3, "responses": ["x" * 7, "y" * 8,
                                                                                                  "z" * 9]})
        wait_for(lambda: server.queue.waiting == 3)  # 8, 9 and 10 characters: one part each (at least a sample)
        light = in_thread(request, server, "POST", "/score", {"prompts": ["p"], "responses": ["b"]})
        wait_for(lambda: server.queue.waiting == 4)
        scorer.gate.set()
        for thread, _ in (first, heavy, light):
            thread.join(20)
    assert heavy[1]["result"][2] == {"rewards": [7.0, 8.0, 9.0]} and light[1]["result"][2] == {"rewards": [1.0]}
    assert scorer.calls == [["a"], ["b"], ["x" * 7], ["y" * 8], ["z" * 9]]


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "TRACE"])
def test_other_methods_get_405(method, gated_policy):
    server, _ = gated_policy
    with make_reward_server(lambda p, r: [0.0] * len(p)) as reward:
        reward.start()
        for target, path, allowed in ((reward, "/score", "POST"), (server, "/v1/models", "GET")):
            status, headers, _ = request(target, method, path)
            assert status == 405 and headers["Allow"] == allowed


@pytest.mark.parametrize("refusal", ["413", "401"])
def test_a_refused_body_is_closed_within_two_seconds(refusal):
    """The client announces a body and sends a trickle of it: the server answers, drains for at most ~2 s, and
    closes (it used to hold the connection for its 15 s request deadline)."""
    token = "t" if refusal == "401" else None
    with make_reward_server(lambda p, r: [0.0] * len(p), token=token, max_request_bytes=1000) as server:
        server.start()
        sock = socket.create_connection(server.server_address[:2])
        length = 10_000 if refusal == "413" else 500
        sock.sendall(f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode() + b"{")
        sock.settimeout(10)
        started, received = time.monotonic(), b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
        elapsed = time.monotonic() - started
        sock.close()
    assert received.startswith(f"HTTP/1.0 {refusal}".encode()) or received.startswith(f"HTTP/1.1 {refusal}".encode())
    assert elapsed < 3.5, elapsed
