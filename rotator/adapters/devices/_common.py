"""What the device kinds share: the JSON of docs/design.md section 9, reading a device's answer, redaction,
and a small typed reader of one ``[[devices]]`` table that names the exact key in every error."""

from __future__ import annotations

import fnmatch
import hmac
import json
import string
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from rotator import wire
from rotator.config import parse_duration
from rotator.errors import ConfigError
from rotator.model import TunnelInfo
from rotator.rotation.ports import Device, DeviceResult, DeviceStatus, DeviceTunnel, KeyRules
from rotator.secret import Secret, redact

T = TypeVar("T")

REASON_MAX = 300
ACTIONS = ("deliver", "verify", "rollback")
TEMPLATE_FIELDS = frozenset({"tunnel_name", "tunnel_id", "customer_endpoint", "cloudflare_endpoint"})


# -- one validated [[devices]] block ---------------------------------------------------------------

class KindSettings(Protocol):
    """What a kind's ``parse_settings`` returns: a frozen dataclass; ``masked()`` shows it without a secret."""

    def masked(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class DeviceSpec:
    """One validated ``[[devices]]`` block: the common keys, and ``settings`` of the kind."""

    name: str
    kind: str
    tunnels: tuple[str, ...]  # exact ids, or globs on names
    settings: KindSettings
    accounts: tuple[str, ...] = ()  # empty: every account
    timeout: float = 60.0  # total deadline of one call to the device, seconds
    verify: bool = True
    concurrency: int = 16  # calls in flight to this device at once
    path: str = "devices[0]"  # where it was configured, for messages
    verify_timeout: float | None = None  # vendor kinds: how long verify polls for the vendor's status

    def applies_to(self, account_id: str) -> bool:
        return not self.accounts or account_id in self.accounts

    def pattern_matches(self, pattern: str, tunnel: TunnelInfo) -> bool:
        return tunnel.id == pattern or fnmatch.fnmatchcase(tunnel.name, pattern)

    def matches(self, account_id: str, tunnel: TunnelInfo) -> bool:
        return self.applies_to(account_id) and any(self.pattern_matches(p, tunnel) for p in self.tunnels)

    def masked(self) -> dict[str, Any]:
        """For ``rotator config check``: the effective settings, no secret."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "accounts": list(self.accounts) or "all",
                               "tunnels": list(self.tunnels), "timeout": self.timeout, "verify": self.verify,
                               "concurrency": self.concurrency}
        if self.verify_timeout is not None:
            out["verify_timeout"] = self.verify_timeout
        out.update(self.settings.masked())
        return out


# -- redaction -------------------------------------------------------------------------------------

def batch_keys(tunnels: Iterable[DeviceTunnel]) -> list[str]:
    """Every key a batch carries, longest first (so no key is half-masked by a shorter one)."""
    keys = {k.reveal() for t in tunnels for k in (t.psk, t.previous_psk) if k is not None}
    return sorted((k for k in keys if len(k) >= 6), key=len, reverse=True)



def one_line(text: str, keys: Sequence[str], limit: int = REASON_MAX) -> str:
    """A reason fit for a record, a log line and a terminal: redacted, one line, bounded length."""
    text = " ".join(redact(text, keys).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return redact(text, keys)  # a cut through a key must not leave it whole


def last_line(data: bytes) -> str:
    lines = [ln for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def every(tunnels: Sequence[DeviceTunnel], status: DeviceStatus, reason: str | None) -> dict[str, DeviceResult]:
    return {t.tunnel_id: DeviceResult(status, reason) for t in tunnels}


def split(tunnels: Sequence[DeviceTunnel], parts: int) -> list[Sequence[DeviceTunnel]]:
    """At most ``parts`` slices of near-equal size, in order."""
    size = -(-len(tunnels) // max(1, parts))
    return [tunnels[i:i + size] for i in range(0, len(tunnels), size)] if tunnels else []


class DeviceBase:
    """The defaults of the Device port (rotation/ports.py) every kind starts from; a kind sets
    what differs (as class attributes or in ``__init__``)."""

    name: str
    kind: str
    timeout: float = 60.0
    verify_timeout: float | None = None
    verifies: bool = True
    ack_timeout: float | None = None
    interrupts: bool = False
    key_rules: KeyRules = KeyRules()
    proof: str = "ike_reauth"

    def pair_of(self, account_id: str, tunnels: Sequence[TunnelInfo], *, deadline: float) -> dict[str, str]:
        """The usual redundant pair: tunnels of one device to the same customer endpoint."""
        return {t.id: t.customer_endpoint for t in tunnels if t.customer_endpoint}

    def tunnels_up(self, account_id: str, tunnels: Sequence[TunnelInfo], *, deadline: float) -> dict[str, bool]:
        return {}  # no status of its own: partner gating asks Cloudflare's tunnel health

    def close(self) -> None:
        return None


class DeviceWrapper(DeviceBase):
    """A Device around another one (metrics, a test's fault): every attribute of the port is the
    wrapped device's, forwarded by name (so a wrapper never turns ``verify = false`` or a 10 s
    timeout back into the defaults); subclasses override the actions they change."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.name, self.kind = device.name, device.kind
        self.timeout, self.verify_timeout, self.verifies = device.timeout, device.verify_timeout, device.verifies
        self.ack_timeout, self.interrupts, self.proof = device.ack_timeout, device.interrupts, device.proof
        self.key_rules = device.key_rules

    def deliver(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
                deadline: float) -> dict[str, DeviceResult]:
        return self.device.deliver(account_id, rotation_id, tunnels, deadline=deadline)

    def verify(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
               deadline: float) -> dict[str, DeviceResult]:
        return self.device.verify(account_id, rotation_id, tunnels, deadline=deadline)

    def rollback(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
                 deadline: float) -> dict[str, DeviceResult]:
        return self.device.rollback(account_id, rotation_id, tunnels, deadline=deadline)

    def pair_of(self, account_id: str, tunnels: Sequence[TunnelInfo], *, deadline: float) -> dict[str, str]:
        return self.device.pair_of(account_id, tunnels, deadline=deadline)

    def tunnels_up(self, account_id: str, tunnels: Sequence[TunnelInfo], *, deadline: float) -> dict[str, bool]:
        return self.device.tunnels_up(account_id, tunnels, deadline=deadline)

    def close(self) -> None:
        self.device.close()


class ActionDevice(DeviceBase):
    """A device kind whose three port methods are one call with the action named (exec, webhook)."""

    def call(self, action: str, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel],
             deadline: float) -> dict[str, DeviceResult]:
        raise NotImplementedError

    def deliver(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
                deadline: float) -> dict[str, DeviceResult]:
        return self.call("deliver", account_id, rotation_id, tunnels, deadline)

    def verify(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
               deadline: float) -> dict[str, DeviceResult]:
        return self.call("verify", account_id, rotation_id, tunnels, deadline)

    def rollback(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
                 deadline: float) -> dict[str, DeviceResult]:
        return self.call("rollback", account_id, rotation_id, tunnels, deadline)


# -- what vendor kinds share (docs/design.md section 10) --------------------------------------------

def match_endpoint(tunnel: DeviceTunnel, by_address: Mapping[str, T], looked_in: str) -> T | DeviceResult:
    """The vendor tunnel whose outside address is the Cloudflare tunnel's ``customer_endpoint``, or
    the FAILED result a deliver answers with (the tunnel is refused; nothing is sent anywhere).
    ``looked_in`` names where the kind looked, e.g. "VPN connections vpn-1, vpn-2 in eu-west-1"."""
    endpoint = tunnel.customer_endpoint
    if not endpoint:
        return DeviceResult(DeviceStatus.FAILED, f"tunnel {tunnel.tunnel_name} has no customer_endpoint at "
                            f"Cloudflare, so no tunnel in {looked_in} can be matched to it; set the "
                            "tunnel's customer_endpoint to the vendor tunnel's outside address")
    found = by_address.get(endpoint)
    if found is None:
        return DeviceResult(DeviceStatus.FAILED, f"no tunnel with outside address {endpoint} (the customer_endpoint "
                            f"of {tunnel.tunnel_name}) in {looked_in}; check the device's tunnels and "
                            "the Cloudflare tunnel's customer_endpoint")
    return found


def holds(current: str | Secret | None, key: Secret) -> bool:
    """Whether the vendor's current key (as it returned it; None: not returned) is already ``key``:
    a repeated deliver (reconcile after a crash) then changes nothing."""
    if current is None:
        return False
    text = current.reveal() if isinstance(current, Secret) else current
    return hmac.compare_digest(text.encode(), key.reveal().encode())


def poll(check: Callable[[], DeviceResult | None], deadline: float, *, interval: float,
         sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
         on_timeout: Callable[[], DeviceResult]) -> DeviceResult:
    """Call ``check`` until it gives a result (None: not yet) or ``deadline`` passes; then
    ``on_timeout()``. Bounded: at most one check per ``interval`` and none after the deadline."""
    interval = max(interval, 0.001)
    for _ in range(int(max(0.0, deadline - clock()) / interval) + 2):
        result = check()
        if result is not None:
            return result
        left = deadline - clock()
        if left <= 0:
            break
        sleep(min(interval, left))
    return on_timeout()


# -- the JSON of docs/design.md section 9 ---------------------------------------------------------------

def request_body(action: str, device: str, account_id: str, rotation_id: str,
                 tunnels: Sequence[DeviceTunnel]) -> bytes:
    """The one JSON object an exec hook reads on stdin and a webhook receives as its body."""
    def reveal(value: Secret | None) -> str | None:
        return value.reveal() if value is not None else None

    return json.dumps({
        "version": 1, "action": action, "device": device, "account_id": account_id, "rotation_id": rotation_id,
        "tunnels": [{"tunnel_id": t.tunnel_id, "tunnel_name": t.tunnel_name, "psk": t.psk.reveal(),
                     "previous_psk": reveal(t.previous_psk), "customer_endpoint": t.customer_endpoint,
                     "cloudflare_endpoint": t.cloudflare_endpoint} for t in tunnels],
    }, separators=(",", ":")).encode()


class Garbage(Exception):
    """The device answered something that is not the results object of section 9."""


def parse_results(body: bytes, tunnels: Sequence[DeviceTunnel], keys: Sequence[str]
                  ) -> tuple[dict[str, DeviceResult], list[str]]:
    """The optional ``{"results": {...}}`` answer: the tunnels it speaks of, and the ids it named that
    were not asked about (ignored). Raises ``Garbage`` when the answer as a whole is unreadable; an
    unreadable entry makes that one tunnel UNKNOWN."""
    text = body.decode("utf-8", "replace").strip()
    if not text:
        return {}, []
    try:
        doc = wire.loads(text)
    except ValueError:  # wire.NotJson: malformed or nested too deeply
        raise Garbage("the answer is not JSON") from None
    if not isinstance(doc, dict):
        raise Garbage(f"the answer is a JSON {type(doc).__name__}, not an object")
    if "results" not in doc:
        return {}, []
    results = doc["results"]
    if not isinstance(results, dict):
        raise Garbage("'results' is not an object")
    asked = {t.tunnel_id for t in tunnels}
    out: dict[str, DeviceResult] = {}
    for tunnel_id, entry in results.items():
        if tunnel_id not in asked:
            continue
        ok = entry.get("ok") if isinstance(entry, dict) else None
        reason = entry.get("reason") if isinstance(entry, dict) else None
        if not isinstance(ok, bool) or not (reason is None or isinstance(reason, str)):
            out[tunnel_id] = DeviceResult(DeviceStatus.UNKNOWN, 'unreadable result (expected {"ok": true} or '
                                                                '{"ok": false, "reason": "..."})')
        elif ok:
            out[tunnel_id] = DeviceResult(DeviceStatus.OK)
        else:
            out[tunnel_id] = DeviceResult(DeviceStatus.FAILED, one_line(reason or "the device said no", keys))
    strangers = sorted(one_line(str(k), keys, 80) for k in results if k not in asked)
    return out, strangers


def strangers_note(strangers: Sequence[str]) -> str:
    shown = ", ".join(strangers[:3]) + (", …" if len(strangers) > 3 else "")
    return f"ignored results for {len(strangers)} tunnel(s) not in the request ({shown})"


def with_note(result: DeviceResult, note: str | None) -> DeviceResult:
    if not note:
        return result
    return DeviceResult(result.status, f"{result.reason}; {note}" if result.reason else note)


# -- reading one [[devices]] table ------------------------------------------------------------------

class Fields:
    """One ``[[devices]]`` table: typed getters whose errors name ``devices[i].key``."""

    def __init__(self, data: Mapping[str, Any], path: str) -> None:
        self.data, self.path = data, path
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}"

    def fail(self, name: str, problem: str, fix: str) -> ConfigError:
        return ConfigError(f"{self.key(name)}: {problem}", fix)

    def _get(self, name: str, kind: type | tuple[type, ...], what: str, default: Any) -> Any:
        self.used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self.fail(name, f"expected {what}, got {type(value).__name__}", "fix the config file")
        return value

    def text(self, name: str, default: str | None = None, *, required: bool = False) -> str:
        if required and name not in self.data:
            raise self.fail(name, "is missing", f"set {name} in this [[devices]] block")
        value: str | None = self._get(name, str, "a string", default)
        if value is None:
            raise self.fail(name, "is missing", f"set {name} in this [[devices]] block")
        return value

    def flag(self, name: str, default: bool) -> bool:
        return bool(self._get(name, bool, "true or false", default))

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = int(self._get(name, int, "an integer", default))
        if not low <= value <= high:
            raise self.fail(name, f"{value} is outside {low}..{high}", f"the default is {default}")
        return value

    def texts(self, name: str, default: list[str] | None = None, *, required: bool = False) -> list[str]:
        if required and name not in self.data:
            raise self.fail(name, "is missing", f"set {name} = [\"...\"] in this [[devices]] block")
        value: list[Any] = self._get(name, list, "a list of strings", default if default is not None else [])
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise ConfigError(f"{self.key(name)}[{i}]: expected a non-empty string, got {item!r}",
                                  "fix the config file")
        return list(value)

    def duration(self, name: str, default: str | float) -> float:
        self.used.add(name)
        seconds = parse_duration(self.data.get(name, default), self.key(name))
        if seconds <= 0:
            raise self.fail(name, "must be longer than 0s", f"e.g. {default}")
        return seconds

    def template(self, name: str, default: str) -> str:
        value = self.text(name, default)
        check_template(value, self.key(name))
        return value

    def reject_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown setting for this kind of device",
                              f"allowed here: {', '.join(sorted(self.used))}")


def check_template(value: str, key: str) -> None:
    try:
        names = [field for _, field, _, _ in string.Formatter().parse(value) if field is not None]
    except ValueError as exc:
        raise ConfigError(f"{key}: {value!r} is not a valid template ({exc})", "write fields as {tunnel_name}") \
            from None
    for field in names:
        if field not in TEMPLATE_FIELDS:
            raise ConfigError(f"{key}: unknown field {{{field}}} in {value!r}",
                              f"use {', '.join('{' + f + '}' for f in sorted(TEMPLATE_FIELDS))}")


def fill(template: str, tunnel: DeviceTunnel) -> str:
    return template.format(tunnel_name=tunnel.tunnel_name, tunnel_id=tunnel.tunnel_id,
                           customer_endpoint=tunnel.customer_endpoint or "",
                           cloudflare_endpoint=tunnel.cloudflare_endpoint or "")
