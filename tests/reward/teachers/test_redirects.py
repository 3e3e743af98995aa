"""Clients that hold a secret (the judge's API key, the reward server's token) never follow a redirect, so the
secret never reaches another host; real local servers on 127.0.0.1. The judge cache key includes the endpoint."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from reward.scoring.remote import RemoteRewardClient
from reward.teachers.openai_http import OpenAITeacher


class Recorder(ThreadingHTTPServer):
    """Answers every POST: a redirect to ``location`` when set, else a judge reply carrying ``quality`` and a
    reward-server reply; records each request's path and Authorization header."""

    daemon_threads = True

    def __init__(self, location: str | None = None, status: int = 302, quality: int = 8):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.location, self.status, self.quality = location, status, quality
        self.seen: list[tuple[str, str | None]] = []
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        server: Recorder = self.server
        length = int(self.headers.get("Content-Length") or 0)
        sent = json.loads(self.rfile.read(length)) if length else {}
        server.seen.append((self.path, self.headers.get("Authorization")))
        if server.location:
            self.send_response(server.status)
            self.send_header("Location", server.location + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        content = json.dumps({"quality": server.quality, "rv": 2, "cd": 4})
        body = json.dumps({"choices": [{"message": {"content": content}}],
                           "rewards": [0.5] * len(sent.get("prompts", []))}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def servers():
    started: list[Recorder] = []

    def start(**kwargs) -> Recorder:
        started.append(Recorder(**kwargs))
        return started[-1]

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_the_judge_key_never_follows_a_redirect(servers, monkeypatch, status):
    elsewhere = servers()
    redirector = servers(location=elsewhere.base, status=status)
    monkeypatch.setenv("JUDGE_KEY", "sk-secret")
    teacher = OpenAITeacher(redirector.base + "/v1", "judge", api_key_env="JUDGE_KEY", max_retries=2, backoff_s=0)
    [verdict] = teacher.judge(["1+1="], ["#2"], [None])
    assert verdict.error is not None and f"redirect ({status}) to {elsewhere.base}" in verdict.error
    assert "sk-secret" not in verdict.error and "\n" not in verdict.error
    assert elsewhere.seen == []  # nothing reached the other host: no key, and no verdict taken from it
    assert len(redirector.seen) == 1  # a redirect is not retried


@pytest.mark.parametrize("status", [302, 307])
def test_the_reward_token_never_follows_a_redirect(servers, monkeypatch, status):
    elsewhere = servers()
    redirector = servers(location=elsewhere.base, status=status)
    monkeypatch.setenv("RM_TOKEN", "tok-secret")
    client = RemoteRewardClient(redirector.base, token_env="RM_TOKEN", retries=2, backoff_s=0)
    with pytest.raises(RuntimeError, match=f"redirect \\({status}\\) to {elsewhere.base}/score refused") as info:
        client.score(["p"], ["r"])
    assert "tok-secret" not in str(info.value)
    assert elsewhere.seen == [] and len(redirector.seen) == 1


def test_without_a_redirect_the_credentials_arrive(servers, monkeypatch):
    server = servers()
    monkeypatch.setenv("RM_TOKEN", "tok-secret")
    assert RemoteRewardClient(server.base, token_env="RM_TOKEN").score(["p"], ["r"]) == [0.5]
    assert server.seen == [("/score", "Bearer tok-secret")]


def test_the_judge_cache_key_includes_the_endpoint(servers, tmp_path):
    """Two servers that report the same model name but judge differently: the second one's verdicts are not
    served from the first one's cache."""
    first, second = servers(quality=8), servers(quality=3)
    rows = (["1+1="], ["#2"], [None])
    [a] = OpenAITeacher(first.base, "judge", cache_dir=tmp_path).judge(*rows)
    [b] = OpenAITeacher(second.base, "judge", cache_dir=tmp_path).judge(*rows)
    assert (a.quality, b.quality) != (None, None) and a.quality != b.quality and len(second.seen) == 1
    [again] = OpenAITeacher(first.base, "judge", cache_dir=tmp_path).judge(*rows)
    assert again.quality == a.quality and len(first.seen) == 1  # the same endpoint still hits its cache
