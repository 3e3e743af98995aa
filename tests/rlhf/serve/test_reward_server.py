"""The HTTP reward server and its client, over real sockets on 127.0.0.1 with a toy deterministic score_fn."""
from __future__ import annotations

import http.client
import json
import logging
import math
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from reward.scoring.remote import RemoteRewardClient
from rlhf.core.config.endpoint import Endpoint
from rlhf.serve.reward_server import RewardServer, make_reward_server
from tests.scoring import reward_worker

TOKEN = "s3cret-token"


class ToyScorer:
    """reward = len(response) / 10; a response containing RAISE raises, one containing NAN scores NaN.

    It also records how many calls overlap, to check that the server serialises scoring.
    """

    def __init__(self) -> None:
        self.calls, self.active, self.max_active = 0, 0, 0
        self._count_lock = threading.Lock()

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        with self._count_lock:
            self.calls += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(0.002)  # let concurrent requests overlap if the server did not serialise them
            if any("RAISE" in r for r in responses):
                raise ValueError("boom\nwith a second line")
            return [math.nan if "NAN" in r else len(r) / 10 for r in responses]
        finally:
            with self._count_lock:
                self.active -= 1


def _start(server: RewardServer) -> RewardServer:
    server.start()
    return server


@pytest.fixture(scope="module")
def scorer() -> ToyScorer:
    return ToyScorer()


@pytest.fixture(scope="module")
def server(scorer: ToyScorer) -> Iterator[RewardServer]:
    srv = _start(make_reward_server(scorer, max_request_bytes=20_000, max_batch=50))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def token_server(scorer: ToyScorer) -> Iterator[RewardServer]:
    srv = _start(make_reward_server(scorer, token=TOKEN))
    yield srv
    srv.close()


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore any http_proxy in the env


def call(url: str, path: str, payload: Any = None, *, method: str | None = None, raw: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """(status, JSON body) of one request, for success and error statuses alike."""
    data = raw if raw is not None else (None if payload is None else json.dumps(payload).encode())
    request = urllib.request.Request(url + path, data=data, headers=headers or {}, method=method)
    try:
        with _DIRECT.open(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def raw_request(server: RewardServer, method: str, path: str, headers: dict[str, str], body: bytes = b""
                ) -> tuple[int, dict]:
    """A request built by hand, for what urllib will not send (no Content-Length, a lying Content-Length)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(body or None)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_health(server: RewardServer) -> None:
    assert call(server.url, "/health") == (200, {"status": "ok"})


def test_get_reward_without_prompts_scores_whole_query(server: RewardServer) -> None:
    status, body = call(server.url, "/get_reward", {"query": ["abcd", "", "0123456789"]})
    assert status == 200 and body == {"rewards": [0.4, 0.0, 1.0]}


def test_get_reward_with_prompts_strips_the_prompt(server: RewardServer) -> None:
    payload = {"query": ["Q: 1+1=2", "Q: x=ab"], "prompts": ["Q: 1+1=", "Q: x="], "labels": ["ignored", "too"]}
    assert call(server.url, "/get_reward", payload) == (200, {"rewards": [0.1, 0.2]})


def test_get_reward_query_not_starting_with_prompt(server: RewardServer) -> None:
    status, body = call(server.url, "/get_reward", {"query": ["Q: a", "R: b"], "prompts": ["Q: ", "Q: "]})
    assert status == 400 and "query[1]" in body["error"]


def test_score_explicit_pairs(server: RewardServer) -> None:
    status, body = call(server.url, "/score", {"prompts": ["p", "q"], "responses": ["xyz", "xy"]})
    assert status == 200 and body == {"rewards": [0.3, 0.2]}
    assert call(server.url, "/score", {"prompts": [], "responses": []}) == (200, {"rewards": []})


def test_token(token_server: RewardServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
               ) -> None:
    caplog.set_level(logging.DEBUG)
    payload = {"prompts": ["p"], "responses": ["abc"]}
    assert call(token_server.url, "/score", payload)[0] == 401
    assert call(token_server.url, "/score", payload, headers={"Authorization": "Bearer wrong"})[0] == 401
    assert call(token_server.url, "/get_reward", {"query": ["a"]}, headers={"Authorization": TOKEN})[0] == 401
    ok = call(token_server.url, "/score", payload, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok == (200, {"rewards": [0.3]})
    assert call(token_server.url, "/health") == (200, {"status": "ok"})  # probes need no token
    # Through the client, the token comes from the environment.
    monkeypatch.setenv("RM_TEST_TOKEN", TOKEN)
    client = RemoteRewardClient(token_server.url, token_env="RM_TEST_TOKEN")
    assert client.score(["p"], ["abcdef"]) == [0.6]
    with pytest.raises(RuntimeError, match="401"):
        RemoteRewardClient(token_server.url).score(["p"], ["a"])
    assert TOKEN not in repr(client)
    assert TOKEN not in caplog.text and "/score" in caplog.text  # requests are logged, the token never


def test_client_requires_set_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RM_TEST_UNSET", raising=False)
    with pytest.raises(ValueError, match="RM_TEST_UNSET"):
        RemoteRewardClient("http://127.0.0.1:1", token_env="RM_TEST_UNSET")


def test_malformed_json_and_wrong_types(server: RewardServer) -> None:
    status, body = call(server.url, "/score", raw=b'{"prompts": [', headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"].startswith("malformed JSON")
    assert call(server.url, "/score", raw=b"\xff\xfe")[0] == 400
    for payload, fragment in [
        ([1, 2], "JSON object"),
        ({"query": "abc"}, "'query' must be a list"),
        ({"query": ["a", 3]}, "query[1] must be a string"),
        ({"prompts": ["a"]}, "missing 'responses'"),
        ({"prompts": ["a"], "responses": [None]}, "responses[0]"),
    ]:
        path = "/get_reward" if isinstance(payload, dict) and "query" in payload else "/score"
        status, body = call(server.url, path, payload)
        assert status == 400 and fragment in body["error"], (payload, body)


def test_mismatched_lengths(server: RewardServer) -> None:
    status, body = call(server.url, "/score", {"prompts": ["a", "b"], "responses": ["x"]})
    assert status == 400 and "2" in body["error"] and "1" in body["error"]
    assert call(server.url, "/get_reward", {"query": ["a", "b"], "prompts": ["a"]})[0] == 400


def test_oversized_body_is_refused_and_server_keeps_going(server: RewardServer) -> None:
    big = {"prompts": ["p"], "responses": ["x" * 50_000]}  # over the fixture's 20 kB limit
    status, body = call(server.url, "/score", big)
    assert status == 413 and "20000" in body["error"]
    # Refused on the header alone: the server answers without waiting for a body that never comes.
    status, body = raw_request(server, "POST", "/score", {"Content-Length": str(10**9)})
    assert status == 413
    assert call(server.url, "/score", {"prompts": ["p"], "responses": ["ok"]}) == (200, {"rewards": [0.2]})


def test_batch_over_limit(server: RewardServer) -> None:
    status, body = call(server.url, "/get_reward", {"query": ["a"] * 51})
    assert status == 413 and "51" in body["error"]


def test_missing_or_bad_content_length(server: RewardServer) -> None:
    assert raw_request(server, "POST", "/score", {})[0] == 411
    assert raw_request(server, "POST", "/score", {"Content-Length": "abc"})[0] == 400


def test_unknown_path_and_wrong_method(server: RewardServer) -> None:
    status, body = call(server.url, "/nope")
    assert status == 404 and "/nope" in body["error"]
    assert call(server.url, "/score")[0] == 405  # GET
    assert call(server.url, "/health", {"x": 1})[0] == 405  # POST
    assert call(server.url, "/score", {}, method="PUT")[0] == 405


def test_score_fn_exception_is_500_and_server_survives(server: RewardServer) -> None:
    status, body = call(server.url, "/score", {"prompts": ["p", "p"], "responses": ["fine", "RAISE"]})
    assert status == 500 and "ValueError: boom" in body["error"] and "\n" not in body["error"]
    assert call(server.url, "/health") == (200, {"status": "ok"})
    assert call(server.url, "/score", {"prompts": ["p"], "responses": ["fine"]}) == (200, {"rewards": [0.4]})


def test_nan_reward_is_500_naming_the_index(server: RewardServer) -> None:
    status, body = call(server.url, "/score", {"prompts": ["p"] * 3, "responses": ["a", "b", "NAN"]})
    assert status == 500 and "index 2" in body["error"]


def test_client_batches_and_matches_direct_scoring(server: RewardServer, scorer: ToyScorer) -> None:
    responses = ["x" * i for i in range(10)]
    before = scorer.calls
    client = RemoteRewardClient(server.url, batch_size=3)
    assert client.score(["p"] * 10, responses) == [i / 10 for i in range(10)]
    assert scorer.calls - before == 4  # 3 + 3 + 3 + 1
    assert client.score([], []) == []
    with pytest.raises(ValueError):
        client.score(["p"], [])


def test_client_does_not_retry_4xx(server: RewardServer, scorer: ToyScorer) -> None:
    client = RemoteRewardClient(server.url, batch_size=100, backoff_s=0.01)
    with pytest.raises(RuntimeError, match=r"HTTP 413") as err:
        client.score(["p"] * 51, ["r"] * 51)
    assert server.url in str(err.value)


class _FlakyHandler(BaseHTTPRequestHandler):
    """Fails the first ``fail_first`` calls with 503, then scores like ToyScorer."""

    calls = 0
    fail_first = 2

    def do_POST(self) -> None:
        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.calls <= self.fail_first:
            code, answer = 503, {"error": "warming up"}
        else:
            code, answer = 200, {"rewards": [len(r) / 10 for r in body["responses"]]}
        data = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_client_retries_5xx_then_succeeds() -> None:
    _FlakyHandler.calls = 0
    flaky = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyHandler)
    thread = threading.Thread(target=flaky.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{flaky.server_address[1]}"
        client = RemoteRewardClient(url, retries=3, backoff_s=0.01)
        assert client.score(["p"], ["abc"]) == [0.3]
        assert _FlakyHandler.calls == 3
        # Too few retries: a one-line RuntimeError naming the URL and the last status.
        _FlakyHandler.calls = 0
        with pytest.raises(RuntimeError) as err:
            RemoteRewardClient(url, retries=1, backoff_s=0.01).score(["p"], ["abc"])
        assert url in str(err.value) and "503" in str(err.value) and "warming up" in str(err.value)
        assert _FlakyHandler.calls == 2
    finally:
        flaky.shutdown()
        flaky.server_close()


def test_client_gives_up_on_closed_port() -> None:
    with socket.socket() as sock:  # find a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        RemoteRewardClient(url, retries=2, backoff_s=0.01, timeout_s=2).score(["p"], ["r"])
    message = str(err.value)
    assert url in message and "3 attempts" in message and "connection error" in message and "\n" not in message
    assert time.monotonic() - started < 5


def test_concurrent_requests_get_their_own_answers(server: RewardServer, scorer: ToyScorer) -> None:
    scorer.max_active = 0
    results: dict[int, list[float]] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            client = RemoteRewardClient(server.url, batch_size=4)
            responses = ["y" * ((k * 7 + i) % 13) for i in range(10)]
            got = client.score([f"prompt {k}"] * 10, responses)
            assert got == [len(r) / 10 for r in responses]
            status, body = call(server.url, "/get_reward", {"query": [f"P{k}:" + "z" * k], "prompts": [f"P{k}:"]})
            assert status == 200 and body["rewards"] == [k / 10]
            results[k] = got
        except BaseException as exc:  # surface failures from the worker threads
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors, errors
    assert sorted(results) == list(range(8))
    assert scorer.max_active == 1  # scoring was serialised by the server's lock


def test_close_releases_port(scorer: ToyScorer) -> None:
    srv = _start(make_reward_server(scorer))
    url = srv.url
    assert call(url, "/health")[0] == 200
    srv.close()
    srv.close()  # idempotent
    with pytest.raises(urllib.error.URLError):
        _DIRECT.open(url + "/health", timeout=2)
    with make_reward_server(scorer) as unstarted:  # closing a server that never served must not hang
        assert unstarted.url.startswith("http://127.0.0.1:")


def test_reward_worker_scores_through_a_remote_reward_server():
    """RL's reward workers can use a reward server instead of a local RM (reward.rm_endpoint)."""

    seen = []

    def score_fn(prompts, responses):
        seen.extend(responses)
        return [float(len(r)) for r in responses]

    with make_reward_server(score_fn) as server:
        server.start()
        worker = reward_worker({"rm": 1.0, "verifier": 10.0}, rm_endpoint=Endpoint(url=server.url), use_reference=True)
        results = worker.score(["1+2=", "1+2="], ["#3", "#44"], ["3", "3"])
    # The server saw the responses with the reference appended; the reward adds the verifier's weighted verdict.
    assert seen == ["#3 ref 3", "#44 ref 3"]
    assert [r["rm"] for r in results] == [8.0, 9.0]
    assert [r["reward"] for r in results] == [18.0, 9.0]
