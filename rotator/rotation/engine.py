"""The engine (docs/design.md section 4): runs a plan through the ordered list of steps, records every
outcome in one place (the tally), and owns the lease guard.

The engine knows the ports (``TunnelApi``, ``RecordStore``, ``Device``) and never httpx, hvac or
APScheduler. Every step checks what is already done before doing it, so a run can die anywhere and
the next run (or ``reconcile``) finishes the job. The invariant it serves: the PSK Cloudflare and
the far-end device hold are each always readable from the latest Vault version of the tunnel's
record, as ``psk`` or ``pending_psk``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from rotator.errors import CloudflareError, ConfigError, LeaseHeld, VaultError
from rotator.model import AckRefused, Outcome, Record, TunnelInfo, ack
from rotator.psk import PskGenerator
from rotator.rotation import pipeline, steps
from rotator.rotation.lease import LeaseManager
from rotator.rotation.plan import Mode, Plan, PolicyFor, TunnelView, listed_once, plan
from rotator.rotation.ports import Device, Health, RecordStore, TunnelApi
from rotator.rotation.steps import Context, Item, LeaseLost, Step
from rotator.secret import Secret, redact

# Kept for callers that import the names; Outcome is the one list.
ROTATED, REFUSED, UNAPPLIED, SKIPPED, UNKNOWN, WOULD_ROTATE = (
    Outcome.ROTATED, Outcome.REFUSED, Outcome.UNAPPLIED, Outcome.SKIPPED, Outcome.UNKNOWN, Outcome.WOULD_ROTATE)
ROLLED_BACK, FAILED, WAITING = Outcome.ROLLED_BACK, Outcome.FAILED, Outcome.WAITING
RESULTS = tuple(Outcome)
rfc3339 = steps.rfc3339
DEVICE_WORKERS = 16
IN_FLIGHT = (Outcome.UNKNOWN, Outcome.WAITING)  # the key stays pending


@dataclass(slots=True)
class TunnelOutcome:
    tunnel_id: str
    name: str
    result: Outcome
    reason: str | None = None
    reconciled: bool = False
    device: str | None = None  # the far-end device the run dealt with, if any (reports group by it)

    def as_dict(self) -> dict[str, Any]:
        return {"tunnel_id": self.tunnel_id, "name": self.name, "result": str(self.result), "reason": self.reason,
                "reconciled": self.reconciled, "device": self.device}


@dataclass
class RunReport:
    rotation_id: str
    account_id: str
    dry_run: bool
    started_at: float
    finished_at: float = 0.0
    outcomes: list[TunnelOutcome] = field(default_factory=list)
    error: str | None = None
    step_seconds: dict[str, float] = field(default_factory=lambda: collections.defaultdict(float))
    drifted: list[str] = field(default_factory=list)  # tunnel ids whose key changed outside the rotator
    views: list[TunnelView] = field(default_factory=list)  # every planned tunnel as the plan saw it
    rollback: bool = False
    partner_down: list[str] = field(default_factory=list)  # tunnels that waited: their redundant partner was down
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def counts(self) -> dict[str, int]:
        tally = collections.Counter(o.result for o in self.outcomes)
        return {str(r): tally.get(r, 0) for r in RESULTS}

    @property
    def ok(self) -> bool:
        """Everything asked for was done."""
        done = WOULD_ROTATE if self.dry_run else ROLLED_BACK if self.rollback else ROTATED
        return self.error is None and all(o.result == done for o in self.outcomes)

    def as_dict(self) -> dict[str, Any]:
        return {"rotation_id": self.rotation_id, "account_id": self.account_id, "dry_run": self.dry_run,
                "ok": self.ok, "error": self.error, "counts": self.counts(), "drifted": list(self.drifted),
                "duration_seconds": round(self.finished_at - self.started_at, 3),
                "tunnels": [o.as_dict() for o in self.outcomes]}


@dataclass
class RunRequest:
    account_id: str
    tunnels: Sequence[str] | None = None  # ids or names; None = every tunnel of the account
    due: Callable[[TunnelInfo, Record], bool] | None = None  # overrides ``policy_for``'s schedule
    select: Callable[[TunnelInfo], bool] | None = None  # narrows "every tunnel" (config selections)
    reconcile_only: bool = False
    dry_run: bool = False
    rotation_id: str | None = None
    psk_for: Callable[[TunnelInfo], PskGenerator] | None = None  # per-tunnel PSK policy; default: the engine's
    # The schedule: a tunnel's policy (None: every selected tunnel is due, as for on-demand runs),
    # and per tunnel (consecutive failures, time of the last one) for the back-off.
    policy_for: PolicyFor | None = None
    failures: Mapping[str, tuple[int, float | None]] = field(default_factory=dict)
    on_drift: str = "rotate"  # "rotate": re-key a drifted tunnel from Vault in this run; "report": only report
    device_for: Callable[[TunnelInfo], Device | None] | None = None  # the far end of a tunnel, if any
    rollback: bool = False  # return both ends to previous_psk (the rollback command)
    ack_timeout: float | None = None  # seconds a manual device's key may wait for its ack
    health: Health | None = None  # also judge Cloudflare's tunnel health after the apply (policy flag)


def new_rotation_id(clock: Callable[[], float] = time.time) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(clock())) + "-" + secrets.token_hex(3)


class Tally:
    """The one place outcomes are recorded; every reason is redacted against the run's keys first."""

    def __init__(self, report: RunReport) -> None:
        self.report = report
        self._keys: set[str] = set()
        self._lock = threading.Lock()

    def know(self, items: Sequence[Item]) -> None:
        with self._lock:
            for item in items:
                rec = item.record
                self._keys.update(k.reveal() for k in (item.key, rec.psk, rec.pending_psk, rec.previous_psk)
                                  if k is not None and k.reveal())

    def redact(self, text: str) -> str:
        with self._lock:
            keys = list(self._keys)
        return redact(text, keys)

    def settle(self, tunnel: TunnelInfo, outcome: Outcome, reason: str | None, reconciled: bool = False,
               device: str | None = None) -> None:
        entry = TunnelOutcome(tunnel.id, tunnel.name, outcome, self.redact(reason) if reason else None, reconciled,
                              device)
        with self.report.lock:
            self.report.outcomes.append(entry)

    def settled(self, result: steps.Result) -> None:
        for item, outcome, reason in result.settled:
            self.settle(item.tunnel, outcome, reason, item.reconcile, item.device.name if item.device else None)


class Engine:
    forward: tuple[Step, ...] = steps.FORWARD
    backward: tuple[Step, ...] = steps.BACKWARD

    def __init__(
        self, api: TunnelApi, store: RecordStore, generator: PskGenerator, leases: LeaseManager, *,
        batch_size: int = 100, clock: Callable[[], float] = time.time,
        on_step: Callable[[str, str, float], None] | None = None, log: Any = None,
        release_lease: bool = True, should_stop: Callable[[], bool] | None = None, apply_guard: float = 35.0,
        on_progress: Callable[[int, int], None] | None = None, pipelined: bool = True,
    ) -> None:
        self.on_progress = on_progress or (lambda settled, total: None)  # tunnels settled so far, of total
        # No apply attempt starts later than this long before the lease expires (an attempt may
        # take up to the Cloudflare timeout): a late apply could overwrite a newer rotation.
        self.apply_guard = apply_guard
        self.release_lease = release_lease  # a daemon keeps its lease between runs (leadership)
        self.should_stop = should_stop or (lambda: False)
        self.api, self.store, self.generator, self.leases = api, store, generator, leases
        self.batch_size = batch_size
        self.clock = clock
        self.pipelined = pipelined
        self.on_step = on_step or (lambda account, step, seconds: None)
        self.log = log or structlog.get_logger("rotator.rotation.engine")

    # -- entry point --------------------------------------------------------------------------
    def run(self, req: RunRequest) -> RunReport:
        report = RunReport(req.rotation_id or new_rotation_id(self.clock), req.account_id, req.dry_run, self.clock(),
                           rollback=req.rollback)
        tally = Tally(report)
        log = self.log.bind(account=req.account_id, rotation_id=report.rotation_id)
        try:
            if not req.dry_run:
                self.leases.acquire(req.account_id)
            try:
                self._run(req, tally, log)
            finally:
                if not req.dry_run and self.release_lease:
                    self.leases.release(req.account_id)
        except LeaseHeld as exc:
            report.error = str(exc)
            for wanted in req.tunnels or []:
                tally.settle(TunnelInfo(wanted, wanted), SKIPPED, str(exc))
        except (CloudflareError, VaultError) as exc:
            report.error = tally.redact(str(exc))
            log.error("run_failed", error=report.error)
        report.finished_at = self.clock()
        return report

    def _timed(self, report: RunReport, step: str, started: float) -> None:
        seconds = time.monotonic() - started
        with report.lock:
            report.step_seconds[step] += seconds
        self.on_step(report.account_id, step, seconds)

    # -- plan ---------------------------------------------------------------------------------
    def _plan(self, req: RunRequest, tally: Tally) -> tuple[Plan, list[Item], int]:
        started = time.monotonic()
        listed = self.api.list_tunnels(req.account_id)
        selected = self._select(listed, req)
        readable = [t.id for t in selected if t.problem is None]
        records = self.store.read_many(req.account_id, readable) if readable else {}
        the_plan = plan(selected, records, req.policy_for, self.clock(), due=req.due,
                        reconcile_only=req.reconcile_only, rollback=req.rollback, on_drift=req.on_drift,
                        failures=req.failures)
        items = self._items(req, the_plan)
        self._pairs(req, items, [t for t in listed if t.problem is None])
        tally.know(items)
        for tunnel, outcome, reason in the_plan.settled:
            tally.settle(tunnel, outcome, reason)
        tally.report.drifted, tally.report.views = list(the_plan.drifted), list(the_plan.views)
        self._timed(tally.report, "plan", started)
        return the_plan, items, len(selected)

    def _items(self, req: RunRequest, the_plan: Plan) -> list[Item]:
        items: list[Item] = []
        fresh: dict[PskGenerator, list[Item]] = collections.defaultdict(list)
        for tunnel, rec, mode in the_plan.entries:
            device = req.device_for(tunnel) if req.device_for else None
            key = rec.pending_psk or (rec.previous_psk if mode is Mode.ROLLBACK else None) or Secret("")
            item = Item(tunnel, rec, mode, key, device)
            if item.reconcile:  # an earlier run may have reached either end with the pending key
                item.cf_may_hold, item.dev_may_hold = True, device is not None
            if mode is Mode.ROLLING_BACK:
                item.going_back(ROLLED_BACK, f"resuming the rollback ({rec.last_error or 'no reason recorded'})")
            if mode is Mode.FRESH:
                fresh[req.psk_for(tunnel) if req.psk_for else self.generator].append(item)
            items.append(item)
        for generator, group in fresh.items():  # keys drawn in bulk, one draw per PSK policy
            for item, key in zip(group, generator.generate(len(group)), strict=True):
                item.key = key
        return items

    def resolve(self, account_id: str, tunnels: Sequence[str]) -> list[TunnelInfo]:
        """The named tunnels (ids or exact names) as listed now; ConfigError for an unknown or ambiguous one.
        A command checks its names with this before it waits for anything (issue 20 item 11)."""
        return self._select(self.api.list_tunnels(account_id), RunRequest(account_id, tunnels=list(tunnels)))

    def _pairs(self, req: RunRequest, items: list[Item], listed: Sequence[TunnelInfo]) -> None:
        """Each item's redundant pair and partners, as its device names them (Device.pair_of) over every
        listed tunnel the device owns, planned or not. A device that cannot say falls back to the
        usual pair (same device, same customer endpoint)."""
        devices: dict[int, tuple[Device, list[TunnelInfo]]] = {}
        for item in items:
            if item.device is not None:
                devices.setdefault(id(item.device), (item.device, []))
        if not devices or req.device_for is None:
            return
        for tunnel in listed:
            device = req.device_for(tunnel)
            if device is not None and id(device) in devices:
                devices[id(device)][1].append(tunnel)
        keys: dict[tuple[int, str], str] = {}
        for dev_id, (device, owned) in devices.items():
            try:
                named = device.pair_of(req.account_id, owned, deadline=time.monotonic() + device.timeout)
            except Exception as exc:  # a device must not raise: fall back to the usual pair
                self.log.warning("pairs_unknown", device=device.name, error=str(exc)[:200])
                named = {}
            if not isinstance(named, dict) or not named:
                named = {t.id: t.customer_endpoint for t in owned if t.customer_endpoint}
            keys.update({(dev_id, tid): key for tid, key in named.items() if isinstance(key, str)})
        members: dict[tuple[int, str], list[TunnelInfo]] = collections.defaultdict(list)
        for dev_id, (_, owned) in devices.items():
            for tunnel in owned:
                if (dev_id, tunnel.id) in keys:
                    members[(dev_id, keys[(dev_id, tunnel.id)])].append(tunnel)
        for item in items:
            key = keys.get((id(item.device), item.id)) if item.device is not None else None
            item.pair_key = key
            if key is not None:
                item.partners = tuple(t for t in members[(id(item.device), key)] if t.id != item.id)

    def _pending_partners(self, account_id: str, items: list[Item]) -> set[tuple[str, str]]:
        """Pairs with a key in flight through a partner this run did not plan (a run naming one tunnel
        while its partner's key is still pending from an earlier run): read from the partners' records,
        one read for them all. A record that cannot be read counts as in flight."""
        planned = {i.id for i in items}
        outside = {p.id: i.pair for i in items for p in i.partners if i.pair is not None and p.id not in planned}
        if not outside:
            return set()
        records = self.store.read_many(account_id, sorted(outside))
        return {pair for tid, pair in outside.items() if pair is not None and (
            not isinstance(rec := records.get(tid), Record) or rec.pending_psk is not None)}

    def _select(self, tunnels: list[TunnelInfo], req: RunRequest) -> list[TunnelInfo]:
        """The tunnels this run is about, each once: an id listed twice is one entry with a problem
        (plan.listed_once), chosen when any of its names or entries is, and never rotated."""
        once = listed_once(tunnels)
        if req.tunnels is None:
            if req.select is None:
                return once
            chosen_ids = {t.id for t in tunnels if req.select(t)}
            return [t for t in once if t.id in chosen_ids]
        by_id = {t.id: t for t in once}
        by_name: dict[str, dict[str, TunnelInfo]] = collections.defaultdict(dict)
        for t in tunnels:
            by_name[t.name][t.id] = by_id[t.id]
        chosen: dict[str, TunnelInfo] = {}
        for wanted in req.tunnels:
            named = list(by_name.get(wanted, {}).values())
            if wanted in by_id:
                chosen[wanted] = by_id[wanted]
            elif len(named) == 1:
                chosen[named[0].id] = named[0]
            elif named:
                raise ConfigError(f"tunnel name {wanted!r} is ambiguous in account {req.account_id}",
                                  "name the tunnel by its id")
            else:
                raise ConfigError(f"no tunnel {wanted!r} in account {req.account_id}",
                                  f"run 'rotator status --account {req.account_id}' to list its tunnels")
        return list(chosen.values())

    def named(self, account_id: str, tunnels: Sequence[str]) -> list[TunnelInfo]:
        """The listed tunnels these ids or names name, each once, as a run would select them.
        Raises ConfigError for an unknown or ambiguous name."""
        return self._select(self.api.list_tunnels(account_id), RunRequest(account_id, tunnels=tunnels))

    # -- acknowledgements (manual devices) -----------------------------------------------------
    def acknowledge(self, account_id: str, tunnels: Sequence[str], holds: str | None = None,
                    rotation_id: str | None = None) -> dict[str, str | None]:
        """``rotator ack`` and the admin API's ack: record (CAS write of ``model.ack``) that each named
        tunnel's manual device holds what ``holds`` says, for rotation ``rotation_id`` when given.
        Returns tunnel id -> None when acknowledged, else why not (the current state and the exact
        command). All or nothing: when one tunnel is refused, none is written. The next run or
        reconcile acts on acknowledged keys. Raises ConfigError for an unknown name."""
        chosen = self.named(account_id, tunnels)
        records = self.store.read_many(account_id, [t.id for t in chosen if t.problem is None])
        out: dict[str, str | None] = {t.id: t.problem for t in chosen if t.problem is not None}
        wanted: list[Record] = []
        for tid, rec in records.items():
            if isinstance(rec, VaultError):
                out[tid] = f"reading Vault: {rec}"
                continue
            try:
                wanted.append(ack(rec, holds, rotation_id))
            except AckRefused as exc:
                out[tid] = str(exc)
        if out:
            return {**{r.tunnel_id: "not acknowledged: another tunnel of this acknowledgement was refused"
                       for r in wanted}, **out}
        for tid, res in (self.store.write_many(wanted) if wanted else {}).items():
            out[tid] = None if isinstance(res, Record) else f"writing the acknowledgement failed: {res}"
        return out

    # -- the lease guard ------------------------------------------------------------------------
    def _still_leased(self, account_id: str) -> bool:
        try:
            self.leases.acquire(account_id)
            return True
        except (LeaseHeld, VaultError):
            return False

    @contextlib.contextmanager
    def _cover(self, account_id: str, seconds: float, resend: bool) -> Iterator[float | None]:
        """One mutating call of total deadline ``seconds`` under the lease (steps.Context.cover); yields
        the latest start of an attempt. Raises LeaseLost, nothing sent, when the lease is gone.

        With a lease manager that offers ``covering`` (a keepalive during the call, late landings
        remembered), that is used; otherwise the lease is renewed when less than half is left, so a
        call of up to half the TTL ends before it."""
        covering = getattr(self.leases, "covering", None)
        with contextlib.ExitStack() as stack:
            try:
                if covering is not None:
                    deadline = stack.enter_context(covering(account_id, seconds, resend=resend))
                else:
                    deadline = self._renewed(account_id)
            except (LeaseHeld, VaultError) as exc:
                raise LeaseLost(str(exc)) from exc
            yield deadline

    def _renewed(self, account_id: str) -> float | None:
        if not self.leases.holds(account_id, margin=self.leases.ttl / 2):
            self.leases.acquire(account_id)
        expiry = self.leases.expires_at(account_id)
        return None if expiry is None else expiry - min(self.apply_guard, self.leases.ttl / 2)

    # -- running the steps ----------------------------------------------------------------------
    def _run(self, req: RunRequest, tally: Tally, log: Any) -> None:
        the_plan, items, listed = self._plan(req, tally)
        log.debug("planned", step="plan", tunnels=listed, items=len(items), reconcile=len(the_plan.pending),
                  drifted=len(the_plan.drifted))
        total = len(items) + len(the_plan.settled)  # what this run settles: progress counts these, not the listing
        with concurrent.futures.ThreadPoolExecutor(DEVICE_WORKERS, thread_name_prefix="device") as pool:
            ctx = Context(req.account_id, tally.report.rotation_id, req.dry_run, self.api, self.store,
                          functools.partial(self._cover, req.account_id), tally.redact, pool, log, self.clock,
                          req.ack_timeout, req.health, self.apply_guard,
                          keepalive=functools.partial(self._still_leased, req.account_id),
                          keepalive_every=max(1.0, self.leases.ttl / 3))
            ctx.busy_pairs.update(self._pending_partners(req.account_id, items))
            going_back = [i for i in items if i.mode is Mode.ROLLING_BACK]
            if req.dry_run:  # a dry run changes nothing, not even an interrupted rollback
                for item in going_back:
                    tally.settle(item.tunnel, SKIPPED, "dry run: a rollback is in flight; reconcile finishes it", True)
            else:
                self._steps(ctx, tally, going_back, self.backward)
            phases = self._phases(ctx, tally, req, total)
            batches = self._batches([i for i in items if i.mode is not Mode.ROLLING_BACK])
            (pipeline.run_pipelined if self.pipelined else pipeline.run_sequential)(batches, phases)
        tally.report.partner_down = sorted(ctx.partner_down)
        self.on_progress(len(tally.report.outcomes), total)

    def _phases(self, ctx: Context, tally: Tally, req: RunRequest, total: int) -> pipeline.Phases[Item]:
        first, middle, last = self.forward[:1], self.forward[1:-1], self.forward[-1:]

        def body(items: list[Item]) -> tuple[list[Item], str | None]:
            return self._steps(ctx, tally, items, middle, keep_moved=True)

        def behind(items: list[Item]) -> None:
            self._steps(ctx, tally, items, last)

        def interrupt(k: int) -> str | None:
            if self.should_stop():
                return "shutting down"
            if k and not req.dry_run and not self._still_leased(req.account_id):
                return "lease lost"
            return None

        return pipeline.Phases(
            ahead=lambda items: self._steps(ctx, tally, items, first, keep_moved=True)[0], body=body,
            behind=behind,
            interrupt=interrupt, abandon=lambda items, why, staged: self._abandon(ctx, tally, items, why, staged),
            progress=lambda: self.on_progress(len(tally.report.outcomes), total))

    def _steps(self, ctx: Context, tally: Tally, items: list[Item], chain: Sequence[Step],
               keep_moved: bool = False) -> tuple[list[Item], str | None]:
        """Run items through ``chain``; what must go back runs through the backward steps."""
        back: list[Item] = []
        halt: str | None = None
        for step in chain:
            if not items:
                break
            started = time.monotonic()
            result = step(ctx, items)
            self._timed(tally.report, step.__name__, started)
            tally.settled(result)
            steps.note(ctx, result.settled)
            ctx.busy_pairs.update(i.pair for i, o, _ in result.settled if o in IN_FLIGHT and i.pair is not None)
            back.extend(result.back)
            items, halt = result.moved, halt or result.halt
        if back:
            self._steps(ctx, tally, back, self.backward)
        if items and not keep_moved:
            raise AssertionError(f"step chain ended with {len(items)} unsettled items")
        return items, halt

    def _abandon(self, ctx: Context, tally: Tally, items: list[Item], why: str, staged: bool) -> None:
        """A batch that will not be sent: fresh keys staged ahead are taken back, the rest is skipped."""
        fresh = [i for i in items if staged and i.mode is not Mode.RESUME]
        for item in items:
            if item not in fresh:
                tally.settle(item.tunnel, SKIPPED, why, item.reconcile)
        self._steps(ctx, tally, [i.going_back(SKIPPED, why) for i in fresh], self.backward)

    def _batches(self, items: list[Item]) -> list[list[Item]]:
        """Batches of ``batch_size``; tunnels of one redundant pair (as their device names it)
        go into different waves, so one is verified before the other starts; a key already in flight
        goes first, and its partner waits for a later run if it stays in flight."""
        waves: list[list[Item]] = [[]]
        seen: collections.Counter[tuple[str, str]] = collections.Counter()
        for item in sorted(items, key=lambda i: not i.reconcile):  # keys in flight settle first
            wave = 0
            if item.pair is not None:
                wave, seen[item.pair] = seen[item.pair], seen[item.pair] + 1
            while len(waves) <= wave:
                waves.append([])
            waves[wave].append(item)
        return [w[i:i + self.batch_size] for w in waves for i in range(0, len(w), self.batch_size)]
