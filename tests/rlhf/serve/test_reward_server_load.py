"""The reward server under load: a bounded queue answered with 503 busy (JSON error, Retry-After), a connection
cap, and clients that disconnect mid-request without harming the server or the other clients."""
from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time

import pytest

from reward.scoring.remote import RemoteRewardClient
from rlhf.serve.reward_server import make_reward_server


class GatedScorer:
    """Scores len(response); blocks every call until ``gate`` is set, so tests can fill the queue at will."""

    def __init__(self):
        self.gate = threading.Event()
        self.started = threading.Semaphore(0)
        self.calls = 0

    def __call__(self, prompts, responses):
        self.calls += 1
        self.started.release()
        assert self.gate.wait(20)
        return [float(len(r)) for r in responses]


def post(server, payload, timeout=20):
    """(status, headers, JSON body) of one POST /score on its own connection."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=timeout)
    try:
        body = json.dumps(payload).encode()
        conn.request("POST", "/score", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        conn.close()


def in_thread(fn, *args):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", fn(*args)), daemon=True)
    thread.start()
    return thread, box


def wait_for(condition, within_s=10.0):
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def health(server) -> int:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    finally:
        conn.close()


def test_full_queue_answers_busy_at_once_and_queued_requests_still_succeed():
    scorer = GatedScorer()
    with make_reward_server(scorer, max_queue=1) as server:
        server.start()
        pair = {"prompts": ["p"], "responses": ["abc"]}
        first = in_thread(post, server, pair)
        assert scorer.started.acquire(timeout=10)  # the first request is being scored (and holds the slot)
        second = in_thread(post, server, pair)
        wait_for(lambda: server.queue.waiting == 1)  # the second waits in the queue
        start = time.monotonic()
        status, headers, body = post(server, pair)
        assert time.monotonic() - start < 2  # refused at once, not after waiting
        assert status == 503 and headers["Retry-After"] == "1"
        assert body == {"error": "busy: 1 requests are already queued for scoring; retry later"}
        assert health(server) == 200  # probes are not queued behind scoring
        scorer.gate.set()
        for thread, box in (first, second):
            thread.join(10)
            assert box["result"][0] == 200 and box["result"][2] == {"rewards": [3.0]}
        assert post(server, pair)[0] == 200  # the queue drained: accepting again


def test_a_request_that_waits_too_long_is_told_busy():
    scorer = GatedScorer()
    with make_reward_server(scorer, queue_timeout_s=0.3) as server:
        server.start()
        first = in_thread(post, server, {"prompts": ["p"], "responses": ["a"]})
        assert scorer.started.acquire(timeout=10)
        status, headers, body = post(server, {"prompts": ["p"], "responses": ["b"]})
        assert status == 503 and body["error"] == "busy: no scoring slot within 0.3 s; retry later"
        scorer.gate.set()
        first[0].join(10)
        assert first[1]["result"][0] == 200


def test_client_retries_a_busy_server_after_retry_after():
    scorer = GatedScorer()
    with make_reward_server(scorer, max_queue=0) as server:
        server.start()
        first = in_thread(post, server, {"prompts": ["p"], "responses": ["a"]})
        assert scorer.started.acquire(timeout=10)
        threading.Timer(0.5, scorer.gate.set).start()  # the server frees up while the client backs off
        client = RemoteRewardClient(server.url, retries=3, backoff_s=0.05)
        start = time.monotonic()
        assert client.score(["p"], ["xyz"]) == [3.0]
        assert time.monotonic() - start >= 0.9  # it waited the server's Retry-After (1 s), not its own 0.05 s
        first[0].join(10)


def test_connections_over_the_cap_get_503_without_a_thread():
    with make_reward_server(lambda p, r: [0.0] * len(p), max_connections=2) as server:
        server.evict_after_s = 60.0  # the idle connections are too young to be closed for the newcomer
        server.start()
        idle = [socket.create_connection(server.server_address[:2]) for _ in range(2)]  # hold both slots
        try:
            wait_for(lambda: server.open_connections == 2)
            conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
            conn.request("GET", "/health")
            response = conn.getresponse()
            assert response.status == 503 and response.getheader("Retry-After") == "1"
            assert "server busy: 2 connections open" in json.loads(response.read())["error"]
            conn.close()
        finally:
            for sock in idle:
                sock.close()
        wait_for(lambda: server.open_connections == 0)
        assert health(server) == 200


@pytest.mark.parametrize("how", ["half_body", "headers_only", "before_answer", "reset_while_scoring"])
def test_client_disconnecting_mid_request_harms_nothing(how, caplog):
    scorer = GatedScorer()
    scorer.gate.set()
    slow = threading.Event()

    def score(prompts, responses):
        if how == "reset_while_scoring":
            slow.set()
            time.sleep(0.3)  # the client resets the connection meanwhile
        return scorer(prompts, responses)

    with caplog.at_level(logging.INFO), make_reward_server(score) as server:
        server.start()
        body = json.dumps({"prompts": ["p"], "responses": ["abcd"]}).encode()
        head = (f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        sock = socket.create_connection(server.server_address[:2])
        if how == "half_body":
            sock.sendall(head + body[: len(body) // 2])
        elif how == "headers_only":
            sock.sendall(head)
        else:
            sock.sendall(head + body)
        if how == "reset_while_scoring":
            assert slow.wait(10)
            # SO_LINGER 0: close() sends a TCP reset, as a crashed client would.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
        wait_for(lambda: server.open_connections == 0)
        # The server is fine and answers the next client.
        assert post(server, {"prompts": ["q"], "responses": ["xy"]})[:3:2] == (200, {"rewards": [2.0]})
    # No traceback: a client that went away is routine, logged in one line at most.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
