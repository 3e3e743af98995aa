"""What the servers print, in uvicorn's style (rlhf/core/http/logs.py): a ready line with the URL when serving
starts, then one access line per request (client, request line, status and phrase, milliseconds). ``distilrl
serve`` itself, as a subprocess, is checked in tests/rlhf/serve/test_serve_eval_engines.py."""
from __future__ import annotations

import io
import json
import logging
import re
import socket
import threading
import urllib.error
import urllib.request

import pytest

from rlhf.core.http.logs import SERVER_LOGGERS, UvicornStyle, configure_logging
from rlhf.core.http.server import serve_until_interrupted
from rlhf.serve.reward_server import make_reward_server


def status_of(url: str, body: dict | None = None) -> int:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code


def test_serving_starts_with_a_ready_line_and_logs_one_line_per_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    server = make_reward_server(lambda p, r: [1.0] * len(p))
    thread = threading.Thread(target=serve_until_interrupted, args=(server, "distilrl serve-rm"), daemon=True)
    thread.start()
    try:
        assert status_of(f"{server.url}/score", {"prompts": ["p", "q"], "responses": ["a", "b"]}) == 200
        assert status_of(f"{server.url}/nowhere") == 404
    finally:
        server.shutdown()
        thread.join(10)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("rlhf.serve")]
    assert lines[0] == f"distilrl serve-rm running on {server.url} (Press CTRL+C to quit)"
    assert re.fullmatch(r'127\.0\.0\.1:\d+ - "POST /score HTTP/1\.1" 200 OK \d+\.\d ms n=2', lines[1])
    assert re.fullmatch(r'127\.0\.0\.1:\d+ - "GET /nowhere HTTP/1\.1" 404 Not Found \d+\.\d ms n=0', lines[2])


def test_the_format_pads_the_level_as_uvicorn_does():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(UvicornStyle("%(message)s"))
    record = logging.LogRecord("rlhf.serve", logging.WARNING, __file__, 1, "x %s", ("y",), None)
    handler.emit(record)
    assert stream.getvalue() == "WARNING:  x y\n"


def test_configuring_leaves_a_callers_logging_setup_in_charge():
    """Under pytest the root logger has handlers: the servers' lines keep going there (caplog sees them), no
    second handler of ours, nothing cut off from the root."""
    assert logging.getLogger().handlers
    configure_logging()
    configure_logging()
    for name in SERVER_LOGGERS:
        log = logging.getLogger(name)
        assert log.propagate and log.level == logging.INFO
        assert not [h for h in log.handlers if getattr(h, "_distilrl_serve", False)]


@pytest.mark.parametrize("raw,status", [(b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
                                        (b"BAD\r\n\r\n", 400), (b"GET / HTTP/9.9\r\n\r\n", 505)])
def test_a_request_line_the_parser_refuses_gets_a_json_error_and_one_log_line(raw, status, caplog):
    caplog.set_level(logging.INFO)
    with make_reward_server(lambda p, r: [0.0] * len(p)) as server:
        server.start()
        with socket.create_connection(server.server_address[:2], timeout=10) as sock:
            sock.sendall(raw)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split()[1] == str(status).encode() and "error" in json.loads(body)
    assert not [r for r in caplog.records if r.exc_info]  # no traceback
    assert [r for r in caplog.records if r.name == "rlhf.serve.access" and f" {status} " in r.getMessage()]
