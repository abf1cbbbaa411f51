"""Who is in this run, and why: a pure function of the listing, the records, the policies and a clock.

No I/O, no metrics: the engine acts on the plan; the daemon and the CLI read it afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from rotator.errors import VaultError
from rotator.model import Outcome, Record, TunnelInfo
from rotator.schedule import Policy, next_due, parse_time

PolicyFor = Callable[[TunnelInfo], Policy | None]
DueFn = Callable[[TunnelInfo, Record], bool]


class Mode(StrEnum):
    """Where a planned tunnel enters the protocol."""

    FRESH = "fresh"                # due: a new key is staged
    RESUME = "resume"              # pending in Vault: deliver, apply, verify, promote again
    ROLLING_BACK = "rolling_back"  # a rollback was in flight: apply psk, roll the device back, unstage
    ROLLBACK = "rollback"          # asked to go back to previous_psk (the rollback command)


@dataclass(frozen=True, slots=True)
class TunnelView:
    """One tunnel as the plan saw it (no keys): what the daemon's status and metrics are made of."""

    tunnel_id: str
    name: str
    state: str  # unmanaged | active | pending | rolling_back | error
    pending: bool
    last_error: str | None
    last_rotated: float | None
    next_due: float | None
    drifted: bool
    rotation_id: str | None = None  # the record's: who wrote its latest version
    device: str | None = None
    ipsec_id: str | None = None


@dataclass
class Plan:
    entries: list[tuple[TunnelInfo, Record, Mode]] = field(default_factory=list)
    settled: list[tuple[TunnelInfo, Outcome, str]] = field(default_factory=list)  # refused before any change
    drifted: list[str] = field(default_factory=list)
    views: list[TunnelView] = field(default_factory=list)

    def ids(self, mode: Mode) -> list[str]:
        return [t.id for t, _, m in self.entries if m is mode]

    @property
    def due(self) -> list[str]:
        return self.ids(Mode.FRESH)

    @property
    def pending(self) -> list[str]:
        return self.ids(Mode.RESUME) + self.ids(Mode.ROLLING_BACK)

    @property
    def refused(self) -> list[str]:
        return [t.id for t, _, _ in self.settled]


def listed_once(tunnels: Sequence[TunnelInfo]) -> list[TunnelInfo]:
    """The listing with one entry per tunnel id, in listing order. An id listed more than once (under
    one name or several) is a contradictory answer: it becomes one entry, named by every name it was
    listed under, whose ``problem`` says so, so it is reported once and neither read, staged nor sent
    in this run (issue 20 item 1). Idempotent: a listing that names each id once comes back equal."""
    groups: dict[str, list[TunnelInfo]] = {}
    for tunnel in tunnels:
        groups.setdefault(tunnel.id, []).append(tunnel)
    out: list[TunnelInfo] = []
    for tid, group in groups.items():
        if len(group) == 1:
            out.append(group[0])
            continue
        names = list(dict.fromkeys(t.name for t in group))
        why = (f"Cloudflare's listing names tunnel {tid} {len(group)} times (as {', '.join(repr(n) for n in names)}): "
               "a contradictory answer, so it is not rotated in this run and nothing is written or sent for it; "
               "check the tunnel in the Cloudflare dashboard, the next run that sees it listed once rotates it")
        first = next((t.problem for t in group if t.problem), None)
        out.append(replace(group[0], name=" / ".join(names), problem=f"{first}; {why}" if first else why))
    return out


def is_drifted(tunnel: TunnelInfo, record: Record) -> bool:
    """Cloudflare's key changed after our last apply: someone set it outside the rotator."""
    if record.pending_psk is not None or record.psk is None:
        return False  # a pending key may be ours, applied before a crash: not drift
    listed, ours = parse_time(tunnel.last_generated_on), parse_time(record.cf_generated_on)
    return listed is not None and ours is not None and listed > ours


def due_at(policy: Policy, tunnel: TunnelInfo, record: Record, now: float, failures: int = 0,
           last_failure: float | None = None) -> float:
    """When the tunnel is next due. A tunnel whose key is not in Vault yet is due now."""
    rotated = parse_time(record.rotated_at) if record.psk is not None else None
    return next_due(policy, tunnel.id, rotated, now, failures, last_failure)


def view_of(tunnel: TunnelInfo, rec: Record, due: float | None, drifted: bool) -> TunnelView:
    state = "unmanaged" if rec.version == 0 else rec.state
    last = parse_time(rec.rotated_at) or parse_time(tunnel.last_generated_on)
    return TunnelView(tunnel.id, tunnel.name, state, rec.pending_psk is not None, rec.last_error, last, due, drifted,
                      rec.rotation_id, rec.device, rec.ipsec_id)


def _mode(tunnel: TunnelInfo, rec: Record, due: bool, drifted: bool, rollback: bool, on_drift: str) -> Mode | None:
    if rec.pending_psk is not None:  # asked to roll back a key in flight: abandon it, both ends back on psk
        return Mode.ROLLING_BACK if rec.state == "rolling_back" or rollback else Mode.RESUME
    if rollback:
        return Mode.ROLLBACK
    if due or (drifted and on_drift == "rotate"):
        return Mode.FRESH
    return None


def plan(tunnels: Sequence[TunnelInfo], records: Mapping[str, Record | VaultError], policies: PolicyFor | None,
         now: float, *, due: DueFn | None = None, reconcile_only: bool = False, rollback: bool = False,
         on_drift: str = "rotate", failures: Mapping[str, tuple[int, float | None]] | None = None) -> Plan:
    """Sort the selected tunnels into modes. ``policies`` None: every selected tunnel is due (on-demand
    rotation); a tunnel without a policy is not. ``due`` overrides the schedule's predicate."""
    out = Plan()
    for tunnel in listed_once(tunnels):
        rec = records.get(tunnel.id)
        if tunnel.problem is not None or rec is None:
            out.settled.append((tunnel, Outcome.REFUSED, tunnel.problem or "no record was read for this tunnel"))
            continue
        if isinstance(rec, VaultError):
            out.settled.append((tunnel, Outcome.UNAPPLIED, f"reading Vault: {rec}"))
            continue
        policy = policies(tunnel) if policies is not None else None
        fails, last_failure = (failures or {}).get(tunnel.id, (0, None))
        when = due_at(policy, tunnel, rec, now, fails, last_failure) if policy is not None else None
        is_due = due(tunnel, rec) if due is not None else policies is None or (when is not None and when <= now)
        drifted = is_drifted(tunnel, rec)
        if drifted:
            out.drifted.append(tunnel.id)
        out.views.append(view_of(tunnel, rec, when, drifted))
        mode = _mode(tunnel, rec, is_due and not reconcile_only, drifted, rollback, on_drift)
        if mode is Mode.ROLLBACK and rec.previous_psk is None:
            out.settled.append((tunnel, Outcome.REFUSED, "no previous key to roll back to"))
        elif mode is not None:
            out.entries.append((tunnel, rec, mode))
    return out
