"""Far-end devices (DESIGN.md section 9): the ``[[devices]]`` config, which device owns a tunnel, and
the Device implementations of the four kinds.

``parse_devices`` validates the raw TOML list (every error one line naming ``devices[i].key``);
``DeviceRegistry`` answers, for an account and a tunnel, the first device whose ``accounts`` and
``tunnels`` match (first match owns the tunnel), or None: such a tunnel is rotated at Cloudflare and
in Vault only. ``config.load`` calls ``parse_devices(raw.get("devices", []))``; wiring builds a
``DeviceRegistry`` from the specs and hands ``registry.device_for`` to the engine.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rotator.adapters.devices import exec as exec_kind
from rotator.adapters.devices import manual as manual_kind
from rotator.adapters.devices import strongswan as strongswan_kind
from rotator.adapters.devices import webhook as webhook_kind
from rotator.adapters.devices._common import Fields
from rotator.adapters.devices.exec import ExecDevice, ExecSettings
from rotator.adapters.devices.manual import ManualDevice, ManualSettings
from rotator.adapters.devices.strongswan import StrongSwanDevice, StrongSwanSettings
from rotator.adapters.devices.webhook import WebhookDevice, WebhookSettings
from rotator.errors import ConfigError
from rotator.model import TunnelInfo
from rotator.rotation.ports import Device
from rotator.secret import Secret

__all__ = ["KINDS", "DeviceRegistry", "DeviceSpec", "ExecDevice", "ManualDevice", "StrongSwanDevice",
           "WebhookDevice", "build_device", "parse_devices", "secrets_of"]

KINDS = ("exec", "webhook", "strongswan", "manual")
COMMON_KEYS = ("name", "kind", "accounts", "tunnels", "timeout", "verify", "concurrency")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
HEX32 = re.compile(r"^[0-9a-f]{32}$")
DEFAULT_TIMEOUT = "60s"
DEFAULT_CONCURRENCY = 16

KindSettings = ExecSettings | WebhookSettings | StrongSwanSettings | ManualSettings


@dataclass(frozen=True)
class DeviceSpec:
    """One validated ``[[devices]]`` block."""

    name: str
    kind: str
    tunnels: tuple[str, ...]  # exact ids, or globs on names
    settings: KindSettings
    accounts: tuple[str, ...] = ()  # empty: every account
    timeout: float = 60.0  # total deadline of one call to the device, seconds
    verify: bool = True
    concurrency: int = DEFAULT_CONCURRENCY  # calls in flight to this device at once
    path: str = "devices[0]"  # where it was configured, for messages

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
        out.update(self.settings.masked() if hasattr(self.settings, "masked") else vars(self.settings))
        return out


def parse_devices(raw: Any, accounts: Collection[str] = ()) -> tuple[DeviceSpec, ...]:
    """Validate the ``[[devices]]`` blocks. ``accounts``: the configured account ids; when given,
    a device naming an account outside them is an error (it could never match)."""
    if not isinstance(raw, list):
        raise ConfigError(f"devices: expected an array of tables, got {type(raw).__name__}",
                          "write each device as a [[devices]] block")
    specs: list[DeviceSpec] = []
    seen: dict[str, str] = {}
    for i, block in enumerate(raw):
        path = f"devices[{i}]"
        if not isinstance(block, dict):
            raise ConfigError(f"{path}: expected a table, got {type(block).__name__}", "write [[devices]] blocks")
        spec = _parse_one(Fields(block, path), accounts)
        if spec.name in seen:
            raise ConfigError(f"{path}.name: {spec.name!r} is already the name of {seen[spec.name]}",
                              "give every device a unique name (it is recorded in Vault)")
        seen[spec.name] = path
        specs.append(spec)
    return tuple(specs)


def _parse_one(f: Fields, known_accounts: Collection[str]) -> DeviceSpec:
    name = f.text("name", required=True)
    if not NAME_RE.match(name):
        raise f.fail("name", f"{name!r} is not a device name",
                     "use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
    kind = f.text("kind", required=True)
    if kind not in KINDS:
        raise f.fail("kind", f"unknown kind {kind!r}", f"use one of {', '.join(KINDS)}")
    accounts = f.texts("accounts")
    for j, acc in enumerate(accounts):
        if not HEX32.match(acc):
            raise ConfigError(f"{f.key('accounts')}[{j}]: {acc!r} is not a Cloudflare account id",
                              "use the 32-hex-character id from the dashboard URL")
        if known_accounts and acc not in known_accounts:
            raise ConfigError(f"{f.key('accounts')}[{j}]: account {acc} is not configured",
                              "add it as an [[accounts]] block or remove it here")
    tunnels = f.texts("tunnels", required=True)
    if not tunnels:
        raise f.fail("tunnels", "matches no tunnel", "list tunnel names, globs (\"site-*\") or ids")
    timeout = f.duration("timeout", DEFAULT_TIMEOUT)
    concurrency = f.integer("concurrency", DEFAULT_CONCURRENCY, 1, 256)
    verify_default = kind != "manual"
    verify = f.flag("verify", verify_default)
    if kind == "manual" and verify:
        raise f.fail("verify", "a manual device cannot verify a key", "remove verify (it is false for manual devices)")
    settings: KindSettings
    if kind == "exec":
        settings = exec_kind.parse_settings(f)
    elif kind == "webhook":
        settings = webhook_kind.parse_settings(f)
    elif kind == "strongswan":
        settings = strongswan_kind.parse_settings(f)
    else:
        settings = manual_kind.parse_settings(f)
    f.used.update(COMMON_KEYS)
    f.reject_unknown()
    return DeviceSpec(name, kind, tuple(tunnels), settings, tuple(accounts), timeout, verify, concurrency, f.path)


def secrets_of(specs: Iterable[DeviceSpec]) -> list[Secret]:
    """Every secret the device config holds (webhook signing keys), for the log redactor."""
    return [s.settings.secret for s in specs if isinstance(s.settings, WebhookSettings)]


def build_device(spec: DeviceSpec) -> Device:
    """The Device for one spec. Webhook devices hold an HTTP client: close them with ``close()``."""
    s = spec.settings
    if isinstance(s, ExecSettings):
        return ExecDevice(spec.name, s.command, timeout=spec.timeout, verify=spec.verify, pass_env=s.pass_env)
    if isinstance(s, WebhookSettings):
        return WebhookDevice(spec.name, s.url, s.secret, timeout=spec.timeout, verify=spec.verify,
                             concurrency=spec.concurrency, cacert=s.cacert)
    if isinstance(s, StrongSwanSettings):
        return StrongSwanDevice(spec.name, s.socket, owners=s.owners, secret_id=s.secret_id, ike=s.ike,
                                child=s.child, reauth=s.reauth, timeout=spec.timeout, verify=spec.verify,
                                concurrency=spec.concurrency)
    return ManualDevice(spec.name, ack_timeout=s.ack_timeout, timeout=spec.timeout)


@dataclass
class DeviceRegistry:
    """Which device owns a tunnel: the first spec whose accounts and tunnels match."""

    specs: tuple[DeviceSpec, ...]
    devices: dict[str, Device] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for spec in self.specs:
            if spec.name not in self.devices:
                self.devices[spec.name] = build_device(spec)

    def spec_for(self, account_id: str, tunnel: TunnelInfo) -> DeviceSpec | None:
        return next((s for s in self.specs if s.matches(account_id, tunnel)), None)

    def device_for(self, account_id: str, tunnel: TunnelInfo) -> Device | None:
        spec = self.spec_for(account_id, tunnel)
        return self.devices[spec.name] if spec is not None else None

    def for_account(self, account_id: str) -> Callable[[TunnelInfo], Device | None]:
        """The engine's ``RunRequest.device_for`` for one account."""
        return lambda tunnel: self.device_for(account_id, tunnel)

    def by_name(self, name: str) -> Device | None:
        return self.devices.get(name)

    def spec_named(self, name: str) -> DeviceSpec | None:
        return next((s for s in self.specs if s.name == name), None)

    def unmatched_patterns(self, tunnels: Mapping[str, Iterable[TunnelInfo]]) -> list[str]:
        """Warnings for ``config check``: patterns that match no tunnel of the accounts they apply to
        (``tunnels``: account id -> its listed tunnels), and patterns whose every tunnel is owned by an
        earlier device."""
        listing = {acc: list(ts) for acc, ts in tunnels.items()}
        owner = {(acc, t.id): self.spec_for(acc, t) for acc, ts in listing.items() for t in ts}
        warnings = []
        for spec in self.specs:
            for j, pattern in enumerate(spec.tunnels):
                hits = [(acc, t) for acc, ts in listing.items() if spec.applies_to(acc)
                        for t in ts if spec.pattern_matches(pattern, t)]
                key = f"{spec.path}.tunnels[{j}]"
                if not hits:
                    warnings.append(f"{key}: {pattern!r} matches no tunnel of "
                                    f"{'its accounts' if spec.accounts else 'the configured accounts'}")
                elif all(owner[(acc, t.id)] is not spec for acc, t in hits):
                    other = {o.name for acc, t in hits if (o := owner[(acc, t.id)]) is not None}
                    warnings.append(f"{key}: {pattern!r} only matches tunnels owned by an earlier device "
                                    f"({', '.join(sorted(other))}): the first match owns a tunnel")
        return warnings

    def close(self) -> None:
        for device in self.devices.values():
            close = getattr(device, "close", None)
            if callable(close):
                close()
