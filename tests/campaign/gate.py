"""An ASGI wrapper around a simulator: counts requests in flight and rewrites chosen answers.

The campaign needs two things the simulators' own fault API does not give: to know when no request
is in flight any more (so a round can end without a late request landing after the fault-free
reconcile), and answers that are hostile *after* the simulator acted (a proxy's HTML page where the
apply or the write took effect; a body that trickles in for a bounded total time). The request always
reaches the simulator unchanged; only the answer is rewritten, so the simulator's state stays the
truth the monitor checks. (Contradictions and garbage where nothing takes effect come from the
simulators' own fault API.)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from rotator.sim.base import Request

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]

PROXY_PAGE = (b"<!DOCTYPE html><html><head><title>Sign in</title></head><body><form action=\"/login\">"
              b"<input name=\"user\"></form></body></html>")

# kind -> what it does to a handled answer (the request took effect before the answer is rewritten)
KINDS = (
    "html",  # 200 text/html instead of the JSON answer (a login proxy in the way)
    "trickle",  # the same answer, its body dripping in over `seconds`
)


@dataclass
class Rewrite:
    route: str
    kind: str
    remaining: int
    seconds: float = 0.0


class Gate:
    """Wraps a simulator app (``Gate(sims.cloudflare)``); serve the Gate instead of the app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.http_parser = getattr(app, "http_parser", "httptools")
        self._lock = threading.Lock()
        self._inflight = 0
        self._rewrites: list[Rewrite] = []
        self.rewritten = 0

    # -- control (thread-safe) -------------------------------------------------------------------
    def arm(self, route: str, kind: str, count: int = 1, seconds: float = 0.0) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown rewrite {kind!r}")
        with self._lock:
            self._rewrites.append(Rewrite(route, kind, count, seconds))

    def clear(self) -> None:
        with self._lock:
            self._rewrites.clear()

    @property
    def inflight(self) -> int:
        with self._lock:
            return self._inflight

    def _take(self, scope: Scope) -> Rewrite | None:
        with self._lock:
            if not self._rewrites:
                return None
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
        route = self.app.route_of(Request(scope["method"], scope["path"], query, {}, b""))
        with self._lock:
            for rw in self._rewrites:
                if rw.route == route:
                    rw.remaining -= 1
                    if rw.remaining <= 0:
                        self._rewrites.remove(rw)
                    self.rewritten += 1
                    return rw
        return None

    # -- ASGI -------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Any, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self._lock:
            self._inflight += 1
        try:
            rewrite = self._take(scope)
            if rewrite is None:
                await self.app(scope, receive, send)
            else:
                await self.app(scope, receive, _Capture(send, rewrite).send)
        finally:
            with self._lock:
                self._inflight -= 1


class _Capture:
    """Buffers one answer and sends it rewritten. Exposes the server's transport, so a simulator
    that drops the connection (its ``drop`` fault) still can."""

    def __init__(self, send: Send, rewrite: Rewrite) -> None:
        self._send = send
        self.rewrite = rewrite
        self.transport = getattr(getattr(send, "__self__", None), "transport", None)
        self._start: Message | None = None
        self._body: list[bytes] = []

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._start = message
            return
        if message["type"] != "http.response.body" or self._start is None:
            await self._send(message)
            return
        self._body.append(message.get("body", b""))
        if message.get("more_body"):
            return
        status, headers, body = _rewrite(self.rewrite, self._start["status"], list(self._start.get("headers", [])),
                                         b"".join(self._body))
        headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        if self.rewrite.kind != "trickle" or not body:
            await self._send({"type": "http.response.body", "body": body})
            return
        pieces = max(2, min(len(body), 20))
        step = -(-len(body) // pieces)
        for i in range(0, len(body), step):
            await self._send({"type": "http.response.body", "body": body[i:i + step], "more_body": True})
            await asyncio.sleep(self.rewrite.seconds / pieces)
        await self._send({"type": "http.response.body", "body": b""})


def _rewrite(rw: Rewrite, status: int, headers: list[tuple[bytes, bytes]],
             body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    if rw.kind == "html":
        return 200, [(b"content-type", b"text/html")], PROXY_PAGE
    return status, headers, body  # trickle: the same answer, sent slowly
