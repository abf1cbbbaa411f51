"""The protocol's steps (docs/design.md section 4), each a function with one contract:

    step(ctx, items) -> Result(moved, settled, back, halt)

``moved`` go on to the next step; ``settled`` are done with an outcome (``UNKNOWN`` = left pending for
reconcile); ``back`` must be taken back (the BACKWARD steps: Vault marks the rollback first, then
Cloudflare and the device are returned to ``psk``, then the record is unstaged); ``halt`` says why the
run should stop after this batch. Steps never record outcomes themselves: the engine tallies them.

Safety rules every step follows: never unstage a key that Cloudflare or the device may hold
(``Item.cf_may_hold``/``Item.dev_may_hold``); anything ambiguous or contradictory stays pending.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from rotator.errors import CasConflict, CloudflareError, RotatorError, VaultError
from rotator.model import Outcome, PskSetResult, Record, TunnelInfo, ack_command, check_distinct
from rotator.rotation.plan import Mode, is_drifted
from rotator.rotation.ports import (
    Device,
    DeviceResult,
    DeviceStatus,
    DeviceTunnel,
    Health,
    HealthState,
    RecordStore,
    TunnelApi,
)
from rotator.secret import Secret

PARTNER_DOWN = "partner down"


class LeaseLost(RotatorError):
    """The account lease could not be renewed before a call that changes a key."""


@dataclass(slots=True, eq=False)
class Item:
    tunnel: TunnelInfo
    record: Record
    mode: Mode
    key: Secret  # the key both ends should hold when this item succeeds (the record's pending_psk)
    device: Device | None = None
    cf_may_hold: bool = False   # Cloudflare may hold ``key``: taking it back needs an apply of psk
    dev_may_hold: bool = False  # the device may hold ``key``: taking it back needs a device rollback
    dev_refused: bool = False   # the device definitely did not take ``key`` (it said so)
    outcome: Outcome | None = None  # the outcome once taken back
    reason: str | None = None
    final: tuple[Outcome, str] | None = None  # promote, but report this instead of success
    generated_on: str | None = None
    ipsec_id: str | None = None
    applied_at: float | None = None
    dev_verified: bool = False  # the device's verification succeeded (verify step)
    health: HealthState | None = None  # what Cloudflare's health checks said since the apply (check_health)
    restored: bool = False  # Cloudflare was given psk back (restore_cloudflare); generated_on is its answer
    # The redundant pair, as the device names it (Device.pair_of; by default the customer endpoint),
    # and the other tunnels of that pair (for partner gating). Set by the engine at planning.
    pair_key: str | None = None
    partners: tuple[TunnelInfo, ...] = ()

    @property
    def id(self) -> str:
        return self.tunnel.id

    @property
    def pair(self) -> tuple[str, str] | None:
        """A redundant pair: tunnels of one device that the device names as one pair."""
        if self.device is None or self.pair_key is None:
            return None
        return self.device.name, self.pair_key

    @property
    def reconcile(self) -> bool:
        return self.mode in (Mode.RESUME, Mode.ROLLING_BACK)

    def going_back(self, outcome: Outcome, reason: str) -> Item:
        self.outcome, self.reason = outcome, reason
        return self


Settled = tuple[Item, Outcome, "str | None"]


@dataclass
class Result:
    moved: list[Item] = field(default_factory=list)
    settled: list[Settled] = field(default_factory=list)
    back: list[Item] = field(default_factory=list)
    halt: str | None = None

    def settle(self, item: Item, outcome: Outcome, reason: str | None = None) -> None:
        self.settled.append((item, outcome, reason))


@dataclass
class Context:
    """What steps may use. ``cover(seconds, resend)`` runs one mutating call of total deadline
    ``seconds`` under the lease (the engine's lease guard): it yields the latest UNIX time an attempt
    may start (None: no bound), or raises LeaseLost before anything is sent. ``resend``: the call
    only re-sends keys already pending in Vault."""

    account_id: str
    rotation_id: str
    dry_run: bool
    api: TunnelApi
    store: RecordStore
    cover: Callable[[float, bool], AbstractContextManager[float | None]]
    redact: Callable[[str], str]
    pool: concurrent.futures.Executor
    log: Any
    clock: Callable[[], float] = time.time
    ack_timeout: float | None = None
    health: Health | None = None  # Cloudflare's tunnel health, judged after the apply (optional)
    call_timeout: float = 30.0  # the total deadline of one Cloudflare call
    health_timeout: float = 30.0
    busy_pairs: set[tuple[str, str]] = field(default_factory=set)  # pairs with a key left in flight
    partner_down: set[str] = field(default_factory=set)  # tunnels that waited because their partner was down
    keepalive: Callable[[], object] = lambda: None  # renews the lease while a long verify polls
    keepalive_every: float = 30.0


Step = Callable[[Context, list[Item]], Result]


def rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _write(ctx: Context, pairs: Sequence[tuple[Item, Record]]) -> dict[str, Record | VaultError]:
    """CAS-write the records; items of successful writes carry the new version."""
    if not pairs:
        return {}
    written = ctx.store.write_many([r for _, r in pairs])
    for item, _ in pairs:
        res = written.get(item.id, VaultError("no answer for this record", ambiguous=True))
        written[item.id] = res
        if isinstance(res, Record):
            item.record = res
    return written


def _contradiction(tid: str, verdict: PskSetResult) -> str | None:
    if tid in verdict.ambiguous:
        return verdict.ambiguous[tid]
    if tid in verdict.applied and tid in verdict.unapplied:
        return "reported both applied and unapplied"
    return None


# -- forward ---------------------------------------------------------------------------------------

def stage(ctx: Context, items: list[Item]) -> Result:
    """Write pending_psk=key, state=pending with CAS (fresh keys and rollbacks); pending ones pass."""
    out = Result(moved=[i for i in items if i.mode is Mode.RESUME])
    todo = [i for i in items if i.mode in (Mode.FRESH, Mode.ROLLBACK)]
    if ctx.dry_run:
        out.moved.extend(todo)
        return out
    now = rfc3339(ctx.clock())
    written = _write(ctx, [(i, dataclasses.replace(
        i.record, pending_psk=i.key, state="pending", rotation_id=ctx.rotation_id, tunnel_name=i.tunnel.name,
        device=i.device.name if i.device else None, staged_at=now, acked_rotation_id=None, verified_at=None,
        verified_by=None, drift_generated_on=i.tunnel.last_generated_on if is_drifted(i.tunnel, i.record) else None))
        for i in todo])
    for item in todo:
        res = written[item.id]
        if isinstance(res, CasConflict):
            out.settle(item, Outcome.SKIPPED, "record changed since it was read (another rotator?)")
        elif isinstance(res, VaultError):
            out.settle(item, Outcome.UNKNOWN if res.ambiguous else Outcome.UNAPPLIED, f"staging in Vault failed: {res}")
        else:
            out.moved.append(item)
    return out


def validate(ctx: Context, items: list[Item]) -> Result:
    """POST .../psk?validate_only=true with exactly these keys. Refused ones go back."""
    out = Result()
    try:
        verdict = ctx.api.set_psks(ctx.account_id, {i.id: i.key for i in items}, validate_only=True)
    except CloudflareError as exc:
        ctx.log.warning("validate_failed", step="validate", error=ctx.redact(str(exc)), tunnels=len(items))
        # A key an earlier run may have sent stays pending: the failed call says nothing about it.
        for item in [i for i in items if i.reconcile]:
            out.settle(item, Outcome.UNKNOWN, f"validation call failed: {exc}; key left pending for reconcile")
        out.back = [i.going_back(Outcome.UNAPPLIED, f"validation call failed: {exc}") for i in items
                    if not i.reconcile]
        out.halt = f"stopped after the validation call failed: {exc}"
        return out
    for item in items:
        odd = _contradiction(item.id, verdict)
        if odd is not None:
            out.settle(item, Outcome.UNKNOWN, f"contradictory validation answer ({odd}); key left pending")
        elif item.id in verdict.unapplied:
            out.back.append(item.going_back(Outcome.REFUSED, f"refused by validation: {verdict.unapplied[item.id]}"))
        elif item.id not in verdict.applied:
            out.back.append(item.going_back(Outcome.REFUSED, "refused by validation: not acknowledged by validate_only"))
        else:  # a dry run goes on too: deliver's checks answer what the run would (issue 20 item 9)
            out.moved.append(item)
    return out


def deliver(ctx: Context, items: list[Item]) -> Result:
    """Hand each key to its far-end device; acknowledged manual keys and device-less tunnels pass.
    A fresh key waits while its redundant partner's key is still in flight, or, where the deliver
    interrupts the tunnel, while its partner is not up (it goes back untouched). A key that breaks
    the device's key rules is never sent (docs/design.md section 10)."""
    out = Result(back=_held_back(ctx, items))
    items = [i for i in items if i not in out.back]
    for item in [i for i in items if _moved_away(i)]:
        out.settle(item, Outcome.UNKNOWN, _moved_away(item))
    items = [i for i in items if not _moved_away(i)]
    if ctx.dry_run:  # the last check a dry run passes: nothing is handed to a device
        out.settled.extend((i, Outcome.WOULD_ROTATE, None) for i in items)
        return out
    out.moved = [i for i in items if i.device is None or i.record.acked]
    for item in out.moved:
        item.dev_may_hold = item.device is not None
    calls = [i for i in items if i.device is not None and not i.record.acked]
    for item in calls:
        item.dev_may_hold = True
    for item, res in device_call(ctx, calls, "deliver"):
        if res.status is DeviceStatus.OK:
            out.moved.append(item)
        elif res.status is DeviceStatus.FAILED:
            item.dev_refused = not item.reconcile  # an earlier run may have delivered it
            out.back.append(item.going_back(Outcome.REFUSED, f"device refused the key: {res.reason or 'no reason'}"))
        elif res.status is DeviceStatus.WAITING:
            _waiting(ctx, item, out)
        else:
            out.settle(item, Outcome.UNKNOWN, f"delivery outcome unknown: {res.reason or 'no answer'}; key left pending")
    return out


def _held_back(ctx: Context, items: list[Item]) -> list[Item]:
    """What deliver takes back untouched before any device call: a fresh key whose partner's key is
    in flight, a key that breaks the device's key rules (never sent), a fresh key whose deliver would
    take the tunnel down while no redundant partner is up."""
    back = [i.going_back(Outcome.SKIPPED, "its redundant partner on the same device has a key in flight; "
                         "it is rotated once that one settles")
            for i in items if not i.reconcile and i.pair in ctx.busy_pairs]
    for item in [i for i in items if i.device is not None and not i.record.acked and i not in back]:
        assert item.device is not None
        broken = item.device.key_rules.refuses(item.key.reveal())
        if broken is not None:
            item.dev_refused = not item.reconcile
            back.append(item.going_back(Outcome.REFUSED, f"the key breaks device {item.device.name}'s key rules "
                                        f"({broken}); not sent: fix the PSK policy"))
    fresh = [i for i in items if not i.reconcile and not i.record.acked and i not in back]
    for item, why in _partners_down(ctx, fresh).items():
        ctx.partner_down.add(item.id)
        back.append(item.going_back(Outcome.SKIPPED, f"{PARTNER_DOWN}: {why}; the tunnel is rotated once its "
                                    "partner is up again"))
    return back


def _partners_down(ctx: Context, items: list[Item]) -> dict[Item, str]:
    """Items whose deliver would take the tunnel down while no redundant partner is known to be up:
    the vendor's own status first (Device.tunnels_up), then Cloudflare's tunnel health. A tunnel
    known to be down already is not held back: its deliver takes nothing down (and holding it back
    would keep a pair whose two tunnels are down from ever healing)."""
    gated = [i for i in items if i.device is not None and i.device.interrupts and i.partners]
    if not gated:
        return {}
    up: dict[str, bool] = {}
    by_device: dict[int, list[Item]] = {}
    for item in gated:
        by_device.setdefault(id(item.device), []).append(item)
    for group in by_device.values():
        device = group[0].device
        assert device is not None
        partners = list({p.id: p for i in group for p in (i.tunnel, *i.partners)}.values())
        try:
            up.update(device.tunnels_up(ctx.account_id, partners, deadline=time.monotonic() + device.timeout))
        except Exception as exc:  # a device must not raise; no answer is "not known"
            ctx.log.warning("partner_status_failed", step="deliver", device=device.name, error=ctx.redact(str(exc)))
    unknown = sorted({p.name: p for i in gated for p in (i.tunnel, *i.partners) if p.id not in up}.values(),
                     key=lambda p: p.name)
    if unknown and ctx.health is not None:
        try:
            health = ctx.health.tunnel_health(ctx.account_id, [p.name for p in unknown], since=ctx.clock() - 300.0,
                                              deadline=time.monotonic() + ctx.health_timeout)
        except Exception as exc:  # no answer is "not known"
            ctx.log.warning("partner_health_failed", step="deliver", error=ctx.redact(str(exc)))
            health = {}
        for p in unknown:
            if p.name in health and health[p.name] is not HealthState.NO_DATA:
                up[p.id] = health[p.name] is HealthState.HEALTHY
    down: dict[Item, str] = {}
    for item in gated:
        if up.get(item.id) is False or any(up.get(p.id) for p in item.partners):
            continue
        states = ", ".join(f"{p.name} {'down' if p.id in up else 'state unknown'}" for p in item.partners)
        down[item] = f"delivering takes the tunnel down and no redundant partner is up ({states})"
    return down


def _moved_away(item: Item) -> str | None:
    """The pending key was handed to a device the configuration no longer names for this tunnel: that
    device may hold it, and neither a delivery elsewhere nor a rollback elsewhere settles it."""
    held_by = item.record.device if item.record.pending_psk is not None else None
    if held_by is None or held_by == (item.device.name if item.device is not None else None):
        return None
    return (f"the pending key was handed to device {held_by}, which the configuration no longer names for "
            f"this tunnel: it may hold the key, so the key stays pending (name {held_by} for the tunnel again "
            "to finish or roll back)")


def _waiting(ctx: Context, item: Item, out: Result) -> None:
    from rotator.model import WAITING_FOR_OPERATOR
    from rotator.schedule import format_duration, parse_time

    staged = parse_time(item.record.staged_at)
    limit = (item.device.ack_timeout if item.device is not None else None) or ctx.ack_timeout
    if limit is not None and staged is not None and ctx.clock() - staged > limit:
        # Not acknowledged is not refused: the operator may have typed the key in without saying so.
        # The rollback asks them to put psk back and acknowledge that; both keys stay readable until then.
        out.back.append(item.going_back(Outcome.FAILED, f"not acknowledged within {format_duration(limit)} "
                                        f"(ack_timeout): the key is being withdrawn"))
    else:
        out.settle(item, Outcome.WAITING, f"{WAITING_FOR_OPERATOR}put the new key of rotation "
                   f"{item.record.rotation_id} on device {item.device.name if item.device else '?'} and "
                   f"acknowledge it: {ack_command(item.record, 'new')}")


def apply(ctx: Context, items: list[Item]) -> Result:
    """POST .../psk with the delivered keys."""
    out = Result()
    try:
        with ctx.cover(ctx.call_timeout, all(i.reconcile for i in items)) as deadline:
            verdict = ctx.api.set_psks(ctx.account_id, {i.id: i.key for i in items}, validate_only=False,
                                       deadline=deadline)
    except LeaseLost as exc:
        for item in items:  # not applying is always safe: the keys stay pending for the lease holder
            out.settle(item, Outcome.SKIPPED, f"lease lost before apply ({exc}); the staged key is left for the "
                       "lease holder to reconcile")
        out.halt = "lease lost"
        return out
    except CloudflareError as exc:
        return _apply_failed(ctx, items, exc)
    for item in items:
        _apply_one(item, verdict, out)
    return out


def _apply_failed(ctx: Context, items: list[Item], exc: CloudflareError) -> Result:
    ctx.log.warning("apply_failed", step="apply", error=ctx.redact(str(exc)), ambiguous=exc.ambiguous,
                    tunnels=len(items))
    out = Result(halt=f"stopped after the apply call failed: {exc}")
    for item in items:
        if exc.ambiguous:
            item.cf_may_hold = True
            out.settle(item, Outcome.UNKNOWN, f"apply outcome unknown ({exc}); key left pending for reconcile")
        else:
            out.back.append(item.going_back(Outcome.UNAPPLIED, f"apply failed: {exc}"))
    return out


def _apply_one(item: Item, verdict: PskSetResult, out: Result) -> None:
    odd = _contradiction(item.id, verdict)
    if odd is not None or item.id in verdict.applied or item.id not in verdict.unapplied:
        item.cf_may_hold = True
    item.ipsec_id = verdict.ipsec_ids.get(item.id, item.ipsec_id)
    if odd is not None:
        out.settle(item, Outcome.UNKNOWN, f"contradictory apply answer ({odd}); key left pending for reconcile")
    elif item.id in verdict.applied:
        item.generated_on, item.applied_at = verdict.generated_on.get(item.id), time.time()
        out.moved.append(item)
    elif item.id in verdict.unapplied:
        out.back.append(item.going_back(Outcome.UNAPPLIED, f"unapplied: {verdict.unapplied[item.id]}"))
    else:
        out.settle(item, Outcome.UNKNOWN, "Cloudflare did not report this tunnel; key left pending for reconcile")


def _undone(item: Item) -> Outcome:
    """Both ends went back to psk: a rotation was rolled back; a rollback (to previous_psk) failed."""
    return Outcome.FAILED if item.mode is Mode.ROLLBACK else Outcome.ROLLED_BACK


def verify(ctx: Context, items: list[Item]) -> Result:
    """The device forces a fresh IKE authentication with the new key; a failure rolls both ends back."""
    checked = [i for i in items if i.device is not None and i.device.verifies]
    out = Result(moved=[i for i in items if i not in checked])
    for item, res in device_call(ctx, checked, "verify"):
        if res.ok:
            item.dev_verified = True
            out.moved.append(item)
        elif res.status is not DeviceStatus.FAILED:
            out.settle(item, Outcome.UNKNOWN, f"verification outcome unknown: {res.reason or 'no answer'}; "
                       "key left pending for reconcile")
        elif item.record.psk is None:
            item.final = (Outcome.FAILED, f"verification failed ({res.reason or 'no reason'}), and this is the "
                          "tunnel's first key: there is no previous key to roll back to, so the new key is kept")
            out.moved.append(item)
        else:
            out.back.append(item.going_back(_undone(item), f"verification failed: {res.reason or 'no reason'}"))
    return out


def check_health(ctx: Context, items: list[Item]) -> Result:
    """Optionally, Cloudflare's health checks since the apply: a tunnel reported down rolls back."""
    if ctx.health is None or not items:
        return Result(moved=list(items))
    out = Result()
    since = min(i.applied_at or ctx.clock() for i in items)
    try:
        states = ctx.health.tunnel_health(ctx.account_id, [i.tunnel.name for i in items], since=since,
                                          deadline=time.monotonic() + ctx.health_timeout)
    except Exception as exc:  # health is a second opinion: no answer changes nothing
        ctx.log.warning("health_failed", step="check_health", error=ctx.redact(str(exc)))
        states = {}
    for item in items:
        item.health = states.get(item.tunnel.name)
        if item.health is HealthState.DOWN and item.record.psk is not None:
            out.back.append(item.going_back(_undone(item), "Cloudflare's health checks report the tunnel "
                                            "down since the new key was applied"))
        else:
            out.moved.append(item)
    return out


def note(ctx: Context, settled: Sequence[Settled]) -> None:
    """Record why an attempt did not complete in a record that stays pending (last_error, ipsec_id)."""
    if ctx.dry_run:
        return
    pairs = [(i, dataclasses.replace(i.record, last_error=ctx.redact(r)[:500], ipsec_id=i.ipsec_id or i.record.ipsec_id))
             for i, o, r in settled if r and o in (Outcome.UNKNOWN, Outcome.WAITING)
             and i.record.version and i.record.pending_psk is not None and i.record.last_error != ctx.redact(r)[:500]]
    try:
        _write(ctx, pairs)
    except VaultError as exc:  # best effort: the outcome already says it
        ctx.log.warning("note_failed", error=ctx.redact(str(exc)))


def verified_by(item: Item) -> str:
    """How both ends were shown to hold ``item.key`` (the record's ``verified_by``, docs/design.md section 3),
    from what the verify and health steps saw: the device's proof when its verification succeeded, an
    operator's acknowledgement for a manual device, else Cloudflare's health checks when they reported
    the tunnel healthy since the apply, else ``none`` (no device, or nothing proved it)."""
    device = item.device
    if device is not None and item.dev_verified:
        return device.proof  # what the kind's verification shows (ports.PROOFS; docs/design.md sections 9, 10)
    if device is not None and item.record.acked:
        return "operator_ack"
    if item.health is HealthState.HEALTHY:
        return "health"
    return "none"


def promote(ctx: Context, items: list[Item]) -> Result:
    """psk=key, previous_psk=old psk, nothing pending, state=active, rotated_at, cf_generated_on, and the
    proof: verified_at, verified_by (with device / acked_rotation_id)."""
    out = Result()
    now = rfc3339(ctx.clock())
    wanted = {i.id: dataclasses.replace(
        i.record, psk=i.key, pending_psk=None, previous_psk=i.record.psk, state="active", rotation_id=ctx.rotation_id,
        rotated_at=now, tunnel_name=i.tunnel.name, last_error=ctx.redact(i.final[1]) if i.final else None,
        cf_generated_on=i.generated_on or i.record.cf_generated_on, ipsec_id=i.ipsec_id or i.record.ipsec_id,
        device=i.device.name if i.device else i.record.device, staged_at=None,
        acked_rotation_id=i.record.acked_rotation_id if verified_by(i) == "operator_ack" else None,
        verified_at=now, verified_by=verified_by(i))
        for i in items}
    written = ctx.store.write_many(list(wanted.values())) if wanted else {}
    for item in items:
        res = written.get(item.id, VaultError("no answer for this record", ambiguous=True))
        if isinstance(res, CasConflict):
            res = _promote_after_conflict(ctx, item, wanted[item.id])
        if isinstance(res, VaultError):
            ctx.log.warning("promote_failed", step="promote", tunnel=item.id, error=ctx.redact(str(res)))
            out.settle(item, Outcome.UNKNOWN, f"applied, but promoting in Vault failed ({res}); "
                       "the key stays pending until reconcile")
        else:
            item.record = res
            success = Outcome.ROLLED_BACK if item.mode is Mode.ROLLBACK else Outcome.ROTATED
            out.settle(item, *(item.final or (success, None)))
    return out


def _promote_after_conflict(ctx: Context, item: Item, wanted: Record) -> Record | VaultError:
    """Promotion is idempotent: already promoted with our key is success; still pending, retry once."""
    try:
        current = ctx.store.read(item.record.account_id, item.id)
    except VaultError as exc:
        return exc
    if current.pending_psk is None and current.psk == item.key:
        return current
    if current.state == "rolling_back":  # someone is returning both ends to psk: never promote over that
        return VaultError("a rollback of this key was recorded during promotion", "run reconcile")
    if current.pending_psk == item.key:
        retry = dataclasses.replace(wanted, version=current.version, previous_psk=current.psk)
        return ctx.store.write_many([retry]).get(item.id, VaultError("no answer", ambiguous=True))
    return VaultError("record moved on to another key during promotion", "run reconcile")


# -- backward: take a key back, Vault first --------------------------------------------------------

def mark_rolling_back(ctx: Context, items: list[Item]) -> Result:
    """Where Cloudflare may hold the key, record state=rolling_back before touching it."""
    out = Result(moved=[i for i in items if not i.cf_may_hold or i.record.state == "rolling_back" or ctx.dry_run])
    todo = [i for i in items if i not in out.moved]
    for item in [i for i in todo if i.record.psk is None]:
        out.settle(item, Outcome.UNKNOWN, f"{item.reason}; Cloudflare may hold the new key and there is no "
                   "previous key to go back to: the key stays pending")
    todo = [i for i in todo if i.record.psk is not None]
    written = _write(ctx, [(i, dataclasses.replace(i.record, state="rolling_back",
                                                   last_error=ctx.redact(i.reason or ""))) for i in todo])
    for item in todo:
        res = written[item.id]
        if isinstance(res, VaultError):
            out.settle(item, Outcome.UNKNOWN, f"{item.reason}; recording the rollback in Vault failed ({res}): "
                       "the key stays pending")
        else:
            out.moved.append(item)
    return out


def restore_cloudflare(ctx: Context, items: list[Item]) -> Result:
    """Validate, then apply, ``psk`` again where Cloudflare may hold the abandoned key."""
    out = Result(moved=[i for i in items if not i.cf_may_hold or ctx.dry_run])
    todo = [i for i in items if i not in out.moved]
    if not todo:
        return out
    keys = {i.id: i.record.psk for i in todo if i.record.psk is not None}
    checked = PskSetResult()
    try:
        checked = ctx.api.set_psks(ctx.account_id, keys, validate_only=True)
        ok = [i for i in todo if i.id in checked.applied and _contradiction(i.id, checked) is None]
        done = _apply_back(ctx, {i.id: keys[i.id] for i in ok}) if ok else PskSetResult()
    except (CloudflareError, LeaseLost) as exc:
        done, failure = PskSetResult(), str(exc)
    else:
        failure = "Cloudflare did not take the previous key back"
    for item in todo:
        if item.id in done.applied and _contradiction(item.id, done) is None:
            item.cf_may_hold = False
            item.restored, item.generated_on = True, done.generated_on.get(item.id)  # unstage records it
            out.moved.append(item)
        else:
            out.settle(item, Outcome.UNKNOWN, f"{item.reason}; restoring the previous key at Cloudflare failed "
                       f"({done.unapplied.get(item.id) or checked.unapplied.get(item.id) or failure}): "
                       f"left {item.record.state} for reconcile")
    return out


def _apply_back(ctx: Context, keys: dict[str, Secret]) -> PskSetResult:
    with ctx.cover(ctx.call_timeout, False) as deadline:
        return ctx.api.set_psks(ctx.account_id, keys, validate_only=False, deadline=deadline)


def restore_device(ctx: Context, items: list[Item]) -> Result:
    """Tell the device to go back to ``psk`` where it may hold the abandoned key."""
    out = Result()
    for item in [i for i in items if _moved_away(i) and not ctx.dry_run]:
        out.settle(item, Outcome.UNKNOWN, f"{item.reason}; {_moved_away(item)}")
    items = [i for i in items if not _moved_away(i) or ctx.dry_run]
    todo = [i for i in items if i.dev_may_hold and i.device is not None and i.record.psk is not None
            and not ctx.dry_run]
    out.moved = [i for i in items if i not in todo and (not i.dev_may_hold or i.dev_refused or ctx.dry_run)]
    for item in [i for i in items if i not in todo and i not in out.moved]:
        out.settle(item, Outcome.UNKNOWN, f"{item.reason}; the device may hold the new key and there is no "
                   "previous key to go back to: the key stays pending")
    for item, res in device_call(ctx, todo, "rollback"):
        # A manual device answers WAITING: the operator is asked to go back and acknowledge that
        # (``rotator ack`` on the rolling_back record); until then the device may hold either key.
        if res.ok or (res.status is DeviceStatus.WAITING and (item.dev_refused or item.record.rollback_acked)):
            item.dev_may_hold = False
            out.moved.append(item)
        elif res.status is DeviceStatus.WAITING:
            out.settle(item, Outcome.UNKNOWN, f"{item.reason}; waiting for an operator to put the previous key "
                       f"back on device {item.device.name if item.device else '?'} and acknowledge it: "
                       f"{ack_command(item.record, 'previous')}")
        else:
            out.settle(item, Outcome.UNKNOWN, f"{item.reason}; rolling the device back failed "
                       f"({res.reason or res.status}): the key stays pending")
    return out


def unstage(ctx: Context, items: list[Item]) -> Result:
    """Neither end holds the key any more: drop pending_psk, state=active, with the reason. Where the
    rollback applied ``psk`` at Cloudflare again, its ``last_generated_on`` moved: record it as
    ``cf_generated_on``, or every later listing would take the rollback for drift (issue 20 item 6)."""
    out = Result()
    written = {} if ctx.dry_run else _write(ctx, [(i, dataclasses.replace(
        i.record, pending_psk=None, state="active", staged_at=None, acked_rotation_id=None,
        cf_generated_on=(i.restored and i.generated_on) or i.record.cf_generated_on,
        last_error=ctx.redact(i.reason or "")[:500] or None)) for i in items])
    for item in items:
        res = written.get(item.id)
        reason = item.reason
        if isinstance(res, VaultError):  # harmless: no end holds the pending key; the next run retries
            ctx.log.warning("unstage_failed", step="unstage", tunnel=item.id, error=ctx.redact(str(res)))
            reason = f"{reason}; unstaging in Vault failed ({res}), the next run finishes it"
        out.settle(item, item.outcome or Outcome.UNKNOWN, reason)
    return out


# -- device calls -----------------------------------------------------------------------------------

def _device_tunnel(item: Item, action: str) -> DeviceTunnel:
    old = item.record.psk
    if action == "rollback":
        assert old is not None
        return DeviceTunnel(item.id, item.tunnel.name, old, item.key, item.tunnel.customer_endpoint,
                            item.tunnel.cloudflare_endpoint)
    return DeviceTunnel(item.id, item.tunnel.name, item.key, old, item.tunnel.customer_endpoint,
                        item.tunnel.cloudflare_endpoint)


def device_call(ctx: Context, items: Iterable[Item], action: str) -> list[tuple[Item, DeviceResult]]:
    """One call per device and action, devices concurrently; a tunnel without an answer is UNKNOWN."""
    groups: dict[int, list[Item]] = {}
    out: list[tuple[Item, DeviceResult]]
    futures: list[tuple[list[Item], float, bool, concurrent.futures.Future[dict[str, DeviceResult]]]]
    for item in items:
        groups.setdefault(id(item.device), []).append(item)
    futures = []
    for group in groups.values():
        device = group[0].device
        assert device is not None
        # A verify that only polls the vendor's status (verify_timeout set) changes no key: it is not
        # a lease-covered call and its deadline is not bound by the lease TTL (docs/design.md section 10).
        polls = action == "verify" and device.verify_timeout is not None
        timeout = float(device.verify_timeout if polls and device.verify_timeout is not None else device.timeout)
        resend = action == "verify" or (action == "deliver" and all(i.reconcile for i in group))
        tunnels = [_device_tunnel(i, action) for i in group]
        method = {"deliver": device.deliver, "verify": device.verify, "rollback": device.rollback}[action]
        call = _uncovered if polls else _covered
        futures.append((group, timeout, polls, ctx.pool.submit(call, ctx, method, tunnels, timeout, resend)))
    out = []
    for group, timeout, polls, future in futures:
        answers, missing = _answers(ctx, future, timeout, action, polls)
        out.extend((i, answers.get(i.id) or DeviceResult(DeviceStatus.UNKNOWN, missing)) for i in group)
    return out


def _covered(ctx: Context, method: Callable[..., dict[str, DeviceResult]], tunnels: list[DeviceTunnel],
             timeout: float, resend: bool) -> dict[str, DeviceResult]:
    """One device call under the lease: never started without it, over before the lease could end."""
    with ctx.cover(timeout, resend):
        return method(ctx.account_id, ctx.rotation_id, tunnels, deadline=time.monotonic() + timeout)


def _uncovered(ctx: Context, method: Callable[..., dict[str, DeviceResult]], tunnels: list[DeviceTunnel],
               timeout: float, resend: bool) -> dict[str, DeviceResult]:
    """A verify that only reads the vendor's status: no lease cover, its own (long) deadline."""
    return method(ctx.account_id, ctx.rotation_id, tunnels, deadline=time.monotonic() + timeout)


def _result(ctx: Context, future: concurrent.futures.Future[dict[str, DeviceResult]], timeout: float,
            keepalive: bool) -> dict[str, DeviceResult]:
    """Wait for a device call; during a long verify, renew the lease every ``keepalive_every``."""
    end = time.monotonic() + timeout + 5.0
    if not keepalive:
        return future.result(timeout=timeout + 5.0)
    for _ in range(int((timeout + 5.0) / max(ctx.keepalive_every, 0.01)) + 2):
        try:
            return future.result(timeout=max(0.0, min(ctx.keepalive_every, end - time.monotonic())))
        except concurrent.futures.TimeoutError:
            if time.monotonic() >= end:
                raise
            ctx.keepalive()
    return future.result(timeout=max(0.0, end - time.monotonic()))


def _answers(ctx: Context, future: concurrent.futures.Future[dict[str, DeviceResult]], timeout: float,
             action: str, keepalive: bool = False) -> tuple[dict[str, DeviceResult], str]:
    """The device's answers (reasons redacted), and the reason for a tunnel it did not answer for."""
    try:
        answers = _result(ctx, future, timeout, keepalive)
    except concurrent.futures.TimeoutError:
        return {}, "no answer within the device's timeout"
    except LeaseLost as exc:
        return {}, f"lease lost before the device call ({exc}); not called"
    except Exception as exc:  # a device must not raise; if it does, its outcome is unknown
        ctx.log.warning("device_error", step=action, error=ctx.redact(str(exc)))
        return {}, "the device call failed without an answer"
    if not isinstance(answers, dict):
        return {}, "the device gave no usable answer"
    return {tid: DeviceResult(r.status, ctx.redact(r.reason) if r.reason else None)
            for tid, r in answers.items() if isinstance(r, DeviceResult)}, "no answer for this tunnel"


def one_per_tunnel(step: Step) -> Step:
    """The step, refusing a batch that names a tunnel twice (model.RepeatedTunnel, a programming
    error) before it does anything: its key maps and record writes hold one entry per tunnel."""
    @functools.wraps(step)
    def checked(ctx: Context, items: list[Item]) -> Result:
        check_distinct((i.id for i in items), step.__name__)
        return step(ctx, items)
    return checked


FORWARD: tuple[Step, ...] = tuple(one_per_tunnel(s) for s in (
    stage,
    validate,
    deliver,
    apply,
    verify,
    check_health,
    promote,
))
BACKWARD: tuple[Step, ...] = tuple(one_per_tunnel(s) for s in (mark_rolling_back, restore_cloudflare, restore_device,
                                                                 unstage))
