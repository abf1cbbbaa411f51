"""Plain data shared by the adapters and the engine: tunnels, records, leases, PSK-set results.

Standard library only, so the engine can speak of them without importing httpx or hvac.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rotator.psk import Secret

SECRET_FIELDS = ("psk", "pending_psk", "previous_psk")


@dataclass(frozen=True, slots=True)
class TunnelInfo:
    id: str
    name: str
    last_generated_on: str | None = None


@dataclass(slots=True)
class PskSetResult:
    applied: set[str] = field(default_factory=set)
    unapplied: dict[str, str] = field(default_factory=dict)


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
                   text("ipsec_id"), text("last_error"))

    def to_data(self) -> dict[str, str]:
        data: dict[str, str] = {"state": self.state, "account_id": self.account_id}
        for name in SECRET_FIELDS:
            value = getattr(self, name)
            if value is not None:
                data[name] = value.reveal()
        for name in ("rotation_id", "rotated_at", "tunnel_name", "ipsec_id", "last_error"):
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        return data


@dataclass(slots=True)
class Lease:
    holder: str
    expires_at: float
    version: int
