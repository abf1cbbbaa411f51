"""Plain data shared by the adapters and the engine: tunnels, records, leases, PSK-set results.

Standard library only, so the engine can speak of them without importing httpx or hvac.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from rotator.secret import Secret

SECRET_FIELDS = ("psk", "pending_psk", "previous_psk")
_TEXT_FIELDS = ("rotation_id", "rotated_at", "tunnel_name", "ipsec_id", "last_error", "cf_generated_on", "device",
                "staged_at", "acked_rotation_id", "verified_at", "verified_by", "drift_generated_on")

# How both ends were shown to hold a promoted key (``verified_by``, docs/design.md section 3).
PROOFS = ("ike_reauth", "vendor_status", "health", "operator_ack", "none")


class Outcome(StrEnum):
    """What one run did to one tunnel. Compares equal to its string value."""

    ROTATED = "rotated"            # both ends hold the new key, promoted in Vault
    REFUSED = "refused"            # Cloudflare's validation (or our own checks) refused the tunnel
    UNAPPLIED = "unapplied"        # definitely not applied; the new key was taken back
    SKIPPED = "skipped"            # not attempted (lease lost, shutting down, record changed under us)
    UNKNOWN = "unknown"            # outcome unknown: the key stays pending until reconcile settles it
    WOULD_ROTATE = "would_rotate"  # dry run: validation accepted the key
    ROLLED_BACK = "rolled_back"    # both ends are back on the previous key (verification failed, or asked)
    FAILED = "failed"              # the attempt failed and could not be undone (or an ack timed out)
    WAITING = "waiting"            # a manual device has not acknowledged the key yet; it stays pending


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
    staged_at: str | None = None  # RFC 3339 time pending_psk was staged (ack timeouts)
    acked_rotation_id: str | None = None  # a manual device's acknowledgement of rotation_id's pending key
    # Only on a version that promotes a key (stage clears them): when and how both ends were shown to
    # hold it (one of PROOFS; ``device`` names the device, ``acked_rotation_id`` the acknowledged rotation).
    verified_at: str | None = None
    verified_by: str | None = None
    # Cloudflare's last_generated_on that revealed drift (a key set outside the rotator), on the versions
    # that re-key the tunnel from Vault because of it.
    drift_generated_on: str | None = None

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
                   text("ipsec_id"), text("last_error"), text("cf_generated_on"), text("device"), text("staged_at"),
                   text("acked_rotation_id"), text("verified_at"), text("verified_by"), text("drift_generated_on"))

    def to_data(self) -> dict[str, str]:
        data: dict[str, str] = {"state": self.state, "account_id": self.account_id}
        for name in SECRET_FIELDS:
            value = getattr(self, name)
            if value is not None:
                data[name] = value.reveal()
        for name in _TEXT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        return data


    @property
    def acked(self) -> bool:
        """An operator acknowledged that the manual device holds this record's pending key."""
        return self.state == "pending" and self.pending_psk is not None and self.rotation_id is not None \
            and self.acked_rotation_id == self.rotation_id

    @property
    def rollback_acked(self) -> bool:
        """An operator acknowledged that the manual device is back on ``psk`` (a rollback in flight)."""
        return self.state == "rolling_back" and self.pending_psk is not None and self.rotation_id is not None \
            and self.acked_rotation_id == ROLLBACK_ACK + self.rotation_id


ROLLBACK_ACK = "rollback:"  # acked_rotation_id of a rollback's acknowledgement: never taken for a delivery's


def ack(record: Record, rotation_id: str | None = None, state: str | None = None) -> Record:
    """The record with its pending key acknowledged (``rotator ack``), to be written with CAS: in state
    ``pending``, the manual device holds the pending key; in ``rolling_back``, it is back on ``psk``.

    ``rotation_id``/``state``: what the operator acted on (the rotation whose key they typed in, and
    whether they put the new key on or the old one back). Given, they bind the acknowledgement: when
    the record has moved on (the key was withdrawn and another staged, or a delivery turned into a
    rollback), the acknowledgement would vouch for something the operator never did, so it is refused.

    Raises ValueError when nothing is pending (there is nothing to acknowledge), or it moved on."""
    if record.pending_psk is None or record.state not in ("pending", "rolling_back") or record.rotation_id is None:
        raise ValueError(f"tunnel {record.tunnel_id} has no key waiting for an acknowledgement")
    if (rotation_id is not None and rotation_id != record.rotation_id) or (state is not None and state != record.state):
        raise ValueError(f"tunnel {record.tunnel_id} now waits for rotation {record.rotation_id} ({record.state}), "
                         "not what was acknowledged: check the device and acknowledge again")
    prefix = ROLLBACK_ACK if record.state == "rolling_back" else ""
    return replace(record, acked_rotation_id=prefix + record.rotation_id)


@dataclass(slots=True)
class Lease:
    holder: str
    expires_at: float
    version: int
    busy_until: float = 0.0  # the latest instant a call made under this lease may still land
