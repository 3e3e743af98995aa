"""JSON over HTTP, the request handler both servers (the policy server, the reward server) derive from: routing
with 404/405 for every method, bounded body reading, JSON answers or a streamed one, errors as one line, the
bounded drain of a refused body, and one access-log line per request (rlhf/core/http/logs.py)."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from rlhf.core.http.logs import access_line
from rlhf.core.http.server import GuardedHandler

logger = logging.getLogger(__name__)

# After refusing a request without reading its body we still read and discard, never keep, up to this much of it
# for at most _DRAIN_TIMEOUT_S (see JsonHandler._discard_unread_body); larger or slower bodies get a reset.
_DRAIN_LIMIT_BYTES = 16 * 1024 * 1024
_DRAIN_TIMEOUT_S = 2.0


class HttpError(Exception):
    """Answered to the client with this status, ``message`` (one line), the request ``param`` it is about (if any)
    and extra response headers; each server shapes the JSON (``JsonHandler.error_payload``)."""

    def __init__(self, status: HTTPStatus, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, one_line(message), param, headers or {}


class Streamed:
    """A route's answer written piece by piece (server-sent events): ``write(handler)`` sends the head and body;
    the connection closes after it, which marks the end of the body."""

    def __init__(self, write: Callable[["JsonHandler"], None]):
        self.write = write


class JsonHandler(GuardedHandler):
    """JSON over HTTP for both servers: routing (unknown path 404, known path with another method 405, any method),
    bounded body reading (411, 400, 413), JSON answers, a bounded drain of a body left unread, and one access-log
    line per request. Subclasses set ``routes`` (path -> (method, method name)) and may override ``authorize``
    (runs before the body is read), ``error_payload`` and ``access_note``."""

    routes: dict[str, tuple[str, str]] = {}
    timeout = 60.0  # socket timeout for anything outside a request's deadline

    def do_GET(self) -> None:
        self._dispatch()

    # Every other method the base class would answer 501 (a server error) gets the 404/405 of the routing table.
    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_TRACE = do_CONNECT = do_GET

    def _dispatch(self) -> None:
        started, self.status_sent, self._body_read = time.perf_counter(), 0, False
        try:
            answer: Any = self._route()
            status, headers = HTTPStatus.OK, {}
        except HttpError as err:
            status, answer, headers = err.status, self.error_payload(err), err.headers
        except Exception as err:  # a bug here must cost one request, not leave the client without an answer
            logger.exception("%s failed on %s %s", type(self.server).__name__, self.command, self.path)
            err = HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {err!r}")
            status, answer, headers = err.status, self.error_payload(err), {}
        try:
            if isinstance(answer, Streamed):
                self.close_connection = True
                answer.write(self)
            else:
                self.send_json(status, answer, headers)
            if not self._body_read:
                self._discard_unread_body()
        except OSError:
            self.close_connection = True  # the client went away (reset, broken pipe, timeout): nothing more to do
        finally:
            self.server.count_request()
            access_line(self, self.status_sent, (time.perf_counter() - started) * 1000, self.access_note())

    def _route(self) -> Any:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        if path not in self.routes:
            raise HttpError(HTTPStatus.NOT_FOUND, f"unknown path {path!r}; use {', '.join(self.routes)}")
        method, name = self.routes[path]
        if self.command != method:
            raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} accepts {method} only, not {self.command}",
                            headers={"Allow": method})
        if method != "POST":
            self.request_received()
            return getattr(self, name)()
        self.authorize()  # before reading anything: a refused client costs us no body reads
        return getattr(self, name)(self.read_json())

    def authorize(self) -> None:
        """Raise ``HttpError`` to refuse a POST before its body is read."""

    def error_payload(self, err: HttpError) -> dict[str, Any]:
        return {"error": err.message}

    def access_note(self) -> str:
        """Extra words for the access-log line (say, a batch size)."""
        return ""

    def read_json(self) -> Any:
        """The request's body as JSON: 411 without a Content-Length (we refuse oversize bodies before reading
        them), 413 over ``max_request_bytes``, 400 for a short or malformed body."""
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self.close_connection = True
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "Content-Length header required")
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise HttpError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {one_line(length_header, 40)!r}") from None
        if length > self.server.max_request_bytes:
            self.close_connection = True
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"body of {length} bytes is over the limit of {self.server.max_request_bytes}")
        self._body_read = True
        try:
            raw = self.rfile.read(length)
        except OSError as err:  # the client reset the connection or missed the request deadline
            self.close_connection = True
            raise HttpError(HTTPStatus.BAD_REQUEST, f"body not received: {type(err).__name__}") from None
        self.request_received()
        if len(raw) != length:
            self.close_connection = True
            raise HttpError(HTTPStatus.BAD_REQUEST, f"body ended after {len(raw)} of {length} bytes")
        try:
            return parse_json(raw)
        except ValueError as err:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"malformed JSON: {err}") from None

    def send_json(self, status: HTTPStatus, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, allow_nan=False).encode("utf-8")
        self.send_head(status, "application/json", {"Content-Length": str(len(body)), **(headers or {})})
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def send_head(self, status: HTTPStatus, content_type: str, headers: dict[str, str]) -> None:
        self.status_sent = int(status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _discard_unread_body(self) -> None:
        """After answering without reading the body (413, 401, 404...), read and throw away up to
        ``_DRAIN_LIMIT_BYTES`` of it for at most ``_DRAIN_TIMEOUT_S``, then close: an HTTP/1.x client sends its
        whole body before reading the answer, and closing a socket with unread input resets the connection, so
        the client would see "connection reset" instead of our 413 or 401."""
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return
        if length <= 0:
            return
        self.close_connection = True
        # Tighten the request's deadline to the drain's: every read below ends by then, however the client paces.
        self._reader.deadline = min(self._reader.deadline, time.monotonic() + _DRAIN_TIMEOUT_S)
        remaining = min(length, _DRAIN_LIMIT_BYTES)
        try:
            while remaining > 0:
                chunk = self.rfile.read1(min(remaining, 65536))
                if not chunk:
                    break
                remaining -= len(chunk)
        except OSError:
            pass  # the client closed, or the drain's time is up: we are closing anyway

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class answers protocol errors (bad request line, header too long) in HTML: answer JSON, with a
        status line and headers even where the refused line left the version at HTTP/0.9 (which has neither)."""
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        status = HTTPStatus(code)
        self.send_json(status, self.error_payload(HttpError(status, message or status.phrase)))
        access_line(self, code, 0.0, "")

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _dispatch logs one access line per request itself

    def log_message(self, format: str, *args: Any) -> None:
        logger.warning("%s %s", self.client_address[0], format % args)


def parse_json(raw: bytes) -> object:
    """A request body as JSON; ``ValueError`` with one line for anything that is not (bad UTF-8, bad syntax,
    nesting too deep for the parser, an integer of more digits than Python converts)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(" ".join(str(err).split())[:200]) from None


def one_line(text: object, limit: int = 300) -> str:
    """Error messages go into JSON and log lines: one bounded line."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
