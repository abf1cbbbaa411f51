"""Serve an ASGI app with uvicorn (httptools) in a background thread, on a given or free port.

Used by the admin API and by the simulators.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

import uvicorn


class ServerThread:
    """Serve an ASGI app with uvicorn on ``host:port`` (IPv4 or IPv6; port 0: a free one), in a thread.

    The socket is bound in the constructor, so a clash raises ``OSError`` before anything else starts.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, name: str = "http",
                 tls: tuple[str, str] | None = None) -> None:
        """``tls``: (certificate chain file, private key file) to serve HTTPS instead of HTTP."""
        # Vault's LIST verb is not a method llhttp knows, so an app can ask for the h11 parser.
        http = getattr(app, "http_parser", "httptools")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Accepted connections inherit TCP_NODELAY (Linux tcp(7)). Without it every answer, written
            # as headers then body, waited for the client's delayed ACK: about 40 ms per request on
            # loopback (a simulator served 22 requests/s per connection instead of hundreds).
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.host, self.port = self.sock.getsockname()[:2]
        self.name = name
        config = uvicorn.Config(
            app, log_level="critical", access_log=False, lifespan="off", http=http,
            proxy_headers=False, server_header=False, date_header=False, timeout_keep_alive=30,
            backlog=4096, ssl_certfile=tls[0] if tls else None, ssl_keyfile=tls[1] if tls else None,
        )
        self.scheme = "https" if tls else "http"
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name=f"{name}-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def _run(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} server on {self.url} did not start")
            time.sleep(0.005)
        return self

    def signal_stop(self) -> None:
        """Ask the server to finish (it notices within uvicorn's 0.1 s tick); ``join`` waits for it."""
        self.server.should_exit = True

    def join(self, timeout: float = 10) -> None:
        # A TLS connection whose client never read its last answer (an SDK that raised on an error
        # status) is closed with a TLS shutdown that waits for the client's close_notify: give the
        # graceful stop a short while, then cut what is left.
        self.thread.join(timeout=min(0.5, timeout) if self.scheme == "https" else timeout)
        if self.thread.is_alive() and self.scheme == "https":
            self.server.force_exit = True
            self.thread.join(timeout=timeout)
        with contextlib.suppress(OSError):
            self.sock.close()

    def stop(self) -> None:
        self.signal_stop()
        self.join()


def stop_all(servers: Iterable[ServerThread]) -> None:
    """Stop several servers in the time of one: every server is signalled before any is waited for."""
    servers = list(servers)
    for server in servers:
        server.signal_stop()
    for server in servers:
        server.join()


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM. Install it before announcing readiness, so a signal that
    follows the announcement at once is never handled by the default (killing) action."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop
