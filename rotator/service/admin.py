"""The admin HTTP app (Starlette): metrics, health, readiness, status and the on-demand trigger.

``/v1/*`` needs ``Authorization: Bearer <token>``, compared in constant time. No response ever
carries a key: status and run views are built from outcomes and record states only.
"""

from __future__ import annotations

import hmac
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rotator import wire
from rotator.errors import ConfigError
from rotator.secret import Secret
from rotator.service.runs import QueueFull

MAX_BODY = 64 * 1024  # a request names an account and some tunnels: far below this


class BodyTooLarge(Exception):
    pass


async def read_json(request: Request, limit: int = MAX_BODY) -> Any:
    """The request's JSON body, read at most ``limit`` bytes far (BodyTooLarge past that, without
    reading the rest); ``wire.NotJson`` (a ValueError) for anything unreadable, deep nesting included."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge
    return wire.loads(bytes(body))


class Control(Protocol):
    def ready(self) -> tuple[bool, dict[str, Any]]: ...

    def status(self) -> dict[str, Any]: ...

    def trigger(self, account: str, tunnels: list[str] | None, dry_run: bool,
                kind: str = "rotate") -> tuple[str, bool]: ...

    def run_view(self, run_id: str) -> dict[str, Any] | None: ...

    def acknowledge(self, account: str, tunnels: list[str], holds: str | None,
                    rotation_id: str | None) -> tuple[dict[str, str | None], str | None]: ...


def build_app(control: Control, registry: CollectorRegistry, token: Secret | None) -> Starlette:
    expected = token.reveal().encode() if token is not None else None

    def authorized(request: Request) -> bool:
        if expected is None:
            return False
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected)

    def denied() -> JSONResponse:
        return JSONResponse({"error": "unauthorized: send Authorization: Bearer <admin token>"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> JSONResponse:
        ok, detail = control.ready()
        return JSONResponse({"ready": ok, **detail}, status_code=200 if ok else 503)

    async def status(request: Request) -> JSONResponse:
        if not authorized(request):
            return denied()
        return JSONResponse(control.status())

    async def body_of(request: Request, usage: str) -> dict[str, Any] | JSONResponse:
        """An authorized request's JSON object naming an ``account``, or the answer that refuses it."""
        if not authorized(request):
            return denied()
        try:
            body = await read_json(request)
        except BodyTooLarge:
            return JSONResponse({"error": f"body over {MAX_BODY // 1024} KiB: send an account and its tunnels"},
                                status_code=413)
        except ValueError:
            return JSONResponse({"error": "body must be JSON"}, status_code=400)
        if not isinstance(body, dict) or not isinstance(body.get("account"), str):
            return JSONResponse({"error": usage}, status_code=400)
        return body

    async def trigger(request: Request) -> JSONResponse:
        body = await body_of(request, "give an account and tunnels: [...], all: true or reconcile: true")
        if isinstance(body, JSONResponse):
            return body
        for flag in ("all", "dry_run", "reconcile", "rollback", "due"):
            if flag in body and not isinstance(body[flag], bool):
                return JSONResponse({"error": f"{flag} must be a JSON boolean (true or false)"}, status_code=400)
        tunnels = body.get("tunnels")
        every, reconcile, rollback = body.get("all", False), body.get("reconcile", False), body.get("rollback", False)
        named = isinstance(tunnels, list) and bool(tunnels) and all(isinstance(t, str) for t in tunnels)
        due = body.get("due", False)
        if reconcile and rollback:
            return JSONResponse({"error": "give reconcile: true or rollback: true, not both"}, status_code=400)
        if due:
            if tunnels is not None or every or reconcile or rollback:
                return JSONResponse({"error": "due: true takes no tunnels, all, reconcile or rollback: the "
                                              "schedule decides who is due"}, status_code=400)
        elif reconcile:
            if tunnels is not None or every:
                return JSONResponse({"error": "reconcile: true takes no tunnels or all: it settles every pending "
                                              "record of the account"}, status_code=400)
        elif rollback and not named:
            return JSONResponse({"error": "rollback: true needs tunnels: [ids or names]"}, status_code=400)
        elif every == named or (tunnels is not None and not named):
            return JSONResponse({"error": "give exactly one of tunnels: [ids or names] or all: true"}, status_code=400)
        kind = "due" if due else "reconcile" if reconcile else "rollback" if rollback else "rotate"
        try:
            run_id, deduplicated = await run_in_threadpool(
                control.trigger, body["account"], tunnels if named else None, body.get("dry_run", False), kind)
        except ConfigError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except QueueFull as exc:
            return JSONResponse({"error": f"too many runs waiting ({exc}); try again later"}, status_code=429,
                                headers={"Retry-After": str(exc.retry_after)})
        return JSONResponse({"id": run_id, "deduplicated": deduplicated, "href": f"/v1/rotations/{run_id}"},
                            status_code=202)

    async def acknowledge(request: Request) -> JSONResponse:
        """``rotator ack`` over HTTP (model.ack's rules): 202 with the reconcile run that finishes the
        acknowledged tunnels; 409, nothing recorded, with the current state and the exact command per
        tunnel when any acknowledgement is ambiguous or the record has moved on."""
        usage = ('give {"account": ID, "tunnels": [ids or names], "holds": "new" | "previous", '
                 '"rotation_id": ID (optional)}')
        body = await body_of(request, usage)
        if isinstance(body, JSONResponse):
            return body
        tunnels, holds, rotation = body.get("tunnels"), body.get("holds"), body.get("rotation_id")
        if not (isinstance(tunnels, list) and tunnels and all(isinstance(t, str) for t in tunnels)) \
                or holds not in (None, "new", "previous") or not isinstance(rotation, str | None):
            return JSONResponse({"error": usage}, status_code=400)
        try:
            answer, run_id = await run_in_threadpool(control.acknowledge, body["account"], tunnels, holds, rotation)
        except ConfigError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except QueueFull as exc:
            return JSONResponse({"error": f"acknowledged, but too many runs are waiting to finish it ({exc}); "
                                          "the next scheduled run does"}, status_code=429,
                                headers={"Retry-After": str(exc.retry_after)})
        refused = {tid: why for tid, why in answer.items() if why is not None}
        if refused:
            return JSONResponse({"error": "not acknowledged (nothing was recorded): " + "; ".join(refused.values()),
                                 "tunnels": refused}, status_code=409)
        return JSONResponse({"acknowledged": sorted(answer), "id": run_id,
                             "href": f"/v1/rotations/{run_id}" if run_id else None}, status_code=202)

    async def run_view(request: Request) -> JSONResponse:
        if not authorized(request):
            return denied()
        view = control.run_view(request.path_params["run_id"])
        if view is None:
            return JSONResponse({"error": "no such run"}, status_code=404)
        return JSONResponse(view)

    async def root(request: Request) -> JSONResponse:
        """What a person who opens the admin address finds: every route, what it does, whether it needs the token."""
        return JSONResponse({"service": "psk-rotator", "routes": [
            {"method": method, "path": path, "token": token, "what": what} for method, path, token, what in ROUTES]})

    return Starlette(routes=[
        Route("/", root), Route("/metrics", metrics), Route("/healthz", healthz), Route("/readyz", readyz),
        Route("/v1/status", status), Route("/v1/rotations", trigger, methods=["POST"]),
        Route("/v1/rotations/{run_id}", run_view), Route("/v1/acks", acknowledge, methods=["POST"]),
    ])


# (method, path, needs the bearer token, what it does): GET / lists these (README, "Admin API").
ROUTES = (
    ("GET", "/", False, "this list"),
    ("GET", "/metrics", False, "Prometheus exposition"),
    ("GET", "/healthz", False, "the process is alive"),
    ("GET", "/readyz", False, "Vault and Cloudflare usable, this replica's role; 503 with the reason otherwise"),
    ("GET", "/v1/status", True, "per account: leader, summary, per tunnel state (never a key)"),
    ("POST", "/v1/rotations", True, 'queue a run: {"account", "tunnels": [...] | "all": true | "reconcile": true '
                                    '| "rollback": true, "dry_run"} -> 202 {"id"}'),
    ("GET", "/v1/rotations/{run_id}", True, "a run's state and per-tunnel outcome"),
    ("POST", "/v1/acks", True, 'a manual device\'s acknowledgement: {"account", "tunnels": [...], "holds": "new" '
                                '| "previous", "rotation_id"} -> 202 with the reconcile run that finishes them'),
)
