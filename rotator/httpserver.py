"""Serve an ASGI app with uvicorn (httptools) in a background thread, on a given or free port.

Used by the admin API and by the simulators.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from typing import Any

import uvicorn


class ServerThread:
    """Serve an ASGI app with uvicorn on ``host:port`` (IPv4 or IPv6; port 0: a free one), in a thread.

    The socket is bound in the constructor, so a clash raises ``OSError`` before anything else starts.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, name: str = "http", *,
                 ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> None:
        # Vault's LIST verb is not a method llhttp knows, so an app can ask for the h11 parser.
        http = getattr(app, "http_parser", "httptools")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.host, self.port = self.sock.getsockname()[:2]
        self.name = name
        self.scheme = "https" if ssl_certfile else "http"  # TLS: the simulated vendor APIs serve HTTPS
        config = uvicorn.Config(
            app, log_level="critical", access_log=False, lifespan="off", http=http,
            proxy_headers=False, server_header=False, date_header=False, timeout_keep_alive=30,
            backlog=4096, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
        )
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

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        with contextlib.suppress(OSError):
            self.sock.close()


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM. Install it before announcing readiness, so a signal that
    follows the announcement at once is never handled by the default (killing) action."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop
