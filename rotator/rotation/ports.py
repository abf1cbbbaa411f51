"""The ports the protocol speaks through. Adapters implement them; tests fake them in memory."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

from rotator.errors import VaultError
from rotator.model import Lease, PskSetResult, Record, TunnelInfo
from rotator.secret import Secret


class TunnelApi(Protocol):
    def list_tunnels(self, account_id: str) -> list[TunnelInfo]: ...

    def set_psks(self, account_id: str, psks: Mapping[str, Secret], *, validate_only: bool,
                 deadline: float | None = None) -> PskSetResult: ...


class RecordStore(Protocol):
    def read(self, account_id: str, tunnel_id: str) -> Record: ...

    def read_many(self, account_id: str, tunnel_ids: Sequence[str]) -> dict[str, Record | VaultError]: ...

    def write_many(self, records: list[Record]) -> dict[str, Record | VaultError]: ...

    def read_lease(self, account_id: str) -> Lease: ...

    def write_lease(self, account_id: str, holder: str, expires_at: float, cas: int, *,
                    busy_until: float = 0.0, note: Mapping[str, str] | None = None) -> int: ...


# -- history: KV v2 versions of the records, for the audit report (service/report.py) ----------------

@dataclass(frozen=True, slots=True)
class VersionInfo:
    """One KV v2 version of a tunnel's record, as Vault's metadata and a versioned read give it.
    ``record`` is None when the data cannot be read (deleted or destroyed)."""

    number: int
    created_time: str
    deletion_time: str | None = None
    destroyed: bool = False
    record: Record | None = None


@dataclass(frozen=True, slots=True)
class History:
    """A tunnel record's version history (docs/specs/vault-kv2.md: metadata and versioned reads).
    ``versions`` ascending, only those Vault still lists: 1..oldest_version-1 were pruned."""

    account_id: str
    tunnel_id: str
    path: str
    current_version: int
    oldest_version: int
    max_versions: int
    created_time: str
    versions: tuple[VersionInfo, ...] = ()


@runtime_checkable
class HistoryStore(Protocol):
    """Reads with the least-privilege policy: data read, metadata read and list."""

    def list_records(self, account_id: str) -> list[str]: ...

    def history_many(self, account_id: str, tunnel_ids: Sequence[str]) -> dict[str, History | VaultError]: ...


# -- far-end devices (docs/design.md section 9) ---------------------------------------------------------

class DeviceStatus(StrEnum):
    """What a device said about one tunnel for one action."""

    OK = "ok"            # done: the device holds (deliver/rollback) or runs on (verify) the key
    FAILED = "failed"    # definitely not done (the device said so, or the call never reached it)
    UNKNOWN = "unknown"  # no clear answer (timeout, killed, garbage): the device may hold the key
    WAITING = "waiting"  # manual devices: the key waits for an operator's acknowledgement


@dataclass(frozen=True, slots=True)
class DeviceResult:
    status: DeviceStatus
    reason: str | None = None  # redacted against the batch's keys before it leaves the adapter

    @property
    def ok(self) -> bool:
        return self.status is DeviceStatus.OK


@dataclass(frozen=True, slots=True)
class DeviceTunnel:
    """One tunnel of one device call. ``psk`` is the key to hold after the call: the new key for
    ``deliver`` and ``verify``, the old key for ``rollback``; ``previous_psk`` is the one it replaces."""

    tunnel_id: str
    tunnel_name: str
    psk: Secret
    previous_psk: Secret | None
    customer_endpoint: str | None = None
    cloudflare_endpoint: str | None = None


@dataclass(frozen=True, slots=True)
class KeyRules:
    """What keys a device kind accepts (docs/design.md section 10). A key is never truncated or altered
    to fit: a PSK policy that could generate a key outside these rules is a configuration error.

    ``alphabet``: every character a key may hold (None: any printable ASCII character but space);
    ``not_first``: characters a key may not start with; ``rule``: the rule in words, for messages."""

    min_length: int = 1
    max_length: int = 4096
    alphabet: str | None = None
    not_first: str = ""
    rule: str = "any printable ASCII key"

    def refuses(self, key: str) -> str | None:
        """Why ``key`` breaks these rules, or None."""
        if not self.min_length <= len(key) <= self.max_length:
            return f"{len(key)} characters, outside {self.min_length}..{self.max_length} ({self.rule})"
        allowed = self.alphabet
        bad = sorted({c for c in key if (c not in allowed if allowed is not None else not ("!" <= c <= "~"))})
        if bad:
            return f"{len(bad)} character(s) outside the allowed alphabet ({self.rule})"
        if key[:1] and key[0] in self.not_first:
            return f"starts with a character the device refuses first ({self.rule})"
        return None

    def refuses_policy(self, length: int, alphabet: str, forbidden_first: str = "") -> str | None:
        """Why a policy making ``length``-character keys from ``alphabet`` (never starting with a
        character of ``forbidden_first``) could break these rules, or None."""
        if not self.min_length <= length <= self.max_length:
            return f"psk_length {length} is outside {self.min_length}..{self.max_length} ({self.rule})"
        allowed = self.alphabet
        bad = sorted({c for c in alphabet if (c not in allowed if allowed is not None else not ("!" <= c <= "~"))})
        if bad:
            return f"the policy's alphabet holds {''.join(bad)!r}, which the device refuses ({self.rule})"
        first = sorted((set(alphabet) - set(forbidden_first)) & set(self.not_first))
        if first:
            return (f"a key could start with {''.join(first)!r}, which the device refuses first ({self.rule}); "
                    "use psk_charset = \"aws\" or forbid it first")
        return None


PROOFS = ("ike_reauth", "vendor_status", "operator_ack")


class Device(Protocol):
    """A far end. Every method answers for every tunnel it was given (a tunnel missing from the
    answer counts as UNKNOWN), never raises for a known failure, and returns before ``deadline``
    (``time.monotonic()`` value) has passed.

    What the engine reads besides the three actions (every kind sets each one; the kit's
    ``DeviceBase`` in rotator/adapters/devices/_common.py holds the defaults, and a wrapper such as
    the metrics one must forward each, which mypy checks against this protocol):

    - ``timeout``: seconds, the total deadline of one deliver or rollback call (and of verify when
      ``verify_timeout`` is None); covered by the lease, so the lease-TTL rule applies to it;
    - ``verify_timeout``: None, or how long verify may poll for the vendor's status
      (docs/design.md section 10, long operations). A device that sets it promises its verify
      changes no key: such a verify is not a lease-covered call and does not count for the
      lease-TTL rule; the engine keeps the lease alive while it runs;
    - ``verifies``: ask for a verification after Cloudflare applies;
    - ``ack_timeout``: manual devices, how long a key may wait for its acknowledgement (else None);
    - ``interrupts``: deliver takes the tunnel down (AWS replaces the tunnel endpoint), so a tunnel
      starts only while its redundant partner is up (docs/design.md section 10);
    - ``key_rules``: what keys the vendor accepts; deliver never sends a key that breaks them;
    - ``proof``: how verify shows both ends hold the key, one of PROOFS (the record's ``verified_by``).

    ``pair_of`` names each tunnel's redundant pair (tunnels of one pair are never in flight
    together); ``tunnels_up`` is the vendor's own view of whether tunnels are up (for partner
    gating; a tunnel missing from the answer is not known there). ``close`` frees what it holds.

    The engine makes one call per device, action and batch, and calls different devices
    concurrently; a device with many tunnels in one call works on them concurrently (its own
    bounded pool, ``concurrency`` in its config), so verification time does not grow with the batch."""

    name: str
    kind: str
    timeout: float
    verify_timeout: float | None
    verifies: bool
    ack_timeout: float | None
    interrupts: bool
    key_rules: KeyRules
    proof: str

    def deliver(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
                deadline: float) -> dict[str, DeviceResult]: ...

    def verify(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
               deadline: float) -> dict[str, DeviceResult]: ...

    def rollback(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
                 deadline: float) -> dict[str, DeviceResult]: ...

    def pair_of(self, account_id: str, tunnels: Sequence[TunnelInfo], *, deadline: float) -> dict[str, str]:
        """Tunnel id -> the key of its redundant pair (tunnels with equal keys are partners); a
        tunnel missing from the answer has no partner."""
        ...

    def tunnels_up(self, account_id: str, tunnels: Sequence[TunnelInfo], *, deadline: float) -> dict[str, bool]:
        """Tunnel id -> whether the vendor reports it up; a tunnel missing: not known here."""
        ...

    def close(self) -> None: ...


class HealthState(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    DOWN = "down"
    NO_DATA = "no_data"


class Health(Protocol):
    """Cloudflare's tunnel health checks (GraphQL), judged on what happened after ``since``."""

    def tunnel_health(self, account_id: str, tunnel_names: Sequence[str], *, since: float,
                      deadline: float) -> dict[str, HealthState]: ...
