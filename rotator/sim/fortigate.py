"""A simulated FortiGate: the FortiOS REST API for IPsec phase-1 interfaces, their pre-shared keys and
the IPsec monitor.

The facts it follows, from the vendor's documentation (FortiOS REST API reference on the Fortinet
Developer Network, "FortiOS REST API" in the FortiOS Administration Guide,
https://docs.fortinet.com/document/fortigate/7.4.0/administration-guide/940602/using-apis, and the CLI
reference for ``config vpn ipsec phase1-interface``):
- requests carry an API token as ``Authorization: Bearer <token>`` (a REST API admin); no or a wrong
  token is HTTP 401, a token whose profile may not write is HTTP 403;
- ``/api/v2/cmdb/vpn.ipsec/phase1-interface/{name}``: GET answers the object in ``results``, PUT
  changes it at once (no candidate, no commit); answers are the JSON envelope ``{"http_method",
  "status": "success"|"error", "http_status", "results", "vdom", "path", "name", "mkey", "serial",
  "version", "build"}``; a missing object is HTTP 404; a refused value HTTP 500 with a negative
  ``error`` code (-651: invalid value) and the CLI's text; a failed dependency HTTP 424;
- ``psksecret`` is never returned: a GET shows ``ENC`` and a salted encrypted value (a new one at
  each read), so the API cannot tell whether the device holds a given key;
- ``/api/v2/monitor/vpn/ipsec``: one entry per phase 1 (``name``, ``rgwy``, ``creation_time`` in
  seconds since it came up, ``proxyid[]`` with ``p2name`` and ``status`` up/down);
  ``/api/v2/monitor/vpn/ipsec/tunnel_down`` and ``tunnel_up`` (POST ``{"p1name", "p2name"}``) take a
  tunnel down and bring it up again (a fresh IKE negotiation).

What it adds for tests: each phase 1 is bound to a Cloudflare tunnel; a tunnel comes up (after a PUT
of its key, or ``tunnel_up``) only while its key equals the key ``peer(account, tunnel)`` says
Cloudflare holds: changing the key renegotiates, as a phase-1 change does on FortiOS. Faults: the
shared ones by route (``fortigate.get``, ``fortigate.put``, ``fortigate.monitor``, ``fortigate.down``,
``fortigate.up``, ``fortigate.other``), ``refuse_key`` (a PUT answered 500/-651 with a text that may
quote the key), ``never_reauth``. ``scan_secrets()`` lists every key and the token, for the secret scan.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from rotator.sim.base import Fault, Request, Response, SimApp
from rotator.sim.base import serve as serve  # the shared loopback server, HTTPS in the tests

JSON_CT = (b"content-type", b"application/json")
PHASE1 = re.compile(r"^/api/v2/cmdb/vpn\.ipsec/phase1-interface/([^/]+)/?$")
MONITOR = "/api/v2/monitor/vpn/ipsec"
SERIAL, VERSION, BUILD = "FGVM02TM00000001", "v7.4.3", 2573


@dataclass
class Phase1:
    name: str
    account_id: str
    tunnel_id: str
    remote_gw: str
    psk: str | None
    up_since: float | None
    p2serial: int = 1


class FortigateSim(SimApp):
    def __init__(self, *, peer: Callable[[str, str], str | None] | None = None, token: str | None = None,
                 read_only_token: str | None = None) -> None:
        super().__init__()
        self.peer = peer
        self.token = token or secrets.token_hex(15)
        self.read_only_token = read_only_token or secrets.token_hex(15)
        self.salt_key = secrets.token_bytes(32)
        self.tunnels: dict[str, Phase1] = {}
        self.puts = 0
        self._refused: dict[str, str] = {}
        self._never: set[str] = set()

    # -- set-up and inspection ----------------------------------------------------------------
    def add_tunnel(self, name: str, account_id: str, tunnel_id: str, key: str | None, *,
                   remote_gw: str = "162.159.66.164") -> None:
        with self.lock:
            self.tunnels[name] = Phase1(name, account_id, tunnel_id, remote_gw, key, time.monotonic())

    def held(self, account_id: str, tunnel_id: str) -> str | None:
        with self.lock:
            return next((p.psk for p in self.tunnels.values()
                         if (p.account_id, p.tunnel_id) == (account_id, tunnel_id)), None)

    def key_of(self, name: str) -> str | None:
        with self.lock:
            p = self.tunnels.get(name)
            return p.psk if p else None

    def scan_secrets(self) -> set[str]:
        with self.lock:
            return {p.psk for p in self.tunnels.values() if p.psk} | {self.token, self.read_only_token}

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"request_counts": dict(self.counts), "puts": self.puts,
                    "tunnels": {n: p.up_since is not None for n, p in self.tunnels.items()}}

    # -- faults -------------------------------------------------------------------------------
    def refuse_key(self, name: str, text: str) -> None:
        """The next PUT of this phase 1's key answers HTTP 500, error -651, with ``text`` (``{key}``: the key sent)."""
        with self.lock:
            self._refused[name] = text

    def never_reauth(self, names: list[str]) -> None:
        with self.lock:
            self._never.update(names)

    def clear(self) -> None:
        """Lift every armed fault (the tunnels' keys stay)."""
        with self.lock:
            self._refused.clear()
            self._never.clear()
            self.faults.clear()

    def control(self, op: str, args: dict[str, Any]) -> Any:
        own: dict[str, Callable[..., Any]] = {"refuse_key": self.refuse_key, "never_reauth": self.never_reauth,
                                              "clear": self.clear}
        if op in own:
            return own[op](**args)
        return self._shared_control(op, args)

    # -- HTTP ---------------------------------------------------------------------------------
    def route_of(self, req: Request) -> str:
        if PHASE1.match(req.path):
            return {"GET": "fortigate.get", "PUT": "fortigate.put"}.get(req.method, "fortigate.other")
        if req.path.rstrip("/") == MONITOR and req.method == "GET":
            return "fortigate.monitor"
        if req.path == MONITOR + "/tunnel_down" and req.method == "POST":
            return "fortigate.down"
        if req.path == MONITOR + "/tunnel_up" and req.method == "POST":
            return "fortigate.up"
        return "fortigate.other"

    def fault_response(self, fault: Fault) -> Response:
        return Response(fault.status, b"<html><body>" + (fault.message or "Service Unavailable").encode()
                        + b"</body></html>", [(b"content-type", b"text/html")])

    def handle(self, req: Request, route: str) -> Response:
        self._advance()
        token = req.headers.get("authorization", "").removeprefix("Bearer ").strip()
        write = hmac.compare_digest(token.encode(), self.token.encode())
        if not write and not hmac.compare_digest(token.encode(), self.read_only_token.encode()):
            return Response(401, b"", [JSON_CT])  # FortiOS answers a bad token with an empty 401
        vdom = req.query.get("vdom", "root")
        if vdom != "root":
            return _envelope(req.method, 404, vdom=vdom, error=-3)
        if route in ("fortigate.get", "fortigate.put"):
            m = PHASE1.match(req.path)
            assert m is not None
            name = unquote(m.group(1))
            tunnel = self.tunnels.get(name)
            extra = {"path": "vpn.ipsec", "name": "phase1-interface", "mkey": name}
            if tunnel is None:
                return _envelope(req.method, 404, **extra)
            if route == "fortigate.get":
                return _envelope("GET", 200, results=[self._view(tunnel)], **extra)
            if not write:
                return _envelope("PUT", 403, **extra)
            try:
                body = req.json()
            except ValueError:
                return _envelope("PUT", 400, error=-1, **extra)
            psk = body.get("psksecret") if isinstance(body, dict) else None
            if not isinstance(psk, str):
                return _envelope("PUT", 500, error=-651, cli_error="psksecret: a string is required", **extra)
            if name in self._refused:
                return _envelope("PUT", 500, error=-651, cli_error=self._refused.pop(name).replace("{key}", psk),
                                 **extra)
            if not 6 <= len(psk) <= 128:
                return _envelope("PUT", 500, error=-651, cli_error="psksecret: the length must be 6-128", **extra)
            tunnel.psk = psk
            self.puts += 1
            self._renegotiate(tunnel)  # a phase-1 change flushes the tunnel
            return _envelope("PUT", 200, revision=secrets.token_hex(16), **extra)
        if route == "fortigate.monitor":
            return _envelope("GET", 200, path="vpn", name="ipsec",
                             results=[self._monitor(p) for p in self.tunnels.values()])
        if route in ("fortigate.down", "fortigate.up"):
            if not write:
                return _envelope("POST", 403, path="vpn", name="ipsec")
            try:
                body = req.json()
            except ValueError:
                body = None
            p1 = body.get("p1name") if isinstance(body, dict) else None
            tunnel = self.tunnels.get(p1) if isinstance(p1, str) else None
            if tunnel is None:
                return _envelope("POST", 424, error=-5, path="vpn", name="ipsec")
            if route == "fortigate.down":
                tunnel.up_since = None
            else:
                self._renegotiate(tunnel)
            return _envelope("POST", 200, path="vpn", name="ipsec", results={})
        return _envelope(req.method, 404)

    def _renegotiate(self, tunnel: Phase1) -> None:
        theirs = self.peer(tunnel.account_id, tunnel.tunnel_id) if self.peer else tunnel.psk
        if tunnel.name not in self._never and tunnel.psk is not None and theirs == tunnel.psk:
            tunnel.up_since = time.monotonic()
            tunnel.p2serial += 1
        else:
            tunnel.up_since = None

    def _advance(self) -> None:
        """A tunnel that is down retries its negotiation (auto-negotiate): it comes up once the keys match."""
        for tunnel in self.tunnels.values():
            if tunnel.up_since is None:
                self._renegotiate(tunnel)

    def _view(self, tunnel: Phase1) -> dict[str, Any]:
        salt = secrets.token_bytes(8)
        mac = hmac.new(self.salt_key, salt + (tunnel.psk or "").encode(), "sha256").digest()
        return {"name": tunnel.name, "q_origin_key": tunnel.name, "type": "static", "interface": "wan1",
                "ike-version": "2", "remote-gw": tunnel.remote_gw, "local-gw": "0.0.0.0",
                "authmethod": "psk", "psksecret": "ENC " + base64.b64encode(salt + mac).decode(),
                "auto-negotiate": "enable", "dpd": "on-idle", "nattraversal": "disable"}

    def _monitor(self, tunnel: Phase1) -> dict[str, Any]:
        up = tunnel.up_since is not None
        entry: dict[str, Any] = {
            "name": tunnel.name, "comments": "", "wizard-type": "custom", "type": "automatic",
            "incoming_bytes": 0, "outgoing_bytes": 0, "rgwy": tunnel.remote_gw, "tun_id": tunnel.remote_gw,
            "proxyid": [{"proxy_src": [{"subnet": "0.0.0.0/0.0.0.0", "port": 0, "protocol": 0, "protocol_name": ""}],
                         "proxy_dst": [{"subnet": "0.0.0.0/0.0.0.0", "port": 0, "protocol": 0, "protocol_name": ""}],
                         "status": "up" if up else "down", "p2name": tunnel.name, "p2serial": tunnel.p2serial,
                         "expire": 3600, "incoming_bytes": 0, "outgoing_bytes": 0}],
        }
        if up and tunnel.up_since is not None:
            entry["creation_time"] = int(time.monotonic() - tunnel.up_since)
            entry["connection_count"] = 1
        return entry


def _envelope(method: str, status: int, **fields: Any) -> Response:
    doc = {"http_method": method, "status": "success" if status == 200 else "error", "http_status": status,
           "vdom": fields.pop("vdom", "root"), **fields, "serial": SERIAL, "version": VERSION, "build": BUILD}
    return Response(status, json.dumps(doc).encode(), [JSON_CT])
