"""Plain data shared by the adapters and the engine: tunnels, records, leases, PSK-set results.

Standard library only, so the engine can speak of them without importing httpx or hvac.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from rotator.secret import Secret

SECRET_FIELDS = ("psk", "pending_psk", "previous_psk")
_TEXT_FIELDS = ("rotation_id", "rotated_at", "tunnel_name", "ipsec_id", "last_error", "cf_generated_on", "device",
                "staged_at", "acked_rotation_id", "verified_at", "verified_by", "drift_generated_on")

# How both ends were shown to hold a promoted key (``verified_by``, docs/design.md section 3): a device's
# proof (rotation/ports.PROOFS), Cloudflare's health checks, or nothing.
VERIFIED_BY = ("ike_reauth", "vendor_status", "operator_ack", "health", "none")


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


# Every reason of a WAITING outcome starts so (steps, devices/manual.py): status tells waiting from failed by it.
WAITING_FOR_OPERATOR = "waiting for an operator to "


class RepeatedTunnel(AssertionError):
    """A batch that names one tunnel twice reached a step or a store: a programming error.

    Every step builds ``{tunnel id: key}`` maps and writes one record per tunnel, so a repeated id
    would send or stage one of two keys at random (issue 20 item 1). The plan reports a listing that
    names a tunnel twice; nothing after it may ever see one."""


def check_distinct(ids: Iterable[str], where: str) -> None:
    """Raise RepeatedTunnel when ``ids`` names a tunnel twice."""
    seen: set[str] = set()
    for tid in ids:
        if tid in seen:
            raise RepeatedTunnel(f"{where}: tunnel {tid} appears twice in one batch (a programming error: "
                                 "the plan takes each tunnel once)")
        seen.add(tid)


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
    # hold it (one of VERIFIED_BY; ``device`` names the device, ``acked_rotation_id`` the acknowledged rotation).
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
HOLDS = ("new", "previous")  # what an acknowledgement confirms the manual device holds (rotator ack --holds)


class AckRefused(ValueError):
    """An acknowledgement that does not match the record: nothing waits, it is ambiguous, or the
    record has moved on. The message names the current state and the exact command to use."""


def ack_command(record: Record, holds: str) -> str:
    """The exact acknowledgement for what ``record`` waits for (printed by runs, status and refusals)."""
    return (f"rotator ack --account {record.account_id} --tunnel {record.tunnel_id} "
            f"--rotation {record.rotation_id} --holds {holds}")


def waits_for(record: Record) -> tuple[str, str] | None:
    """What a record with a key in flight waits for from a manual device's operator, and which
    ``--holds`` confirms it; None when nothing is in flight. (Whether the tunnel's device is manual is
    the caller's to know: an automatic device is not waited for.)"""
    if record.pending_psk is None or record.rotation_id is None:
        return None
    if record.state == "rolling_back":
        return (f"the device to be back on its previous key (rotation {record.rotation_id}'s new key is being "
                "withdrawn)", "previous")
    if record.state == "pending":
        return f"the device to hold the new key of rotation {record.rotation_id}", "new"
    return None


def ack(record: Record, holds: str | None = None, rotation_id: str | None = None) -> Record:
    """The record with its pending key acknowledged (``rotator ack``), to be written with CAS.

    ``holds``: what the operator confirms the manual device holds: ``new`` (the pending key, state
    ``pending``) or ``previous`` (``psk`` again, while state is ``rolling_back``). ``rotation_id``:
    the rotation whose key they acted on (printed by the waiting run and by ``status``). Raises
    AckRefused, naming the current state and the exact command, when nothing waits, when ``holds``
    is missing (the same words would mean opposite things in ``pending`` and ``rolling_back``), when
    it is not what the record waits for, or when the record has moved on to another rotation; a
    refused acknowledgement changes nothing, so every key the device may hold stays readable."""
    wanted = waits_for(record)
    if wanted is None:
        raise AckRefused(f"tunnel {record.tunnel_id} has no key waiting for an acknowledgement (state "
                         f"{record.state}): check 'rotator status --account {record.account_id}'")
    what, expected = wanted
    command = ack_command(record, expected)
    if holds is not None and holds not in HOLDS:
        raise AckRefused(f"--holds must be one of {', '.join(HOLDS)}, not {holds!r}")
    if rotation_id is not None and rotation_id != record.rotation_id:
        raise AckRefused(f"tunnel {record.tunnel_id} now waits for {what} ({record.state}), not for rotation "
                         f"{rotation_id}: the record has moved on; check what the device holds, then run '{command}'")
    if holds is None:
        raise AckRefused(f"tunnel {record.tunnel_id} waits for {what} ({record.state}): say what the device holds; "
                         f"once it does, run '{command}'")
    if holds != expected and expected == "previous":
        raise AckRefused(f"tunnel {record.tunnel_id} is rolling back rotation {record.rotation_id}: its new key is "
                         "being withdrawn and will not be applied (both keys stay in Vault meanwhile); put the "
                         f"previous key back on the device, then run '{command}'")
    if holds != expected:
        raise AckRefused(f"tunnel {record.tunnel_id} waits for the new key of rotation {record.rotation_id} "
                         f"(pending), so there is nothing to go back from: once the device holds the new key run "
                         f"'{command}'; to abandon the key run 'rotator rollback --account {record.account_id} "
                         f"--tunnel {record.tunnel_id}'")
    prefix = ROLLBACK_ACK if record.state == "rolling_back" else ""
    return replace(record, acked_rotation_id=f"{prefix}{record.rotation_id}")


@dataclass(slots=True)
class Lease:
    holder: str
    expires_at: float
    version: int
    busy_until: float = 0.0  # the latest instant a call made under this lease may still land
    admin_url: str = ""  # a daemon holder's admin API, where one-shot commands hand their requests (issue 20)
