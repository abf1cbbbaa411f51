"""A simulated far-end device: a webhook receiver (docs/design.md section 9) that holds a key per tunnel.

It checks each request's signature and replay window with the same ``WebhookReceiver`` users get,
then acts on every tunnel of the batch: ``deliver`` and ``rollback`` make it hold ``psk``; ``verify``
answers ok when it holds ``psk`` and, if a ``peer`` is given (e.g. the Cloudflare simulator's key for
the tunnel), when the peer holds the same key too: a fresh IKE authentication would succeed.

Fault injection: refuse keys for some tunnels, fail their verification, hang (no answer for a
while, then act), act and answer late, drop the connection, trickle, or answer garbage (the shared simulator
base), act and then answer garbage, answer 5xx; ``verify_latency`` seconds per verified tunnel (tunnels of
one request are verified one after another; requests overlap). ``held`` shows the key a tunnel
holds, for invariant checks; the HTTP snapshot shows only fingerprints. Route names for counts and
faults: ``device.deliver``, ``device.verify``, ``device.rollback``, ``device.other``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from rotator.adapters.devices.webhook import SignatureError, WebhookReceiver
from rotator.sim.base import Fault, Receive, Request, Response, Scope, Send, ServerThread, SimApp, read_body

JSON_CT = (b"content-type", b"application/json")
ACTIONS = ("deliver", "verify", "rollback")
PATH = "/psk"


@dataclass(slots=True)
class Call:
    action: str
    account_id: str
    rotation_id: str
    tunnel_ids: list[str]


class DeviceSim(SimApp):
    def __init__(self, secret: str | None = None, *, name: str = "sim-device",
                 peer: Callable[[str, str], str | None] | None = None, window: float = 300.0) -> None:
        super().__init__()
        self.name = name
        self.secret = secret or secrets.token_hex(32)
        self.receiver = WebhookReceiver(self.secret, window)
        self.peer = peer
        self.keys: dict[tuple[str, str], str] = {}
        self.calls: list[Call] = []
        self.refused: dict[str, set[str]] = {}  # tunnel id -> actions refused
        self.failing_verify: set[str] = set()
        self.verify_latency = 0.0
        self._hangs: list[list[Any]] = []  # [action or None, seconds, remaining]
        self._garbage: list[list[Any]] = []  # [action or None, remaining]

    # -- inspection ---------------------------------------------------------------------------
    def held(self, account_id: str, tunnel_id: str) -> str | None:
        with self.lock:
            return self.keys.get((account_id, tunnel_id))

    def keys_of(self, account_id: str) -> dict[str, str]:
        with self.lock:
            return {tid: key for (acc, tid), key in self.keys.items() if acc == account_id}

    def calls_of(self, action: str) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.action == action]

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "name": self.name, "request_counts": dict(self.counts), "verify_latency": self.verify_latency,
                "tunnels": {f"{acc}/{tid}": hashlib.sha256(key.encode()).hexdigest()[:12]
                            for (acc, tid), key in self.keys.items()},
                "refused": {tid: sorted(a) for tid, a in self.refused.items()},
                "failing_verify": sorted(self.failing_verify),
            }

    # -- faults ---------------------------------------------------------------------------------
    def refuse(self, tunnel_ids: list[str], actions: tuple[str, ...] = ("deliver",)) -> None:
        """Answer ``ok: false`` for these tunnels (and keep the key they held)."""
        with self.lock:
            for tid in tunnel_ids:
                self.refused.setdefault(tid, set()).update(actions)

    def fail_verify(self, tunnel_ids: list[str]) -> None:
        with self.lock:
            self.failing_verify.update(tunnel_ids)

    def hang_next(self, seconds: float, count: int = 1, action: str | None = None) -> None:
        """The next ``count`` requests (of ``action``, or any) get no answer for ``seconds``; then the
        device acts on them anyway, as a slow device does after its caller gave up."""
        with self.lock:
            self._hangs.append([action, float(seconds), int(count)])

    def answer_garbage(self, count: int = 1, action: str | None = None) -> None:
        """The next ``count`` requests are acted on and answered with a 200 that is not JSON (the
        shared ``garbage_next`` answers garbage without acting)."""
        with self.lock:
            self._garbage.append([action, int(count)])

    def set_verify_latency(self, seconds: float) -> None:
        with self.lock:
            self.verify_latency = float(seconds)

    def clear(self) -> None:
        with self.lock:
            self.refused.clear()
            self.failing_verify.clear()
            self._hangs.clear()
            self._garbage.clear()
            self.verify_latency = 0.0
            self.faults.clear()

    def control(self, op: str, args: dict[str, Any]) -> Any:
        own: dict[str, Callable[..., Any]] = {
            "refuse": lambda tunnel_ids, actions=("deliver",): self.refuse(tunnel_ids, tuple(actions)),
            "fail_verify": self.fail_verify, "hang_next": self.hang_next, "answer_garbage": self.answer_garbage,
            "set_verify_latency": self.set_verify_latency, "clear": self.clear,
        }
        if op in own:
            return own[op](**args)
        return self._shared_control(op, args)

    @staticmethod
    def _take(book: list[list[Any]], action: str) -> list[Any] | None:
        for entry in book:
            if entry[0] in (None, action):
                entry[-1] -= 1
                if entry[-1] <= 0:
                    book.remove(entry)
                return entry
        return None

    # -- HTTP -------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read the body first, to spend the hang and the per-tunnel verification time without
        holding the state lock, then hand the request to the shared request cycle."""
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        action, n = _peek(body)
        with self.lock:
            hang = self._take(self._hangs, action) if action else None
            delay = self.verify_latency * n if action == "verify" else 0.0
        if hang is not None:
            delay += hang[1]
        if delay:
            await asyncio.sleep(delay)

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        await super().__call__(scope, replay, send)

    def route_of(self, req: Request) -> str:
        action, _ = _peek(req.body)
        return f"device.{action}" if req.method == "POST" and req.path == PATH and action else "device.other"

    def fault_response(self, fault: Fault) -> Response:
        return Response(fault.status, json.dumps({"error": "simulated device failure"}).encode(), [JSON_CT])

    def handle(self, req: Request, route: str) -> Response:
        if route == "device.other":
            return _error(404, "POST the rotator's JSON to " + PATH)
        try:
            self.receiver.check(req.headers, req.body)
        except SignatureError as exc:
            return _error(401, str(exc))
        doc = req.json()
        action = doc["action"]
        tunnels = doc.get("tunnels")
        if doc.get("version") != 1 or not isinstance(tunnels, list) or not all(
                isinstance(t, dict) and isinstance(t.get("tunnel_id"), str) and isinstance(t.get("psk"), str)
                for t in tunnels):
            return _error(400, "malformed request")
        account = str(doc.get("account_id"))
        self.calls.append(Call(action, account, str(doc.get("rotation_id")), [t["tunnel_id"] for t in tunnels]))
        results = {t["tunnel_id"]: self._act(action, account, t["tunnel_id"], t["psk"]) for t in tunnels}
        if self._take(self._garbage, action) is not None:
            return Response(200, b"<html><body>Internal error, see log</body></html>", [(b"content-type",
                                                                                          b"text/html")])
        return Response(200, json.dumps({"results": results}).encode(), [JSON_CT])

    def _act(self, action: str, account: str, tunnel_id: str, psk: str) -> dict[str, Any]:
        if action in self.refused.get(tunnel_id, ()):
            return {"ok": False, "reason": f"{self.name} refused the key"}
        if action == "verify":
            if tunnel_id in self.failing_verify:
                return {"ok": False, "reason": "IKE_AUTH failed: AUTHENTICATION_FAILED"}
            if self.keys.get((account, tunnel_id)) != psk:
                return {"ok": False, "reason": "the device does not hold this key"}
            if self.peer is not None and self.peer(account, tunnel_id) != psk:
                return {"ok": False, "reason": "IKE_AUTH failed: the peer holds another key"}
            return {"ok": True}
        self.keys[(account, tunnel_id)] = psk
        return {"ok": True}


def _peek(body: bytes) -> tuple[str | None, int]:
    """The action and the number of tunnels of a request body, if it is one."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None, 0
    if not isinstance(doc, dict) or doc.get("action") not in ACTIONS:
        return None, 0
    tunnels = doc.get("tunnels")
    return str(doc["action"]), len(tunnels) if isinstance(tunnels, list) else 0


def _error(status: int, message: str) -> Response:
    return Response(status, json.dumps({"error": message}).encode(), [JSON_CT])


@contextlib.contextmanager
def serve(sim: DeviceSim) -> Iterator[str]:
    """Serve ``sim`` on a free loopback port; yields the webhook URL."""
    server = ServerThread(sim).start()
    try:
        yield server.url + PATH
    finally:
        server.stop()


def config_block(name: str, url: str, secret_file: str, tunnels: tuple[str, ...] = ("*",),
                 timeout: str = "10s") -> str:
    """A ``[[devices]]`` block pointing a rotator at a simulated device (for the demo and tests)."""
    listed = ", ".join(json.dumps(t) for t in tunnels)
    return (f'[[devices]]\nname = {json.dumps(name)}\nkind = "webhook"\ntunnels = [{listed}]\n'
            f'timeout = "{timeout}"\nurl = {json.dumps(url)}\nsecret_file = {json.dumps(secret_file)}\n')


@dataclass
class RunningDevice:
    """A simulated device served in the background, with its signing key in a file (see ``start``)."""

    sim: DeviceSim
    server: ServerThread
    secret_file: str

    @property
    def url(self) -> str:
        return self.server.url + PATH

    def config(self, name: str = "sim-device", tunnels: tuple[str, ...] = ("*",), timeout: str = "10s") -> str:
        return config_block(name, self.url, self.secret_file, tunnels, timeout)

    def stop(self) -> None:
        self.server.stop()


def start(workdir: str, *, peer: Callable[[str, str], str | None] | None = None,
          verify_latency: float = 0.0) -> RunningDevice:
    """Serve a simulated device on loopback and write its signing key to ``workdir`` (mode 0600).
    For ``rotator demo``: ``dev = start(workdir, peer=sims.cloudflare.psk_of)``, add ``dev.config()``
    to the config file, ``dev.stop()`` at the end."""
    sim = DeviceSim(peer=peer)
    sim.set_verify_latency(verify_latency)
    secret_file = os.path.join(workdir, "sim-device.key")
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(sim.secret)
    return RunningDevice(sim, ServerThread(sim).start(), secret_file)
