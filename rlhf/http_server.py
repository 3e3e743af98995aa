"""The base of the project's HTTP servers (the policy server and the reward server): a threading server on a
loopback address by default, startable in a background thread and closed cleanly (tests and ``distilrl serve*``)."""
from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class BackgroundHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must not keep the process alive or block close()

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]):
        # Pick the address family from the host so "::1" works as well as "127.0.0.1".
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)
        self._thread: threading.Thread | None = None

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
