"""The ``fortigate`` device kind: a FortiGate through the FortiOS REST API (docs/design.md section 10), with httpx.

Why httpx and not fortigate-api: fortigate-api is built on requests with a login session or a token
and per-request timeouts only; httpx is the project's HTTP client already, with the total-deadline
exchange the Cloudflare adapter uses, and the kind needs four endpoints.

deliver / rollback (tunnels concurrently): GET ``/api/v2/cmdb/vpn.ipsec/phase1-interface/{name}``
(the ``tunnel`` template, default ``cf-{tunnel_name}``; a missing one is refused, nothing sent), then
PUT ``{"psksecret": key}`` to it: FortiOS applies a cmdb change at once (no commit). What the API can
and cannot tell: it never returns a key (a GET shows ``ENC`` and a salted value, new at each read),
so a repeated deliver sends the key again; FortiOS renegotiates a phase 1 whose settings change, so a
deliver interrupts the tunnel (``INTERRUPTS``: the kit starts it only while its redundant partner is
up, and ``tunnels_up`` reads the monitor for that).

verify (tunnels concurrently): POST ``/api/v2/monitor/vpn/ipsec/tunnel_down`` and ``tunnel_up``
(``p1name``, ``p2name``) for the phase 1, then poll ``/api/v2/monitor/vpn/ipsec`` until a phase 2 of it
is ``up`` with a ``creation_time`` shorter than the time since the down: a fresh IKE negotiation,
which Cloudflare accepts only with the same key; ``verify_timeout`` bounds the wait.

The API token is read from ``token_file`` and sent as ``Authorization: Bearer`` (never in a URL).
Keys: 6-128 characters (FortiOS CLI reference, ``config vpn ipsec phase1-interface``, ``psksecret``:
"Pre-shared secret for PSK authentication (ASCII string or hexadecimal encoded with a leading 0x)"),
kept to A-Z a-z 0-9 and ``-_.+/=``, never starting with ``0`` (a leading ``0x`` would be read as hex).
"""

from __future__ import annotations

import json
import re
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import structlog

from rotator import wire
from rotator.adapters.devices._common import DeviceSpec, Fields, fill, one_line
from rotator.adapters.devices._vendor import (
    HttpsFirewall,
    Refused,
    Unclear,
    Unreached,
    parse_host,
    parse_tls,
    read_credential,
    wait_fresh,
)
from rotator.model import TunnelInfo
from rotator.rotation.ports import DeviceResult, DeviceStatus, DeviceTunnel, KeyRules
from rotator.secret import Secret

log = structlog.get_logger("rotator.devices.fortigate")

KIND = "fortigate"
INTERRUPTS = True  # a phase-1 change renegotiates the tunnel
PROOF = "ike_reauth"
EXTRA_COMMON_KEYS = ("verify_timeout",)
KEY_RULES = KeyRules(min_length=6, max_length=128, alphabet=string.ascii_letters + string.digits + "-_.+/=",
                     not_first="0", rule="FortiOS: 6-128 characters of A-Z a-z 0-9 - _ . + / =, not starting with 0")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,34}$")  # phase1-interface names: at most 35 characters
VDOM_RE = re.compile(r"^[A-Za-z0-9_-]{1,31}$")
DEFAULT_TUNNEL = "cf-{tunnel_name}"
MONITOR = "/api/v2/monitor/vpn/ipsec"


@dataclass(frozen=True)
class FortigateSettings:
    host: str
    port: int
    token: Secret
    token_file: str
    ca_file: str = ""
    verify_tls: bool = True
    tunnel: str = DEFAULT_TUNNEL
    vdom: str = "root"
    poll_interval: float = 2.0

    def masked(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "token_file": self.token_file,
                "ca_file": self.ca_file or "<system>", "verify_tls": self.verify_tls, "tunnel": self.tunnel,
                "vdom": self.vdom, "poll_interval": self.poll_interval}


def parse_settings(f: Fields) -> FortigateSettings:
    host = parse_host(f)
    port = f.integer("port", 443, 1, 65535)
    token, token_file = read_credential(f, "token_file", "API token",
                                        "write the token of a REST API admin into it (execute api-user generate-key)")
    ca_file, verify_tls = parse_tls(f)
    tunnel = f.template("tunnel", DEFAULT_TUNNEL)
    vdom = f.text("vdom", "root")
    if not VDOM_RE.match(vdom):
        raise f.fail("vdom", f"{vdom!r} is not a VDOM name", "give the VDOM of the tunnels, e.g. root")
    return FortigateSettings(host, port, token, token_file, ca_file, verify_tls, tunnel, vdom,
                             f.duration("poll_interval", "2s"))


def secrets(settings: FortigateSettings) -> list[Secret]:
    return [settings.token]


def build(spec: DeviceSpec) -> FortigateDevice:
    assert isinstance(spec.settings, FortigateSettings)
    return FortigateDevice.from_spec(spec)


class FortigateDevice(HttpsFirewall):
    """A FortiGate as a far end (rotation/ports.py, Device)."""

    kind = KIND
    interrupts = INTERRUPTS
    key_rules = KEY_RULES
    proof = PROOF
    product = "FortiGate"
    settings: FortigateSettings

    # -- one request ---------------------------------------------------------------------------
    def _request(self, method: str, path: str, end: float, body: Any = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.settings.token.reveal()}", "Accept": "application/json"}
        url = f"{self.base}{path}?vdom={quote(self.settings.vdom)}"
        kwargs: dict[str, Any] = {"content": json.dumps(body).encode()} if body is not None else {}
        if body is not None:
            headers["Content-Type"] = "application/json"
        answer = self.send(method, url, end, headers, **kwargs)
        if answer.status == 401:
            raise Unreached(f"the FortiGate at {self.where} refused the API token (HTTP 401): write a valid REST "
                            "API admin token to token_file (and allow this host in its trusthost)")
        try:
            doc = wire.loads(answer.body)
        except ValueError:  # wire.NotJson: malformed or nested too deeply
            doc = None
        envelope = isinstance(doc, dict) and doc.get("status") in ("success", "error")
        if answer.status == 403:
            raise Refused(f"the API token may not do this (HTTP 403): give the REST API admin's profile "
                          f"read-write access to VPN in VDOM {self.settings.vdom}")
        if not envelope:
            raise Unclear(f"unreadable answer from the FortiGate at {self.where} (HTTP {answer.status})")
        assert isinstance(doc, dict)
        code = doc.get("error")
        if answer.status == 200 and doc["status"] == "success":
            return doc
        if answer.status in (400, 404, 405, 424) or (answer.status == 500 and isinstance(code, int) and code < 0):
            detail = str(doc.get("cli_error") or "").strip()
            raise Refused(f"HTTP {answer.status}" + (f" error {code}" if code is not None else "")
                          + (f": {detail}" if detail else ""))
        raise Unclear(f"the FortiGate at {self.where} failed (HTTP {answer.status})")

    def _phase1_path(self, name: str) -> str:
        return f"/api/v2/cmdb/vpn.ipsec/phase1-interface/{quote(name, safe='')}"

    def _name(self, tunnel: DeviceTunnel) -> str | DeviceResult:
        name = fill(self.settings.tunnel, tunnel)
        if not NAME_RE.match(name):
            return DeviceResult(DeviceStatus.FAILED, f"{name[:80]!r} (tunnel template {self.settings.tunnel!r}) is "
                                "not a FortiOS phase1-interface name (at most 35 characters); set the tunnel template")
        return name

    def set_keys(self, action: str, tunnels: Sequence[DeviceTunnel], end: float, keys: list[str]
                 ) -> dict[str, DeviceResult]:

        def one(t: DeviceTunnel) -> DeviceResult:
            name = self._name(t)
            if isinstance(name, DeviceResult):
                return name
            broken = self.key_rules.refuses(t.psk.reveal())
            if broken:
                return DeviceResult(DeviceStatus.FAILED, f"not sent: the key breaks the rule {broken}")
            try:
                doc = self._request("GET", self._phase1_path(name), end)
            except Refused as exc:
                return DeviceResult(DeviceStatus.FAILED, one_line(
                    f"no phase1-interface {name} in VDOM {self.settings.vdom} ({exc}; tunnel template "
                    f"{self.settings.tunnel!r}); nothing was sent", keys))
            except (Unclear, Unreached) as exc:
                return DeviceResult(DeviceStatus.FAILED, one_line(f"{exc}; nothing was sent", keys))
            results = doc.get("results")
            entry = results[0] if isinstance(results, list) and results and isinstance(results[0], dict) else {}
            if entry.get("authmethod", "psk") != "psk":
                return DeviceResult(DeviceStatus.FAILED, f"phase1-interface {name} authenticates with "
                                    f"{str(entry.get('authmethod'))[:20]}, not a pre-shared key; nothing was sent")
            try:
                self._request("PUT", self._phase1_path(name), end, {"psksecret": t.psk.reveal()})
            except Refused as exc:
                return DeviceResult(DeviceStatus.FAILED, one_line(f"the FortiGate refused the key for {name}: {exc}",
                                                                  keys))
            except Unreached as exc:
                return DeviceResult(DeviceStatus.FAILED, one_line(f"{exc}; nothing was changed", keys))
            except Unclear as exc:
                return DeviceResult(DeviceStatus.UNKNOWN, one_line(f"setting the key on {name}: {exc}; the FortiGate "
                                                                   "may hold it", keys))
            return DeviceResult(DeviceStatus.OK)

        return self.each(tunnels, one)

    # -- verify: down, up, and a fresh phase 2 in the monitor ---------------------------------------
    def _monitor(self, end: float) -> dict[str, dict[str, Any]]:
        results = self._request("GET", MONITOR, end).get("results")
        if not isinstance(results, list):
            raise Unclear("the IPsec monitor answered no list of tunnels")
        return {str(e.get("name")): e for e in results if isinstance(e, dict)}

    @staticmethod
    def _fresh(entry: dict[str, Any] | None, elapsed: float) -> bool:
        if entry is None:
            return False
        age = entry.get("creation_time")
        up = any(isinstance(p, dict) and p.get("status") == "up" for p in entry.get("proxyid") or [])
        return up and isinstance(age, int | float) and not isinstance(age, bool) and age <= elapsed + 1.0

    def verify_one(self, t: DeviceTunnel, end: float, keys: list[str]) -> DeviceResult:
        name = self._name(t)
        if isinstance(name, DeviceResult):
            return name
        since = time.monotonic()
        try:
            entry = self._monitor(end).get(name)
            p2names = [str(p.get("p2name")) for p in (entry or {}).get("proxyid") or []
                       if isinstance(p, dict) and p.get("p2name")] or [name]
            for p2 in dict.fromkeys(p2names):
                self._request("POST", MONITOR + "/tunnel_down", end, {"p1name": name, "p2name": p2})
            for p2 in dict.fromkeys(p2names):
                self._request("POST", MONITOR + "/tunnel_up", end, {"p1name": name, "p2name": p2})
        except Refused as exc:
            return DeviceResult(DeviceStatus.FAILED, one_line(f"taking {name} down and up: {exc}", keys))
        except (Unclear, Unreached) as exc:
            return DeviceResult(DeviceStatus.UNKNOWN, one_line(f"taking {name} down and up: {exc}", keys))
        return wait_fresh(lambda: self._fresh(self._monitor(end).get(name), time.monotonic() - since), end,
                          self.settings.poll_interval, keys, what=f"bringing {name} down and up", since=since,
                          failure="no fresh phase 2")

    def tunnels_up(self, account_id: str, tunnels: Sequence[TunnelInfo], *, deadline: float) -> dict[str, bool]:
        """The monitor's view, for partner gating: a tunnel with a phase 2 up is up."""
        try:
            entries = self._monitor(min(deadline, time.monotonic() + self.timeout))
        except (Refused, Unclear, Unreached):
            return {}
        out: dict[str, bool] = {}
        for t in tunnels:
            shim = DeviceTunnel(t.id, t.name, Secret("-"), None, t.customer_endpoint, t.cloudflare_endpoint)
            entry = entries.get(fill(self.settings.tunnel, shim))
            if entry is not None:
                out[t.id] = any(isinstance(p, dict) and p.get("status") == "up" for p in entry.get("proxyid") or [])
        return out
