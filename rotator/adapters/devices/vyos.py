"""The ``vyos`` device kind: a VyOS router through its HTTPS API (docs/design.md section 10), with httpx.

Why httpx and not pyvyos: pyvyos is a thin requests wrapper that returns each raw response and has
no total deadline; httpx is the project's HTTP client already, with the total-deadline exchange the
Cloudflare adapter uses (a trickling answer cannot stretch a call past its deadline).

deliver / rollback (one call per batch): read every psk entry in one request (``/retrieve``
``showConfig`` on ``vpn ipsec authentication psk``; each tunnel's NAME from the ``psk`` template,
default ``cf-{tunnel_name}``). VyOS returns keys in clear, so a tunnel whose router already holds the key is
left alone (a reconcile never commits again); the others are set with **one** ``/configure`` call
for the batch (a list of ``set`` ops, the key as ``value`` in the POST form, committed together:
a refused commit changes nothing), optionally as a commit-confirm (``confirm_time`` minutes, then
``{"op": "confirm"}`` once the API still answers), then saved (``/config-file`` ``save``) so a reboot
keeps the key.

verify (tunnels concurrently): ``/reset`` the site-to-site peer (the ``peer`` template,
``reset vpn ipsec site-to-site peer NAME``), then poll ``/show`` ``vpn ipsec sa`` until the peer's
connection is ``up`` with an uptime shorter than the time since the reset: a fresh IKE_AUTH, which
Cloudflare accepts only with the same key.

Keys: 8-128 characters of letters, digits and ``-_.+/=``: VyOS writes the secret into swanctl.conf
as a quoted string (strongSwan's swanctl.conf documentation: secrets are strings, quotes and
backslashes need escaping), so the kind keeps to characters that need none; the VyOS IPsec
documentation (site2site_ipsec, "authentication psk <name> secret <secret>") sets no length limit.
"""

from __future__ import annotations

import json
import re
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from rotator import wire
from rotator.adapters.devices._common import DeviceSpec, Fields, fill, holds, one_line
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
from rotator.rotation.ports import DeviceResult, DeviceStatus, DeviceTunnel, KeyRules
from rotator.secret import Secret, redact

log = structlog.get_logger("rotator.devices.vyos")

KIND = "vyos"
INTERRUPTS = False  # a commit changes the key; established SAs live on until re-authenticated
PROOF = "ike_reauth"
EXTRA_COMMON_KEYS = ("verify_timeout",)
KEY_RULES = KeyRules(min_length=8, max_length=128, alphabet=string.ascii_letters + string.digits + "-_.+/=",
                     rule="VyOS: 8-128 characters of A-Z a-z 0-9 - _ . + / =")
PSK = ["vpn", "ipsec", "authentication", "psk"]
PEER = ["vpn", "ipsec", "site-to-site", "peer"]
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
UPTIME_RE = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
DEFAULT_NAME = "cf-{tunnel_name}"


@dataclass(frozen=True)
class VyosSettings:
    host: str
    port: int
    api_key: Secret
    api_key_file: str
    ca_file: str = ""
    verify_tls: bool = True
    psk: str = DEFAULT_NAME
    peer: str = DEFAULT_NAME
    confirm_time: int = 0
    save: bool = True
    poll_interval: float = 2.0

    def masked(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "api_key_file": self.api_key_file,
                "ca_file": self.ca_file or "<system>", "verify_tls": self.verify_tls, "psk": self.psk,
                "peer": self.peer, "confirm_time": self.confirm_time, "save": self.save,
                "poll_interval": self.poll_interval}


def parse_settings(f: Fields) -> VyosSettings:
    host = parse_host(f)
    port = f.integer("port", 443, 1, 65535)
    api_key, api_key_file = read_credential(
        f, "api_key_file", "API key", "write the key of 'service https api keys id ... key' into it")
    ca_file, verify_tls = parse_tls(f)
    return VyosSettings(host, port, api_key, api_key_file, ca_file, verify_tls, f.template("psk", DEFAULT_NAME),
                        f.template("peer", DEFAULT_NAME), f.integer("confirm_time", 0, 0, 60), f.flag("save", True),
                        f.duration("poll_interval", "2s"))


def secrets(settings: VyosSettings) -> list[Secret]:
    return [settings.api_key]


def build(spec: DeviceSpec) -> VyosDevice:
    assert isinstance(spec.settings, VyosSettings)
    return VyosDevice.from_spec(spec)


def uptime_seconds(text: str) -> float | None:
    m = UPTIME_RE.match(text.strip())
    if not m or not any(m.groups()):
        return None
    d, h, mi, s = (int(g or 0) for g in m.groups())
    return float(((d * 24 + h) * 60 + mi) * 60 + s)


class VyosDevice(HttpsFirewall):
    """A VyOS router as a far end (rotation/ports.py, Device)."""

    kind = KIND
    interrupts = INTERRUPTS
    key_rules = KEY_RULES
    proof = PROOF
    product = "router"
    settings: VyosSettings

    # -- one request ---------------------------------------------------------------------------
    def _post(self, endpoint: str, data: Any, end: float) -> Any:
        """POST ``data`` (JSON in the ``data`` form field, the API key in ``key``) and return the
        answer's ``data``; raises Refused, Unclear or Unreached, each with a one-line message."""
        form = {"data": json.dumps(data), "key": self.settings.api_key.reveal()}
        where = self.where
        answer = self.send("POST", self.base + endpoint, end, {}, data=form)
        try:
            doc = wire.loads(answer.body)
        except ValueError:  # wire.NotJson: malformed or nested too deeply
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("success"), bool):
            if answer.status in (401, 403):
                raise Unreached(f"the router at {where} refused the API key (HTTP {answer.status}): write a valid "
                                "key to api_key_file") from None
            raise Unclear(f"unreadable answer from the router at {where} (HTTP {answer.status})")
        if answer.status in (401, 403):
            raise Unreached(f"the router at {where} refused the API key (HTTP {answer.status} "
                            f"{str(doc.get('error') or '')[:60].strip()}): write a valid key to api_key_file")
        if answer.status >= 500:
            raise Unclear(f"the router at {where} failed (HTTP {answer.status}: {str(doc.get('error'))[:200]})")
        if not doc["success"] or answer.status >= 400:
            raise Refused(str(doc.get("error") or f"HTTP {answer.status}").strip())
        return doc.get("data")

    # -- deliver and rollback --------------------------------------------------------------------
    def _name(self, template: str, what: str, tunnel: DeviceTunnel) -> str | DeviceResult:
        name = fill(template, tunnel)
        if not NAME_RE.match(name):
            return DeviceResult(DeviceStatus.FAILED, f"{name[:80]!r} (the {what} template {template!r}) is not a "
                                f"VyOS {what} name; set the device's {what} template")
        return name

    def set_keys(self, action: str, tunnels: Sequence[DeviceTunnel], end: float, keys: list[str]
                 ) -> dict[str, DeviceResult]:
        out: dict[str, DeviceResult] = {}
        todo: dict[str, tuple[DeviceTunnel, str]] = {}
        for t in tunnels:
            name = self._name(self.settings.psk, "psk", t)
            broken = self.key_rules.refuses(t.psk.reveal())
            if isinstance(name, DeviceResult):
                out[t.tunnel_id] = name
            elif broken:
                out[t.tunnel_id] = DeviceResult(DeviceStatus.FAILED, f"not sent: the key breaks the rule {broken}")
            else:
                todo[t.tunnel_id] = (t, name)
        ops: list[dict[str, Any]] = []
        changing: list[str] = []
        held: list[str] = []
        entries: Any = {}
        if todo:
            try:  # every psk entry in one request; VyOS shows the secrets in clear
                entries = self._post("/retrieve", {"op": "showConfig", "path": PSK}, end)
            except Refused:
                entries = {}  # "Configuration under specified path is empty"
            except (Unclear, Unreached) as exc:
                for tid in todo:
                    out[tid] = DeviceResult(DeviceStatus.FAILED, one_line(f"{exc}; nothing was changed", keys))
                return out
        for tid, (t, name) in todo.items():
            current = entries.get(name) if isinstance(entries, dict) else None
            if not isinstance(current, dict):
                out[tid] = DeviceResult(DeviceStatus.FAILED, f"no psk entry {name} (vpn ipsec authentication psk) "
                                        f"on the router (psk template {self.settings.psk!r}); nothing was sent")
                continue
            secret = current.get("secret")
            if isinstance(secret, str) and holds(secret, t.psk):
                held.append(tid)
                continue
            ops.append({"op": "set", "path": [*PSK, name, "secret"], "value": t.psk.reveal()})
            changing.append(tid)
        if ops:
            out.update(self._commit(ops, changing, end, keys))
        ok = [tid for tid in changing if out[tid].ok] + held
        if ok and self.settings.save:
            try:
                self._post("/config-file", {"op": "save"}, end)
            except (Refused, Unclear, Unreached) as exc:
                for tid in ok:
                    out[tid] = DeviceResult(DeviceStatus.UNKNOWN, one_line(
                        f"the router runs the key but saving it failed ({exc}): a reboot would bring back the "
                        "saved key; it is sent and saved again later", keys))
                return out
        for tid in held:
            out.setdefault(tid, DeviceResult(DeviceStatus.OK, "the router already holds this key: nothing committed"))
        return out

    def _commit(self, ops: list[dict[str, Any]], tids: list[str], end: float, keys: list[str]
                ) -> dict[str, DeviceResult]:
        def each(status: DeviceStatus, reason: str | None) -> dict[str, DeviceResult]:
            return {tid: DeviceResult(status, one_line(reason, keys) if reason else None) for tid in tids}

        # A list of ops is one commit; with confirm_time the vyos-1x API takes {"commands": [...],
        # "confirm_time": minutes} (a commit-confirm), confirmed by {"op": "confirm"} below.
        body: Any = {"commands": ops, "confirm_time": self.settings.confirm_time} if self.settings.confirm_time else ops
        try:
            self._post("/configure", body, end)
        except Refused as exc:
            return each(DeviceStatus.FAILED, f"the router refused the commit: {redact(str(exc), keys)}; nothing "
                        "changed")
        except Unreached as exc:
            return each(DeviceStatus.FAILED, f"{exc}; nothing was changed")
        except Unclear as exc:
            return each(DeviceStatus.UNKNOWN, f"configure: {exc}; the router may hold the key")
        log.info("device_vyos_commit", device=self.name, tunnels=len(tids))
        if self.settings.confirm_time:
            try:
                self._post("/configure", {"op": "confirm"}, end)
            except (Refused, Unclear, Unreached) as exc:
                return each(DeviceStatus.UNKNOWN, f"committed, but confirming the commit failed ({exc}): the router "
                            f"reverts to the old key within {self.settings.confirm_time} minute(s) unless confirmed")
        return each(DeviceStatus.OK, None)

    # -- verify: reset the peer, wait for a fresh SA -------------------------------------------------
    def _fresh(self, peer: str, since: float, end: float) -> bool:
        table = self._post("/show", {"op": "show", "path": ["vpn", "ipsec", "sa"]}, end)
        elapsed = time.monotonic() - since + 1.0  # uptime has second resolution
        for line in str(table).splitlines():
            cols = line.split()
            if len(cols) >= 3 and (cols[0] == peer or cols[0].startswith(peer + "-")) and cols[1] == "up":
                up = uptime_seconds(cols[2])
                if up is not None and up <= elapsed:
                    return True
        return False

    def verify_one(self, tunnel: DeviceTunnel, end: float, keys: list[str]) -> DeviceResult:
        peer = self._name(self.settings.peer, "peer", tunnel)
        if isinstance(peer, DeviceResult):
            return peer
        since = time.monotonic()
        try:
            self._post("/reset", {"op": "reset", "path": [*PEER, peer]}, end)
        except Refused as exc:
            return DeviceResult(DeviceStatus.FAILED, one_line(f"resetting peer {peer}: {exc}", keys))
        except (Unclear, Unreached) as exc:
            return DeviceResult(DeviceStatus.UNKNOWN, one_line(f"resetting peer {peer}: {exc}", keys))
        return wait_fresh(lambda: self._fresh(peer, since, end), end, self.settings.poll_interval, keys,
                          what=f"resetting peer {peer}", since=since, failure="no fresh SA")
