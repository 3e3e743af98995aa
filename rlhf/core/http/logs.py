"""What the servers print, in the style of uvicorn (the server most Python model servers run on): a ready line with
the URL, and one access line per request::

    INFO:     distilrl serve running on http://127.0.0.1:8000 (Press CTRL+C to quit)
    INFO:     127.0.0.1:51234 - "POST /v1/chat/completions HTTP/1.1" 200 OK 412.3 ms

Headers, and so any token, are never logged. ``configure_logging`` is for the ``distilrl serve*`` commands: it
prints the servers' INFO lines on stderr without touching a logging setup the caller already has.
"""
from __future__ import annotations

import logging
import sys
from http import HTTPStatus

ACCESS = logging.getLogger("rlhf.serve.access")
READY = logging.getLogger("rlhf.serve")
# The loggers the servers write to; configure_logging prints them.
SERVER_LOGGERS = ("rlhf.serve", "rlhf.core.http")


class UvicornStyle(logging.Formatter):
    """``LEVEL:`` padded to ten columns, then the message."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname + ':':<10}{super().format(record)}"


def configure_logging(stream=None) -> None:
    """Print the servers' INFO lines (ready, access, warnings) on ``stream`` (stderr). Where logging is already
    set up (a handler on the root logger: the caller's, or pytest's), only their level is set, so the lines go
    where the caller's go, once; otherwise each server logger gets one handler of ours, added once per process."""
    for name in SERVER_LOGGERS:
        log = logging.getLogger(name)
        log.setLevel(logging.INFO)
        if logging.getLogger().handlers or any(getattr(h, "_distilrl_serve", False) for h in log.handlers):
            continue
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(UvicornStyle("%(message)s"))
        handler._distilrl_serve = True  # marks ours, so a second call adds no second handler
        log.addHandler(handler)


def ready_line(what: str, url: str) -> None:
    READY.info("%s running on %s (Press CTRL+C to quit)", what, url)


def access_line(handler, status: int, ms: float, note: str = "") -> None:
    """One line per request: client address, request line, status and phrase, time taken (and ``note``)."""
    host, port = handler.client_address[:2]
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    # A request line the parser refused (too long, malformed) leaves command, path or version unset.
    path = (getattr(handler, "path", None) or "-").split("?", 1)[0]
    request_line = f"{getattr(handler, 'command', None) or '-'} {path} {getattr(handler, 'request_version', '')}"
    ACCESS.info('%s:%s - "%s" %d %s %.1f ms%s', host, port, request_line[:200], status, phrase, ms,
                f" {note}" if note else "")
