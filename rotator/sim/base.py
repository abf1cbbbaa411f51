"""What both simulators share: a raw ASGI request cycle, fault injection, counters and a server thread.

The simulators are plain ASGI applications served by uvicorn (httptools parser). They skip a web
framework on purpose: every status, header and byte of the body is chosen by hand, as the specs
demand, and the hot path stays short so a simulator is never the bottleneck of a benchmark.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from rotator import wire
from rotator.httpserver import ServerThread

__all__ = ["Fault", "FaultBook", "Request", "Response", "ServerThread", "SimApp", "serve"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return wire.loads(self.body)  # deep nesting too is a ValueError: a 400, as malformed JSON is


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


@dataclass(slots=True)
class Fault:
    """One armed fault on a route, consumed request by request.

    kind: ``status`` answers ``status`` instead of handling the request (nothing takes effect);
    ``drop`` handles the request (it takes effect) and then drops the connection unanswered;
    ``late`` handles it and answers only after ``delay`` seconds;
    ``trickle`` handles it and sends the answer's body one byte every ``delay`` seconds (a slow
    proxy: each read sees progress, so only a total deadline ends the wait);
    ``garbage`` answers what the spec never says, without handling the request: ``variant`` ``html``
    (a login proxy's 200 HTML page), ``not_json`` (a 200 JSON content type with a cut-off body),
    ``deep`` (a 200 of well-formed JSON nested ``DEEP_NESTING`` brackets deep, deeper than any parser
    recurses) or ``types`` (the right envelope with wrong JSON types inside; what that means is the
    simulator's).
    """

    route: str
    kind: str
    remaining: int
    status: int = 503
    html: bool = False
    retry_after: int | None = None
    delay: float = 0.0
    variant: str = "html"
    message: str | None = None  # the error text a ``status`` fault answers with (e.g. one quoting a key)
    # A ``status`` fault's message may quote the request: ``{echo}`` in it becomes this request header's
    # value (a proxy or plugin that echoes what it was sent, credentials included).
    echo_header: str | None = None


GARBAGE_VARIANTS = ("html", "not_json", "deep", "types")
DEEP_NESTING = 100_000
LOGIN_PAGE = (b"<!DOCTYPE html><html><head><title>Sign in</title></head><body><form action=\"/login\">"
              b"<input name=\"user\"></form></body></html>\n")


class FaultBook:
    """Faults and latency keyed by route name; ``*`` matches every route. Not thread-safe alone."""

    KINDS = ("status", "drop", "late", "trickle", "garbage")

    def __init__(self) -> None:
        self.faults: list[Fault] = []
        self.latency: dict[str, float] = {}
        # Seeded random faults: route -> (probability, fault templates, generator). Armed faults go first.
        self.chaos: dict[str, tuple[float, list[Fault], random.Random]] = {}

    def arm_chaos(self, route: str, probability: float, templates: list[Fault], seed: int) -> None:
        if not 0 <= probability <= 1 or not templates:
            raise ValueError("chaos needs a probability in 0..1 and at least one fault")
        for template in templates:
            self._check(template)
        self.chaos[route] = (probability, templates, random.Random(seed))

    def arm(self, fault: Fault) -> None:
        self._check(fault)
        self.faults.append(fault)

    def _check(self, fault: Fault) -> None:
        if fault.kind not in self.KINDS:
            raise ValueError(f"unknown fault kind {fault.kind!r}")
        if fault.remaining < 1:
            raise ValueError("a fault needs a count of at least 1")
        if fault.kind == "garbage" and fault.variant not in GARBAGE_VARIANTS:
            raise ValueError(f"unknown garbage variant {fault.variant!r}; one of {', '.join(GARBAGE_VARIANTS)}")

    def take(self, route: str) -> Fault | None:
        for fault in self.faults:
            if fault.route in (route, "*"):
                fault.remaining -= 1
                if fault.remaining == 0:
                    self.faults.remove(fault)
                return fault
        chaos = self.chaos.get(route) or self.chaos.get("*")
        if chaos is not None:
            probability, templates, rng = chaos
            if rng.random() < probability:
                return dataclasses.replace(rng.choice(templates), route=route, remaining=1)
        return None

    def delay_for(self, route: str) -> float:
        return self.latency.get(route, self.latency.get("*", 0.0))

    def clear(self) -> None:
        self.faults.clear()
        self.latency.clear()
        self.chaos.clear()


async def read_body(receive: Receive) -> bytes:
    """The whole request body of an ASGI request cycle."""
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def drop_connection(send: Send) -> bool:
    """Close the client connection without a response, as a lost reply looks on the wire.

    ASGI has no verb for this; uvicorn's request cycle owns the transport, reached through the
    bound ``send`` method. Returns False if the server is not uvicorn (then the caller answers 502).
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        return False
    transport.abort()
    return True


class SimApp:
    """Base ASGI app: parse, count, apply latency and faults, dispatch to ``handle``, send.

    Subclasses implement ``route_of`` (a stable route name for counting and faults),
    ``handle`` (runs under the state lock, returns a Response) and ``fault_response``.
    Control routes live under ``/_sim/`` and are served as JSON.
    """

    http_parser = "httptools"

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.faults = FaultBook()
        self.counts: collections.Counter[str] = collections.Counter()
        self.log: collections.deque[tuple[float, str, int, dict[str, str]]] = collections.deque(
            maxlen=100_000
        )

    # -- hooks -------------------------------------------------------------------------------
    def route_of(self, req: Request) -> str:
        raise NotImplementedError

    def handle(self, req: Request, route: str) -> Response:
        raise NotImplementedError

    def fault_response(self, fault: Fault) -> Response:
        raise NotImplementedError

    def garbage_response(self, fault: Fault, route: str) -> Response:
        """What a ``garbage`` fault answers; subclasses add their ``types`` variant."""
        if fault.variant == "not_json":
            return Response(200, b'{"result": {"truncat', [(b"content-type", b"application/json")])
        if fault.variant == "deep":
            return Response(200, b'{"result": ' + b"[" * DEEP_NESTING + b"]" * DEEP_NESTING + b"}",
                            [(b"content-type", b"application/json")])
        return Response(200, LOGIN_PAGE, [(b"content-type", b"text/html; charset=utf-8")])

    def control(self, op: str, args: dict[str, Any]) -> Any:
        raise NotImplementedError

    def snapshot(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- fault injection, shared -------------------------------------------------------------
    def set_latency(self, seconds: float, route: str = "*") -> None:
        with self.lock:
            self.faults.latency[route] = float(seconds)

    def fail_next(
        self, route: str, count: int = 1, status: int = 503, html: bool = False,
        retry_after: int | None = None, message: str | None = None,
    ) -> None:
        with self.lock:
            self.faults.arm(Fault(route, "status", count, status=status, html=html, retry_after=retry_after,
                                  message=message))

    def drop_next(self, route: str, count: int = 1) -> None:
        with self.lock:
            self.faults.arm(Fault(route, "drop", count))

    def late_next(self, route: str, delay: float, count: int = 1) -> None:
        with self.lock:
            self.faults.arm(Fault(route, "late", count, delay=delay))

    def trickle_next(self, route: str, interval: float, count: int = 1) -> None:
        """Handle the next request(s) and send the answer body one byte every ``interval`` seconds."""
        with self.lock:
            self.faults.arm(Fault(route, "trickle", count, delay=interval))

    def garbage_next(self, route: str, variant: str = "html", count: int = 1) -> None:
        """Answer the next request(s) with garbage (see ``Fault``); nothing takes effect."""
        with self.lock:
            self.faults.arm(Fault(route, "garbage", count, variant=variant))

    def chaos(self, route: str, probability: float, faults: list[dict[str, Any]], seed: int = 0) -> None:
        """From now on, each request on ``route`` (``*``: any) meets, with ``probability``, one of
        ``faults`` (each the keywords of a ``Fault``: ``kind`` and e.g. ``status``, ``delay``,
        ``variant``), drawn from a generator seeded with ``seed`` so a failing run can be replayed."""
        templates = [Fault(route=route, remaining=1, **f) for f in faults]
        with self.lock:
            self.faults.arm_chaos(route, probability, templates, seed)

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def request_counts(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)

    def requests_of(self, route: str) -> list[tuple[float, int, dict[str, str]]]:
        with self.lock:
            return [(t, s, h) for (t, r, s, h) in self.log if r == route]

    # -- ASGI ---------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        raw_qs = scope.get("query_string", b"").decode("latin-1")
        # The server decoded the path once (as Vault's and Cloudflare's servers do); never again.
        req = Request(
            scope["method"], scope["path"], dict(parse_qsl(raw_qs, keep_blank_values=True)),
            headers, body,
        )
        if req.path.startswith("/_sim/"):
            await self._send(send, self._control(req))
            return
        route = self.route_of(req)
        with self.lock:
            self.counts[route] += 1
            fault = self.faults.take(route)
            delay = self.faults.delay_for(route)
        if delay:
            await asyncio.sleep(delay)
        if fault is not None and fault.kind == "status":
            if fault.echo_header and fault.message:
                fault = dataclasses.replace(fault, message=fault.message.replace(
                    "{echo}", headers.get(fault.echo_header.lower(), "")))
            resp = self.fault_response(fault)
        elif fault is not None and fault.kind == "garbage":
            resp = self.garbage_response(fault, route)
        else:
            with self.lock:
                resp = self.handle(req, route)
        with self.lock:
            self.log.append((time.time(), route, resp.status, _trace_headers(headers)))
        if fault is not None and fault.kind == "late":
            await asyncio.sleep(fault.delay)
        if fault is not None and fault.kind == "drop" and drop_connection(send):
            return
        if fault is not None and fault.kind == "trickle":
            await self._trickle(send, resp, fault.delay)
            return
        await self._send(send, resp)

    @staticmethod
    async def _trickle(send: Send, resp: Response, interval: float) -> None:
        headers = [*resp.headers, (b"content-length", str(len(resp.body)).encode())]
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        for i in range(len(resp.body)):  # bounded by the body's length
            if getattr(getattr(send, "__self__", None), "disconnected", False):
                return  # the client gave up: stop at once, so the server can shut down
            await send({"type": "http.response.body", "body": resp.body[i:i + 1], "more_body": True})
            await asyncio.sleep(interval)
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    async def _send(send: Send, resp: Response) -> None:
        headers = [*resp.headers, (b"content-length", str(len(resp.body)).encode())]
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        await send({"type": "http.response.body", "body": resp.body})

    def _control(self, req: Request) -> Response:
        try:
            if req.path == "/_sim/state" and req.method == "GET":
                result: Any = self.snapshot()
            elif req.path == "/_sim/control" and req.method == "POST":
                payload = req.json()
                args = {k: v for k, v in payload.items() if k != "op"}
                result = self.control(str(payload.get("op")), args)
            else:
                return _json_response(404, {"error": "unknown control route"})
        except (ValueError, TypeError, KeyError) as exc:
            return _json_response(400, {"error": str(exc)})
        return _json_response(200, {"ok": True, "result": result})

    def _shared_control(self, op: str, args: dict[str, Any]) -> Any:
        """The fault verbs both simulators accept over HTTP."""
        verbs: dict[str, Callable[..., Any]] = {
            "set_latency": self.set_latency,
            "fail_next": self.fail_next,
            "drop_next": self.drop_next,
            "late_next": self.late_next,
            "trickle_next": self.trickle_next,
            "garbage_next": self.garbage_next,
            "chaos": self.chaos,
            "clear_faults": self.clear_faults,
            "request_counts": self.request_counts,
        }
        if op not in verbs:
            raise ValueError(f"unknown control op {op!r}")
        return verbs[op](**args)


def _trace_headers(headers: dict[str, str]) -> dict[str, str]:
    keep = ("x-stainless-retry-count", "x-vault-namespace")
    return {k: headers[k] for k in keep if k in headers}


def _json_response(status: int, obj: Any) -> Response:
    return Response(status, json.dumps(obj).encode(), [(b"content-type", b"application/json")])


@contextlib.contextmanager
def serve(app: Any, *, certfile: str | None = None, keyfile: str | None = None) -> Iterator[ServerThread]:
    """Serve a simulator on a free loopback port (HTTPS with ``certfile`` and ``keyfile``), stopped after."""
    tls = (certfile, keyfile) if certfile and keyfile else None
    server = ServerThread(app, name=type(app).__name__, tls=tls).start()
    try:
        yield server
    finally:
        server.stop()
