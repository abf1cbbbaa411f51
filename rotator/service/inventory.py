"""One view of a tunnel, from its listing, its Vault record, its policy and the clock.

``assess`` is the only place that decides what a tunnel's state is ("unmanaged", "pending",
"drifted" ...): the CLI's ``status``, the daemon's ``/v1/status`` and the metrics all use it.
Pure: no I/O, no metrics, no clock of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rotator.model import WAITING_FOR_OPERATOR, Record, TunnelInfo, ack_command, waits_for
from rotator.rotation.engine import rfc3339
from rotator.rotation.plan import TunnelView as PlanView
from rotator.rotation.plan import due_at, is_drifted, view_of
from rotator.schedule import Policy, next_due

STATES = ("active", "pending", "rolling_back", "unmanaged", "refused", "error")
# What ``status --state`` filters on; "failed", "waiting" and "drifted" are flags beside the record's state.
FILTERS = ("pending", "waiting", "failed", "drifted", "rolling_back", "unmanaged", "active")


@dataclass(frozen=True, slots=True)
class TunnelView:
    tunnel_id: str
    name: str
    state: str  # one of STATES: the record's state (plan.view_of), or why there is none to show
    pending: bool
    drifted: bool
    failed: bool  # the last attempt did not complete (last_error is set)
    last_rotated: float | None
    next_due: float | None
    max_age: float | None
    last_error: str | None = None
    rotation_id: str | None = None
    device: str | None = None
    ipsec_id: str | None = None
    policy: str | None = None
    failures: int = 0
    # A manual device's key in flight: what the tunnel waits for from an operator, and the exact command
    # that acknowledges it (model.waits_for, model.ack_command).
    waits_for: str | None = None
    ack_command: str | None = None
    waiting: bool = False  # the pending key waits for an operator (a manual device): not a failure

    def matches(self, state: str) -> bool:
        """The ``status --state`` filter."""
        return {"pending": self.pending, "waiting": self.waiting, "failed": self.failed, "drifted": self.drifted}.get(
            state, self.state == state)

    @property
    def attention(self) -> bool:
        """Someone should look at it: pending, failed, drifted, rolling back, unreadable."""
        return self.pending or self.waiting or self.failed or self.drifted or \
            self.state in ("rolling_back", "error", "refused")

    def as_dict(self, now: float) -> dict[str, Any]:
        return {"tunnel_id": self.tunnel_id, "name": self.name, "state": self.state, "pending": self.pending,
                "drifted": self.drifted, "failed": self.failed, "waiting": self.waiting,
                "psk_age_seconds": None if self.last_rotated is None else int(now - self.last_rotated),
                "next_due": None if self.next_due is None else rfc3339(self.next_due),
                "policy": self.policy, "rotation_id": self.rotation_id, "device": self.device,
                "ipsec_id": self.ipsec_id, "last_error": self.last_error, "consecutive_failures": self.failures,
                "waits_for": self.waits_for, "ack_command": self.ack_command}


def assess(policy: Policy | None, tunnel: TunnelInfo, record: Record | Exception, now: float,
           failures: int = 0, last_failure: float | None = None, manual: bool = False) -> TunnelView:
    """The tunnel as an operator should see it, by the plan's own rules (rotation/plan.py: state,
    drift, when due). ``policy`` None: no selection of the config covers it. ``manual``: the record's
    device is a manual one (a key in flight waits for an operator's acknowledgement)."""
    name = policy.name if policy else None
    if tunnel.problem:
        return TunnelView(tunnel.id, tunnel.name, "refused", False, False, True, None, None, None,
                          last_error=tunnel.problem, policy=name, failures=failures)
    if isinstance(record, Exception):
        return TunnelView(tunnel.id, tunnel.name, "error", False, False, True, None, None, None,
                          last_error=str(record), policy=name, failures=failures)
    due: float | None = None
    if policy is not None:
        try:
            due = due_at(policy, tunnel, record, now, failures, last_failure)
        except ValueError:
            due = None  # a schedule that never fires (config check refuses it): never due
    return from_plan(view_of(tunnel, record, due, is_drifted(tunnel, record)), policy, failures, record, manual)


def from_plan(seen: PlanView, policy: Policy | None, failures: int = 0, record: Record | None = None,
              manual: bool = False) -> TunnelView:
    """The plan's view of a tunnel (a run's report carries one per tunnel, the record's fields with it),
    with what operators add. ``assess`` comes here too: the CLI's status and the daemon's are one view."""
    max_age = None if policy is None else (policy.max_age or (policy.every or 0) * 1.2 or None)
    wanted = waits_for(record) if record is not None and manual else None
    # A new key waiting for an operator's acknowledgement is in flight as asked, not a failed attempt.
    waiting = seen.pending and seen.state == "pending" and (
        wanted is not None or (seen.last_error or "").startswith(WAITING_FOR_OPERATOR))
    return TunnelView(seen.tunnel_id, seen.name, seen.state, seen.pending, seen.drifted,
                      seen.last_error is not None and not waiting, seen.last_rotated, seen.next_due, max_age,
                      seen.last_error, seen.rotation_id, seen.device, seen.ipsec_id, policy.name if policy else None,
                      failures, wanted[0] if wanted else None,
                      ack_command(record, wanted[1]) if wanted and record is not None else None, waiting)


def rotated(before: TunnelView | None, tunnel: TunnelInfo, policy: Policy, now: float,
            rotation_id: str | None = None) -> TunnelView:
    """The view right after this process rotated the tunnel, where its record could not be read back."""
    max_age = policy.max_age or (policy.every or 0) * 1.2 or None
    return TunnelView(tunnel.id, tunnel.name, "active", False, False, False, now, next_due(policy, tunnel.id, now, now),
                      max_age, None, rotation_id, before.device if before else None,
                      before.ipsec_id if before else None, policy.name)


def summary(views: Iterable[TunnelView]) -> dict[str, int]:
    """Counts for a status summary line: how many tunnels, and how many of them match each filter."""
    views = list(views)
    return {"tunnels": len(views), **{state: sum(1 for v in views if v.matches(state)) for state in FILTERS}}
