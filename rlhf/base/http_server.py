"""The base of the project's HTTP servers (the policy server and the reward server): a threading server on a
loopback address by default, startable in a background thread and closed cleanly (tests and ``distilrl serve*``).

It holds at most ``max_connections`` connections (one thread each); a client beyond that gets an immediate 503
with a JSON error and ``Retry-After`` instead of a new thread, so a flood of clients cannot exhaust the process.
A client that disconnects mid-request costs its own connection only: no traceback, no effect on the others.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger(__name__)


class BackgroundHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must not keep the process alive or block close()
    retry_after_s = 1  # what a busy answer (503) tells the client to wait, in seconds
    # The listen backlog (socketserver's default is 5): a burst of clients connecting at once must queue in the
    # kernel, not be reset before accept() gets to them.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int = 256):
        # Pick the address family from the host so "::1" works as well as "127.0.0.1".
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        if max_connections <= 0:
            raise ValueError("max_connections must be positive")
        super().__init__(address, handler)
        self.max_connections = max_connections
        self._connections = 0
        self._connections_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def open_connections(self) -> int:
        return self._connections

    def process_request(self, request, client_address) -> None:
        with self._connections_lock:
            full = self._connections >= self.max_connections
            if not full:
                self._connections += 1
        if full:
            self._refuse_busy(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts a thread running process_request_thread
        except BaseException:
            self._connection_closed()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_closed()

    def _connection_closed(self) -> None:
        with self._connections_lock:
            self._connections -= 1

    def _refuse_busy(self, request) -> None:
        """Answer 503 from the accepting thread, without reading the request: it is small and fits the socket's
        send buffer, so this never blocks; a client that already sent a body may see a reset instead."""
        body = json.dumps({"error": f"server busy: {self.max_connections} connections open; retry in "
                                    f"{self.retry_after_s} s"}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: {self.retry_after_s}\r\nConnection: close\r\n\r\n")
        try:
            request.settimeout(1.0)
            request.sendall(head.encode() + body)
        except OSError:
            pass  # the client is gone already

    def handle_error(self, request, client_address) -> None:
        """A client that went away (reset, broken pipe, timeout) is routine under load: one debug line, not the
        base class's traceback on stderr. Anything else is a bug and keeps the traceback."""
        import sys

        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            logger.debug("connection from %s ended: %r", client_address[0], err)
            return
        logger.exception("error while serving %s", client_address[0])

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> threading.Thread:
        """Serve from a daemon thread and return it; ``close()`` stops it."""
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        # A short poll interval makes close() return in ~0.1 s instead of the default 0.5 s.
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=type(self).__name__, daemon=True)
        self._thread.start()
        return self._thread

    def close(self) -> None:
        """Stop serving (waiting for the serve loop to exit) and release the port. Safe to call twice."""
        if self._thread is not None:
            # shutdown() waits for serve_forever to notice; calling it when the loop never ran would hang.
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
