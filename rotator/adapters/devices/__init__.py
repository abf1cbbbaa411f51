"""Far-end devices (docs/design.md sections 9 and 10): the ``[[devices]]`` config, which device owns
a tunnel, and the registry of device kinds.

``parse_devices`` validates the raw TOML list (every error one line naming ``devices[i].key``);
``DeviceRegistry`` answers, for an account and a tunnel, the first device whose ``accounts`` and
``tunnels`` match (first match owns the tunnel), or None: such a tunnel is rotated at Cloudflare and
in Vault only. ``config.load`` calls ``parse_devices(raw.get("devices", []))`` and
``check_key_rules``; wiring builds a ``DeviceRegistry`` from the specs and hands
``registry.device_for`` to the engine.

Adding a kind is one module here and one line in ``KIND_MODULES``. The module contract
(``Kind`` below is its type; tests/devices/test_kit.py checks every registered module against it)::

    # rotator/adapters/devices/<kind>.py
    KIND = "aws_vpn"
    def parse_settings(f: Fields) -> Settings        # only this kind's keys, through Fields (_common.py);
                                                     # Settings: a frozen dataclass with masked() -> dict (no secret)
    def build(spec: DeviceSpec) -> Device            # spec.settings is this kind's Settings; spec.timeout,
                                                     # verify, concurrency, name, verify_timeout are common
    def secrets(settings: Settings) -> list[Secret]  # every credential the settings hold, for the log redactor
    KEY_RULES: KeyRules                              # what keys the vendor accepts; or a function
                                                     # (settings) -> KeyRules where it depends on the settings
    INTERRUPTS: bool                                 # deliver takes the tunnel down (partner gating)
    PROOF: str                                       # how verify shows both ends hold the key (ports.PROOFS)
    EXTRA_COMMON_KEYS: tuple[str, ...] = ()          # optional: common keys the kit parses for it
                                                     # ("verify_timeout": DeviceSpec.verify_timeout)
    VERIFIES: bool = True                            # optional: False for a kind that cannot verify
                                                     # (verify defaults to false, and true is an error)

The built Device (rotation/ports.py) carries ``interrupts``, ``key_rules`` and ``proof``; the kit's
``DeviceBase`` (_common.py) gives the defaults, and the shared helpers for vendor kinds are there
too: ``match_endpoint`` (the vendor tunnel whose outside address is the ``customer_endpoint``; an
unmatched tunnel is refused, nothing sent), ``holds`` (a repeated deliver changes nothing) and
``poll`` (verify polls to ``verify_timeout``).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol, cast

from rotator.adapters.devices._common import DeviceSpec, Fields, KindSettings
from rotator.adapters.devices.exec import ExecDevice
from rotator.adapters.devices.manual import ManualDevice
from rotator.adapters.devices.strongswan import StrongSwanDevice
from rotator.adapters.devices.webhook import WebhookDevice
from rotator.errors import ConfigError
from rotator.model import TunnelInfo
from rotator.rotation.ports import PROOFS, Device, KeyRules
from rotator.secret import Secret

if TYPE_CHECKING:
    from rotator.config import Account
    from rotator.schedule import Policy

__all__ = [
    "KINDS",
    "DeviceRegistry",
    "DeviceSpec",
    "ExecDevice",
    "Kind",
    "ManualDevice",
    "StrongSwanDevice",
    "WebhookDevice",
    "build_device",
    "check_key_rules",
    "key_rules_of",
    "kind",
    "parse_devices",
    "secrets_of",
]

# The registry: one line per kind, the module's name under rotator/adapters/devices/ (imported when used).
KIND_MODULES = (
    "exec",
    "webhook",
    "strongswan",
    "manual",
    "aws_vpn",
    "azure_vpn",
    "panos",
    "vyos",
    "fortigate",
)
KINDS = KIND_MODULES
COMMON_KEYS = ("name", "kind", "accounts", "tunnels", "timeout", "verify", "concurrency")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
HEX32 = re.compile(r"^[0-9a-f]{32}$")
DEFAULT_TIMEOUT = "60s"
DEFAULT_VERIFY_TIMEOUT = "20m"
DEFAULT_CONCURRENCY = 16


class Kind(Protocol):
    """The module contract of a device kind (the docstring above)."""

    KIND: str
    INTERRUPTS: bool
    PROOF: str

    @property
    def KEY_RULES(self) -> KeyRules | Callable[[Any], KeyRules]: ...

    def parse_settings(self, f: Fields) -> KindSettings: ...

    def build(self, spec: DeviceSpec) -> Device: ...

    def secrets(self, settings: Any) -> list[Secret]: ...


@cache
def kind(name: str) -> Kind:
    """The module of a registered kind; KeyError for a name not in ``KIND_MODULES``."""
    if name not in KIND_MODULES:
        raise KeyError(name)
    module = importlib.import_module(f"{__name__}.{name}")
    missing = [a for a in ("KIND", "parse_settings", "build", "secrets", "KEY_RULES", "INTERRUPTS", "PROOF")
               if not hasattr(module, a)]
    if missing or module.KIND != name or module.PROOF not in PROOFS:
        raise TypeError(f"device kind module {name} breaks the kind contract (missing {missing}, "
                        f"KIND {getattr(module, 'KIND', None)!r}, PROOF {getattr(module, 'PROOF', None)!r})")
    return cast(Kind, module)


def key_rules_of(spec: DeviceSpec) -> KeyRules:
    rules = kind(spec.kind).KEY_RULES
    return rules if isinstance(rules, KeyRules) else rules(spec.settings)


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
    kind_name = f.text("kind", required=True)
    if kind_name not in KIND_MODULES:
        raise f.fail("kind", f"unknown kind {kind_name!r}", f"use one of {', '.join(KIND_MODULES)}")
    module = kind(kind_name)
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
    can_verify = bool(getattr(module, "VERIFIES", True))
    verify = f.flag("verify", can_verify)
    if not can_verify and verify:
        raise f.fail("verify", f"a {kind_name} device cannot verify a key",
                     f"remove verify (it is false for {kind_name} devices)")
    extra = tuple(getattr(module, "EXTRA_COMMON_KEYS", ()))
    verify_timeout = f.duration("verify_timeout", DEFAULT_VERIFY_TIMEOUT) if "verify_timeout" in extra else None
    settings = module.parse_settings(f)
    f.used.update(COMMON_KEYS + extra)
    f.reject_unknown()
    return DeviceSpec(name, kind_name, tuple(tunnels), settings, tuple(accounts), timeout, verify, concurrency,
                      f.path, verify_timeout)


def check_key_rules(specs: Sequence[DeviceSpec], accounts: Sequence[Account], policies: Mapping[str, Policy]) -> None:
    """A PSK policy that could make a key a device's kind refuses, for a tunnel the device may own, is
    a configuration error naming the device and the rule (docs/design.md section 10). A device may
    own tunnels of every account it applies to, under every policy those accounts select, and under
    the default policy wherever a tunnel may be rotated without a selection naming it (an account not
    configured, or one whose selections do not cover every tunnel)."""
    for spec in specs:
        rules = key_rules_of(spec)
        mine = [a for a in accounts if spec.applies_to(a.id)]
        names: list[str] = []
        for account in mine:
            names.extend(s.policy for s in account.selections)
        if not spec.accounts or not accounts or any(
                not any(s.all and not s.exclude for s in a.selections) for a in mine):
            names.append("default")
        for name in dict.fromkeys(names):
            psk = policies[name].psk
            broken = rules.refuses_policy(psk.length, psk.alphabet, psk.forbidden_first)
            if broken is not None:
                raise ConfigError(f"{spec.path} ({spec.name}, kind {spec.kind}): policies.{name} could make a key "
                                  f"the device refuses: {broken}",
                                  f"give the tunnels of {spec.name} a policy whose keys follow {rules.rule}"
                                  + (" (policies.default covers tunnels no selection names and accounts not "
                                     "configured: change it, or set this device's accounts and selections)"
                                     if name == "default" else "") + "; a key is never truncated or altered to fit")


def secrets_of(specs: Iterable[DeviceSpec]) -> list[Secret]:
    """Every secret the device config holds (signing keys, vendor credentials), for the log redactor."""
    return [secret for s in specs for secret in kind(s.kind).secrets(s.settings)]


def build_device(spec: DeviceSpec) -> Device:
    """The Device for one spec. A device may hold a client: close it with ``close()``."""
    return kind(spec.kind).build(spec)


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
            device.close()
