"""The base of the project's HTTP servers (the policy server and the reward server): a threading server on a
loopback address by default, startable in a background thread and closed cleanly (tests and ``distilrl serve*``).

It holds at most ``max_connections`` connections (one thread each); a client beyond that gets an immediate 503
with a JSON error and ``Retry-After`` instead of a new thread, so a flood of clients cannot exhaust the process.
A client that disconnects mid-request costs its own connection only: no traceback, no effect on the others.

Slow clients cannot hold the slots either. Each request (request line, headers and body; for a kept-alive
connection, also the wait for it) must arrive within ``request_deadline_s`` as a whole, not per read, so a client
trickling a header line every few seconds is cut off at the deadline. And when every slot is taken, the connection
that has spent longest on sending its request (at least ``evict_after_s``) is closed to make room: a request that
arrives whole in a moment never loses its slot to one that dribbles in. Handlers derive from ``GuardedHandler``
and call ``request_received()`` once the body is read.
"""
from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rlhf.core.config.run_config import ConfigError
from rlhf.core.http.logs import ready_line
from rlhf.core.http.queue import WorkQueue

logger = logging.getLogger(__name__)


class ListenError(ConfigError):
    """The server cannot listen where asked (port in use, address not on this machine), in one line."""


class BackgroundHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must not keep the process alive or block close()
    retry_after_s = 1  # what a busy answer (503) tells the client to wait, in seconds
    # The listen backlog (socketserver's default is 5): a burst of clients connecting at once must queue in the
    # kernel, not be reset before accept() gets to them.
    request_queue_size = 128
    request_deadline_s = 15.0  # to receive one whole request (or, kept alive, to start the next one)
    evict_after_s = 0.5  # a connection still sending its request after this long may be closed to make room
    max_request_bytes = 1_000_000  # the largest request body a JsonHandler reads (413 beyond)
    queue: WorkQueue | None = None  # the work behind the handlers (generation, scoring), closed with the server

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int = 256):
        self.request_count, self._count_lock = 0, threading.Lock()
        # Pick the address family from the host so "::1" works as well as "127.0.0.1".
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        if max_connections <= 0:
            raise ValueError("max_connections must be positive")
        try:
            super().__init__(address, handler)
        except OSError as err:
            raise ListenError(f"cannot listen on {address[0]}:{address[1]}: {err.strerror or err} (choose another "
                              f"--port, or stop the process that holds it)") from None
        self.max_connections = max_connections
        # socket -> when it started sending its current request, or None once that request is in (being served)
        self._connections: dict[socket.socket, float | None] = {}
        self._connections_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.evicted = 0  # connections closed to make room for others

    def count_request(self) -> None:
        """Every request answered, any path: lets tests and operators see traffic (``request_count``)."""
        with self._count_lock:
            self.request_count += 1

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def process_request(self, request, client_address) -> None:
        with self._connections_lock:
            victim = self._slowest_sender() if len(self._connections) >= self.max_connections else None
            admitted = len(self._connections) < self.max_connections or victim is not None
            if admitted:
                self._connections[request] = time.monotonic()
        if victim is not None:
            self._evict(victim)
        if not admitted:
            self._refuse_busy(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts a thread running process_request_thread
        except BaseException:
            self._connection_closed(request)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_closed(request)

    def connection_sending(self, connection: socket.socket, sending: bool) -> None:
        """Mark a connection as sending its request (evictable once it has taken ``evict_after_s``) or not."""
        with self._connections_lock:
            if connection in self._connections:
                self._connections[connection] = time.monotonic() if sending else None

    def _slowest_sender(self) -> socket.socket | None:
        """The connection that has been sending its request longest, if that is over ``evict_after_s``; it is
        taken out of the count at once (its thread ends shortly), so it is never picked twice."""
        now = time.monotonic()
        senders = [(since, conn) for conn, since in self._connections.items()
                   if since is not None and now - since >= self.evict_after_s]
        if not senders:
            return None
        victim = min(senders, key=lambda pair: pair[0])[1]
        del self._connections[victim]
        return victim

    def _evict(self, connection: socket.socket) -> None:
        self.evicted += 1
        try:
            connection.shutdown(socket.SHUT_RDWR)  # its handler's read returns at once; the thread then closes it
        except OSError:
            pass  # already gone

    def _connection_closed(self, request) -> None:
        with self._connections_lock:
            self._connections.pop(request, None)

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
        if self.queue is not None:  # first: requests waiting on it are answered rather than left hanging
            self.queue.close()
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


class _DeadlineReader(io.RawIOBase):
    """The socket as a raw stream whose reads all end at one deadline (``deadline``, a ``time.monotonic()``
    value): each read waits at most for the time left, so the deadline holds for a whole request, however it is
    split into reads."""

    def __init__(self, connection: socket.socket):
        self.connection = connection
        self.deadline = float("inf")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not received within the server's deadline")
        self.connection.settimeout(left)
        return self.connection.recv_into(buffer)


class GuardedHandler(BaseHTTPRequestHandler):
    """A request handler whose requests must arrive whole within the server's ``request_deadline_s``, and whose
    connection may be evicted while it is still sending one (see the module's docstring)."""

    server: BackgroundHTTPServer
    write_timeout_s = 60.0  # a client that stops reading our answer

    def setup(self) -> None:
        super().setup()
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        self._reader.deadline = time.monotonic() + self.server.request_deadline_s
        self.server.connection_sending(self.connection, True)
        super().handle_one_request()

    def request_received(self) -> None:
        """The whole request is in: the connection is being served, not evictable; writes get their own timeout."""
        self.server.connection_sending(self.connection, False)
        self.connection.settimeout(self.write_timeout_s)


def serve_until_interrupted(server: BackgroundHTTPServer, what: str) -> None:
    """Print the ready line, serve in this thread until Ctrl-C (or SIGTERM turned into KeyboardInterrupt), then
    close the server and release the port."""
    ready_line(what, server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("shutting down")
    finally:
        server.close()
