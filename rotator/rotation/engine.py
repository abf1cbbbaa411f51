"""The rotation protocol (DESIGN.md section 4): plan, reconcile, stage, validate, apply, promote.

The engine knows two small interfaces (``TunnelApi``, ``RecordStore``) and never httpx, hvac or
APScheduler. Every step checks what is already done before doing it, so a run can die anywhere
and the next run (or ``reconcile``) finishes the job. The invariant it serves: the PSK Cloudflare
holds is always readable from the latest Vault version of the tunnel's record, as ``psk`` or
``pending_psk``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from rotator.errors import CasConflict, CloudflareError, ConfigError, LeaseHeld, VaultError
from rotator.model import Record, TunnelInfo
from rotator.psk import PskGenerator
from rotator.rotation.lease import LeaseManager
from rotator.rotation.ports import RecordStore, TunnelApi
from rotator.secret import Secret

ROTATED, REFUSED, UNAPPLIED, SKIPPED, UNKNOWN, WOULD_ROTATE = (
    "rotated", "refused", "unapplied", "skipped", "unknown", "would_rotate")
RESULTS = (ROTATED, REFUSED, UNAPPLIED, SKIPPED, UNKNOWN, WOULD_ROTATE)


@dataclass(slots=True)
class TunnelOutcome:
    tunnel_id: str
    name: str
    result: str
    reason: str | None = None
    reconciled: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"tunnel_id": self.tunnel_id, "name": self.name, "result": self.result, "reason": self.reason,
                "reconciled": self.reconciled}


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
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def counts(self) -> dict[str, int]:
        tally = collections.Counter(o.result for o in self.outcomes)
        return {r: tally.get(r, 0) for r in RESULTS}

    @property
    def ok(self) -> bool:
        """Everything asked for was done."""
        done = WOULD_ROTATE if self.dry_run else ROTATED
        return self.error is None and all(o.result == done for o in self.outcomes)

    def as_dict(self) -> dict[str, Any]:
        return {"rotation_id": self.rotation_id, "account_id": self.account_id, "dry_run": self.dry_run,
                "ok": self.ok, "error": self.error, "counts": self.counts(),
                "duration_seconds": round(self.finished_at - self.started_at, 3),
                "tunnels": [o.as_dict() for o in self.outcomes]}


@dataclass
class RunRequest:
    account_id: str
    tunnels: Sequence[str] | None = None  # ids or names; None = every tunnel of the account
    due: Callable[[TunnelInfo, Record], bool] | None = None  # None = every selected tunnel is due
    select: Callable[[TunnelInfo], bool] | None = None  # narrows "every tunnel" (config selections)
    reconcile_only: bool = False
    dry_run: bool = False
    rotation_id: str | None = None
    psk_for: Callable[[TunnelInfo], PskGenerator] | None = None  # per-tunnel PSK policy; default: the engine's


def new_rotation_id(clock: Callable[[], float] = time.time) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(clock())) + "-" + secrets.token_hex(3)


def rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


_NO_KEY = Secret("")


@dataclass(slots=True)
class _Item:
    tunnel: TunnelInfo
    record: Record
    key: Secret
    reconcile: bool  # re-applying a pending key found in Vault rather than a fresh one


class Engine:
    def __init__(
        self, api: TunnelApi, store: RecordStore, generator: PskGenerator, leases: LeaseManager, *,
        batch_size: int = 100, clock: Callable[[], float] = time.time,
        on_step: Callable[[str, str, float], None] | None = None, log: Any = None,
        release_lease: bool = True, should_stop: Callable[[], bool] | None = None, apply_guard: float = 35.0,
        on_progress: Callable[[int, int], None] | None = None,
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
        self.on_step = on_step or (lambda account, step, seconds: None)
        self.log = log or structlog.get_logger("rotator.rotation.engine")

    # -- entry point --------------------------------------------------------------------------
    def run(self, req: RunRequest) -> RunReport:
        report = RunReport(req.rotation_id or new_rotation_id(self.clock), req.account_id, req.dry_run, self.clock())
        log = self.log.bind(account=req.account_id, rotation_id=report.rotation_id)
        try:
            if not req.dry_run:
                self.leases.acquire(req.account_id)
            try:
                self._run(req, report, log)
            finally:
                if not req.dry_run and self.release_lease:
                    self.leases.release(req.account_id)
        except LeaseHeld as exc:
            report.error = str(exc)
            report.outcomes = [TunnelOutcome(t, t, SKIPPED, str(exc)) for t in (req.tunnels or [])]
        except (CloudflareError, VaultError) as exc:
            report.error = str(exc)
            log.error("run_failed", error=str(exc))
        report.finished_at = self.clock()
        return report

    def _timed(self, report: RunReport, step: str, started: float) -> None:
        seconds = time.monotonic() - started
        with report.lock:
            report.step_seconds[step] += seconds
        self.on_step(report.account_id, step, seconds)

    # -- plan ---------------------------------------------------------------------------------
    def _run(self, req: RunRequest, report: RunReport, log: Any) -> None:
        started = time.monotonic()
        tunnels = self.api.list_tunnels(req.account_id)
        selected = self._select(tunnels, req)
        records = self.store.read_many(req.account_id, [t.id for t in selected])
        items: list[_Item] = []
        fresh: dict[PskGenerator, list[_Item]] = collections.defaultdict(list)
        for tunnel in selected:
            rec = records[tunnel.id]
            if isinstance(rec, VaultError):
                report.outcomes.append(TunnelOutcome(tunnel.id, tunnel.name, UNAPPLIED, f"reading Vault: {rec}"))
            elif rec.pending_psk is not None:
                items.append(_Item(tunnel, rec, rec.pending_psk, reconcile=True))
            elif not req.reconcile_only and (req.due is None or req.due(tunnel, rec)):
                item = _Item(tunnel, rec, _NO_KEY, reconcile=False)
                fresh[req.psk_for(tunnel) if req.psk_for else self.generator].append(item)
                items.append(item)
        for generator, group in fresh.items():  # keys drawn in bulk, one draw per PSK policy
            for item, key in zip(group, generator.generate(len(group)), strict=True):
                item.key = key
        self._timed(report, "plan", started)
        log.debug("planned", step="plan", tunnels=len(selected), items=len(items),
                  reconcile=sum(1 for i in items if i.reconcile))
        batches = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        # Vault work overlaps Cloudflare's round trips: while one batch is at Cloudflare (validate,
        # apply), the next is staged and the previous promoted. Staging early is always safe (a staged
        # key is in Vault before anyone else sees it); promotion only records what Cloudflare applied.
        # The pool's exit waits for the last promotion.
        with concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="pipeline") as pool:
            ahead: concurrent.futures.Future[list[_Item]] | None = None
            promotions: list[concurrent.futures.Future[None]] = []
            halted: str | None = None
            for k, batch in enumerate(batches):
                stop = halted or ("shutting down" if self.should_stop() else None)
                if stop is None and k and not req.dry_run and not self._still_leased(req.account_id):
                    stop = "lease lost"
                if stop is not None:
                    rest = batches[k:]
                    if ahead is not None:  # batch k is staged but was never sent: take its keys back out
                        self._settle_not_applied(req, report, [(i, stop) for i in ahead.result()], SKIPPED)
                        rest = batches[k + 1:]
                    report.outcomes.extend(TunnelOutcome(i.tunnel.id, i.tunnel.name, SKIPPED, stop, i.reconcile)
                                           for b in rest for i in b)
                    break
                live = ahead.result() if ahead is not None else self._stage_batch(req, report, batch)
                ahead = None
                if k + 1 < len(batches):
                    ahead = pool.submit(self._stage_batch, req, report, batches[k + 1])
                halted = self._finish_batch(
                    req, report, live, log,
                    lambda applied: promotions.append(pool.submit(self._promote_timed, report, applied)))
                self.on_progress(len(report.outcomes), len(selected))
            for promotion in promotions:
                promotion.result()  # re-raise anything unexpected instead of losing outcomes
        self.on_progress(len(report.outcomes), len(selected))

    def _select(self, tunnels: list[TunnelInfo], req: RunRequest) -> list[TunnelInfo]:
        if req.tunnels is None:
            return [t for t in tunnels if req.select is None or req.select(t)]
        by_id = {t.id: t for t in tunnels}
        by_name: dict[str, list[TunnelInfo]] = collections.defaultdict(list)
        for t in tunnels:
            by_name[t.name].append(t)
        chosen: dict[str, TunnelInfo] = {}
        for wanted in req.tunnels:
            if wanted in by_id:
                chosen[wanted] = by_id[wanted]
            elif len(by_name.get(wanted, [])) == 1:
                chosen[by_name[wanted][0].id] = by_name[wanted][0]
            elif wanted in by_name:
                raise ConfigError(f"tunnel name {wanted!r} is ambiguous in account {req.account_id}",
                                  "name the tunnel by its id")
            else:
                raise ConfigError(f"no tunnel {wanted!r} in account {req.account_id}",
                                  f"run 'rotator status --account {req.account_id}' to list its tunnels")
        return list(chosen.values())

    def _still_leased(self, account_id: str) -> bool:
        try:
            self.leases.acquire(account_id)
            return True
        except (LeaseHeld, VaultError):
            return False

    # -- one batch: stage, validate, apply, promote -------------------------------------------
    def _stage_batch(self, req: RunRequest, report: RunReport, batch: list[_Item]) -> list[_Item]:
        """Reconciled items as they are, fresh ones once staged; returns the items to send."""
        started = time.monotonic()
        live = [i for i in batch if i.reconcile] + self._stage(req, report, [i for i in batch if not i.reconcile])
        self._timed(report, "stage", started)
        return live

    def _finish_batch(self, req: RunRequest, report: RunReport, live: list[_Item], log: Any,
                      promoter: Callable[[list[_Item]], object]) -> str | None:
        """Validate and apply one staged batch; hand what Cloudflare applied to ``promoter``.

        Returns why the run should stop when a whole Cloudflare call failed (after its retries):
        the next batches would only spend rate budget and Vault writes on the same failure.
        """
        out = report.outcomes
        if not live:
            return None

        started = time.monotonic()
        try:
            verdict = self.api.set_psks(req.account_id, {i.tunnel.id: i.key for i in live}, validate_only=True)
        except CloudflareError as exc:
            self._timed(report, "validate", started)
            log.warning("validate_failed", step="validate", error=str(exc), tunnels=len(live))
            self._settle_not_applied(req, report, [(i, f"validation call failed: {exc}") for i in live], UNAPPLIED)
            return f"stopped after the validation call failed: {exc}"
        self._timed(report, "validate", started)
        accepted: list[_Item] = []
        refused: list[tuple[_Item, str]] = []
        for item in live:
            if item.tunnel.id in verdict.unapplied:
                refused.append((item, verdict.unapplied[item.tunnel.id]))
            elif item.tunnel.id in verdict.applied:
                accepted.append(item)
            else:
                refused.append((item, "not acknowledged by validate_only"))
        self._settle_not_applied(req, report, [(i, f"refused by validation: {r}") for i, r in refused], REFUSED)
        if req.dry_run:
            out.extend(TunnelOutcome(i.tunnel.id, i.tunnel.name, WOULD_ROTATE, None, i.reconcile) for i in accepted)
            return None
        if not accepted:
            return None

        started = time.monotonic()
        try:
            with self.leases.covering(req.account_id, self.apply_guard,
                                      resend=all(i.reconcile for i in accepted)) as deadline:
                result = self.api.set_psks(req.account_id, {i.tunnel.id: i.key for i in accepted},
                                           validate_only=False, deadline=deadline)
        except LeaseHeld as exc:
            # Not applying is always safe: pending keys stay in Vault for whoever holds the lease.
            self._timed(report, "apply", started)
            out.extend(TunnelOutcome(i.tunnel.id, i.tunnel.name, SKIPPED, f"lease lost before apply ({exc}); "
                                     "the staged key is left for the lease holder to reconcile", i.reconcile)
                       for i in accepted)
            return "lease lost"
        except CloudflareError as exc:
            self._timed(report, "apply", started)
            log.warning("apply_failed", step="apply", error=str(exc), ambiguous=exc.ambiguous,
                        tunnels=len(accepted))
            if exc.ambiguous:
                out.extend(TunnelOutcome(i.tunnel.id, i.tunnel.name, UNKNOWN,
                                         f"apply outcome unknown ({exc}); key left pending for reconcile",
                                         i.reconcile) for i in accepted)
            else:
                self._settle_not_applied(req, report, [(i, f"apply failed: {exc}") for i in accepted], UNAPPLIED)
            return f"stopped after the apply call failed: {exc}"
        self._timed(report, "apply", started)
        applied = [i for i in accepted if i.tunnel.id in result.applied]
        self._settle_not_applied(req, report, [(i, f"unapplied: {result.unapplied[i.tunnel.id]}") for i in accepted
                                               if i.tunnel.id in result.unapplied], UNAPPLIED)
        out.extend(TunnelOutcome(i.tunnel.id, i.tunnel.name, UNKNOWN,
                                 "Cloudflare did not report this tunnel; key left pending for reconcile", i.reconcile)
                   for i in accepted if i.tunnel.id not in result.applied and i.tunnel.id not in result.unapplied)
        if applied:
            promoter(applied)
        return None

    def _promote_timed(self, report: RunReport, items: list[_Item]) -> None:
        started = time.monotonic()
        self._promote(report, items)
        self._timed(report, "promote", started)

    def _stage(self, req: RunRequest, report: RunReport, items: list[_Item]) -> list[_Item]:
        """Write psk=old, pending_psk=new, state=pending with CAS; return the items now staged."""
        if not items:
            return []
        staged_records = [dataclasses.replace(i.record, pending_psk=i.key, state="pending",
                                              rotation_id=report.rotation_id, tunnel_name=i.tunnel.name)
                          for i in items]
        if req.dry_run:
            return items
        written = self.store.write_many(staged_records)
        staged = []
        for item in items:
            res = written[item.tunnel.id]
            if isinstance(res, CasConflict):
                report.outcomes.append(TunnelOutcome(item.tunnel.id, item.tunnel.name, SKIPPED,
                                                     "record changed since it was read (another rotator?)"))
            elif isinstance(res, VaultError):
                result = UNKNOWN if res.ambiguous else UNAPPLIED
                report.outcomes.append(TunnelOutcome(item.tunnel.id, item.tunnel.name, result,
                                                     f"staging in Vault failed: {res}"))
            else:
                item.record = res
                staged.append(item)
        return staged

    def _settle_not_applied(self, req: RunRequest, report: RunReport, items: list[tuple[_Item, str]],
                            result: str) -> None:
        """Cloudflare did not take these keys. A fresh key is unstaged (Cloudflare still holds ``psk``);
        a reconciled key stays pending, since Cloudflare may hold it from an earlier apply."""
        for i, reason in items:
            settled = UNKNOWN if i.reconcile and result != REFUSED else result
            report.outcomes.append(TunnelOutcome(i.tunnel.id, i.tunnel.name, settled, reason, i.reconcile))
        if not items or req.dry_run:
            return
        updates = [dataclasses.replace(i.record, pending_psk=i.record.pending_psk if i.reconcile else None,
                                       state="pending" if i.reconcile else "active", tunnel_name=i.tunnel.name,
                                       last_error=reason[:500])
                   for i, reason in items]
        for tid, res in self.store.write_many(updates).items():
            if isinstance(res, VaultError):
                # The pending key stays in Vault: harmless, the next run re-validates it.
                self.log.warning("unstage_failed", account=req.account_id, rotation_id=report.rotation_id,
                                 tunnel=tid, step="unstage", error=str(res))

    def _promote(self, report: RunReport, items: list[_Item]) -> None:
        if not items:
            return
        now = rfc3339(self.clock())
        wanted = {i.tunnel.id: (i, dataclasses.replace(
            i.record, psk=i.key, pending_psk=None, previous_psk=i.record.psk, state="active",
            rotation_id=report.rotation_id, rotated_at=now, tunnel_name=i.tunnel.name, last_error=None))
            for i in items}
        written = self.store.write_many([record for _, record in wanted.values()])
        for tid, res in written.items():
            item, record = wanted[tid]
            if isinstance(res, CasConflict):
                res = self._promote_after_conflict(item, record)
            if isinstance(res, VaultError):
                self.log.warning("promote_failed", account=report.account_id, rotation_id=report.rotation_id,
                                 tunnel=tid, step="promote", error=str(res))
                report.outcomes.append(TunnelOutcome(tid, item.tunnel.name, UNKNOWN,
                                                     f"applied, but promoting in Vault failed ({res}); "
                                                     "the key stays pending until reconcile", item.reconcile))
            else:
                report.outcomes.append(TunnelOutcome(tid, item.tunnel.name, ROTATED, None, item.reconcile))

    def _promote_after_conflict(self, item: _Item, wanted: Record) -> Record | VaultError:
        """Promotion is idempotent: already promoted with our key is success; still pending, retry once."""
        try:
            current = self.store.read(item.record.account_id, item.record.tunnel_id)
        except VaultError as exc:
            return exc
        if current.pending_psk is None and current.psk == item.key:
            return current
        if current.pending_psk == item.key:
            wanted.version = current.version
            wanted.previous_psk = current.psk
            return self.store.write_many([wanted])[item.tunnel.id]
        return VaultError("record moved on to another key during promotion", "run reconcile")
