"""What the device kinds share: the JSON of DESIGN.md section 9, reading a device's answer, redaction,
and a small typed reader of one ``[[devices]]`` table that names the exact key in every error."""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rotator import wire
from rotator.config import parse_duration
from rotator.errors import ConfigError
from rotator.rotation.ports import DeviceResult, DeviceStatus, DeviceTunnel
from rotator.secret import Secret, redact

REASON_MAX = 300
ACTIONS = ("deliver", "verify", "rollback")
TEMPLATE_FIELDS = frozenset({"tunnel_name", "tunnel_id", "customer_endpoint", "cloudflare_endpoint"})


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


class ActionDevice:
    """A device kind whose three port methods are one call with the action named (exec, webhook).
    ``timeout`` and ``verifies`` are the attributes the engine reads (rotation/ports.py)."""

    timeout: float = 60.0
    verifies: bool = True

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


# -- the JSON of DESIGN.md section 9 ---------------------------------------------------------------

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
