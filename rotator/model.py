"""Plain data shared by the adapters and the engine: tunnels, records, leases, PSK-set results.

Standard library only, so the engine can speak of them without importing httpx or hvac.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rotator.secret import Secret

SECRET_FIELDS = ("psk", "pending_psk", "previous_psk")


@dataclass(frozen=True, slots=True)
class TunnelInfo:
    id: str
    name: str
    last_generated_on: str | None = None
    customer_endpoint: str | None = None
    cloudflare_endpoint: str | None = None
    # Set by the adapter when the listing's id (or name) is unusable, e.g. not 32 lowercase hex:
    # such a tunnel is reported with this reason and never touches Vault.
    problem: str | None = None


@dataclass(slots=True)
class PskSetResult:
    applied: set[str] = field(default_factory=set)
    unapplied: dict[str, str] = field(default_factory=dict)  # tunnel id -> reason (redacted)
    # Contradictory answers (a key echoed back that differs from the one sent, a tunnel both
    # applied and unapplied): the outcome is unknown and the key must stay pending.
    ambiguous: dict[str, str] = field(default_factory=dict)
    generated_on: dict[str, str] = field(default_factory=dict)  # tunnel id -> psk_metadata.last_generated_on
    ipsec_ids: dict[str, str] = field(default_factory=dict)  # tunnel id -> ipsec_id (IKE identity)


@dataclass(slots=True)
class Record:
    """One tunnel's latest Vault version. ``version`` 0 means no record yet."""

    account_id: str
    tunnel_id: str
    version: int = 0
    psk: Secret | None = None
    pending_psk: Secret | None = None
    previous_psk: Secret | None = None
    state: str = "active"
    rotation_id: str | None = None
    rotated_at: str | None = None
    tunnel_name: str | None = None
    ipsec_id: str | None = None
    last_error: str | None = None
    cf_generated_on: str | None = None  # Cloudflare's last_generated_on right after our apply of psk
    device: str | None = None  # the far-end device that holds the key, if any

    @classmethod
    def from_data(cls, account_id: str, tunnel_id: str, version: int, data: dict[str, Any]) -> Record:
        def secret(name: str) -> Secret | None:
            value = data.get(name)
            return Secret(value) if isinstance(value, str) and value else None

        def text(name: str) -> str | None:
            value = data.get(name)
            return str(value) if value not in (None, "") else None

        return cls(account_id, tunnel_id, version, secret("psk"), secret("pending_psk"), secret("previous_psk"),
                   str(data.get("state") or "active"), text("rotation_id"), text("rotated_at"), text("tunnel_name"),
                   text("ipsec_id"), text("last_error"), text("cf_generated_on"), text("device"))

    def to_data(self) -> dict[str, str]:
        data: dict[str, str] = {"state": self.state, "account_id": self.account_id}
        for name in SECRET_FIELDS:
            value = getattr(self, name)
            if value is not None:
                data[name] = value.reveal()
        for name in ("rotation_id", "rotated_at", "tunnel_name", "ipsec_id", "last_error", "cf_generated_on", "device"):
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        return data


@dataclass(slots=True)
class Lease:
    holder: str
    expires_at: float
    version: int
    busy_until: float = 0.0  # the latest instant a call made under this lease may still land
