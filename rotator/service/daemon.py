"""The composition root of the long-lived service: APScheduler jobs, the admin server, signals, HA.

Two jobs run on APScheduler (3.x, ``max_instances=1``, coalescing, an explicit misfire grace):
``leases`` keeps or takes each account's lease (leadership) and the Vault token fresh; ``tick``
rotates the due tunnels of every account this replica leads. On-demand runs from the admin API
go through a one-worker queue, single-flight per account and tunnel set. SIGTERM/SIGINT stop new
work, let the in-flight batch finish (bounded; longer while a call may still land), release the
leases (never one whose call may still land) and exit 0.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CollectorRegistry

from rotator.config import Settings
from rotator.errors import ConfigError, LeaseHeld, RotatorError, VaultError
from rotator.httpserver import ServerThread, stop_on_signals
from rotator.model import Record, TunnelInfo
from rotator.rotation.engine import ROTATED, UNKNOWN, RunReport, RunRequest, new_rotation_id, rfc3339
from rotator.schedule import Policy, next_due, parse_time
from rotator.service.admin import build_app
from rotator.service.logging import Redactor
from rotator.service.metrics import Metrics
from rotator.wiring import Runtime, build_runtime

SHUTDOWN_GRACE = 30.0
RELIST_SECONDS = 600.0  # new tunnels are noticed within this long even when nothing is due


@dataclass
class Run:
    id: str
    account: str
    tunnels: frozenset[str] | None
    dry_run: bool
    trigger: str
    state: str = "queued"  # queued | running | done
    report: RunReport | None = None
    error: str | None = None

    def view(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "account": self.account, "state": self.state, "trigger": self.trigger,
                               "dry_run": self.dry_run, "error": self.error,
                               "tunnels": sorted(self.tunnels) if self.tunnels else "all"}
        if self.report is not None:
            out["result"] = self.report.as_dict()
        return out


@dataclass
class TunnelState:
    name: str
    state: str = "unknown"
    last_rotated: float | None = None
    next_due: float | None = None
    pending: bool = False
    last_error: str | None = None
    failures: int = 0
    last_failure: float | None = None


@dataclass
class Daemon:
    settings: Settings
    runtime: Runtime
    metrics: Metrics
    log: Any
    tick_seconds: float = 60.0
    clock: Callable[[], float] = time.time
    tunnels: dict[str, dict[str, TunnelState]] = field(default_factory=dict)
    runs: dict[str, Run] = field(default_factory=dict)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _account_locks: dict[str, threading.Lock] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _queue: concurrent.futures.ThreadPoolExecutor | None = None
    _scheduler: BackgroundScheduler | None = None
    _server: ServerThread | None = None
    _ready: dict[str, Any] = field(default_factory=dict)
    _listed: dict[str, float] = field(default_factory=dict)
    _leading: dict[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for acc in self.settings.accounts:
            self._account_locks[acc.id] = threading.Lock()
            self.tunnels[acc.id] = {}
        self.runtime.engine.release_lease = False
        self.runtime.engine.should_stop = self._stopping.is_set
        self.runtime.engine.on_step = self.metrics.observe_step

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, serve_admin: bool = True) -> None:
        self._queue = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="on-demand")
        self._check_ready()
        self.maintain_leases()
        scheduler = BackgroundScheduler(timezone="UTC", job_defaults={
            "max_instances": 1, "coalesce": True, "misfire_grace_time": 30})
        scheduler.add_job(self.maintain_leases, "interval", seconds=max(1.0, self.settings.lease_ttl / 3),
                          id="leases")
        scheduler.add_job(self.tick, "interval", seconds=self.tick_seconds, id="tick", next_run_time=_now_dt())
        scheduler.start()
        self._scheduler = scheduler
        if serve_admin:
            host, _, port = self.settings.admin_listen.rpartition(":")
            app = build_app(self, self.metrics.registry, self.settings.admin_token)
            self._server = ServerThread(app, host=host, port=int(port)).start()
        self.log.info("daemon_started", accounts=len(self.settings.accounts), admin=self.admin_url,
                      holder=self.runtime.leases.holder)

    @property
    def admin_url(self) -> str | None:
        return self._server.url if self._server else None

    def stop(self, release: bool = True) -> float:
        """Stop new work, finish the in-flight batch (bounded), release leases. Returns seconds taken."""
        started = time.monotonic()
        self._stopping.set()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        if self._queue is not None:
            self._queue.shutdown(wait=False, cancel_futures=True)
        self._wait_for_runs()
        if release:
            for acc in self.settings.accounts:
                # A lease whose call may still land is kept (it expires on its own): never handed over early.
                if self.runtime.leases.release(acc.id):
                    self.metrics.leader.labels(account=acc.id).set(0)
        if self._server is not None:
            self._server.stop()
        self.runtime.close()
        seconds = time.monotonic() - started
        self.log.info("daemon_stopped", seconds=round(seconds, 3))
        return seconds

    def _wait_for_runs(self) -> None:
        """Let in-flight runs end: for the grace period, and beyond it while a call under a lease may
        still land (every call has a total deadline, so this is bounded too)."""
        grace_end = time.monotonic() + SHUTDOWN_GRACE
        passes = int(SHUTDOWN_GRACE + 3 * self.settings.lease_ttl) + 10
        for lock in self._account_locks.values():
            for _ in range(passes):
                wait = max(grace_end - time.monotonic(), self.runtime.leases.busy_until() - self.clock())
                if lock.acquire(timeout=max(0.0, min(wait, 1.0))):
                    lock.release()
                    break
                if wait <= 0:
                    break

    # -- leadership ---------------------------------------------------------------------------
    def maintain_leases(self) -> None:
        if self._stopping.is_set():
            return
        try:
            action = self.runtime.vault_auth.maintain()
            if action != "none":
                self.log.info("vault_token_maintained", action=action)
        except RotatorError as exc:
            self.log.warning("vault_token_maintenance_failed", error=str(exc))
        for acc in self.settings.accounts:
            try:
                self.runtime.leases.acquire(acc.id)
                leader = True
                self.metrics.vault_up.set(1)
            except LeaseHeld:
                leader = False
                self.metrics.vault_up.set(1)
            except VaultError as exc:
                leader = self.runtime.leases.holds(acc.id)
                self.metrics.vault_up.set(0)
                self.log.warning("lease_check_failed", account=acc.id, error=str(exc))
            self.metrics.leader.labels(account=acc.id).set(1 if leader else 0)
            if leader != self._leading.get(acc.id, False):
                self.log.info("leadership_changed", account=acc.id, leader=leader)
            self._leading[acc.id] = leader

    def _vault_state(self) -> str:
        """``ok`` or why Vault cannot be used; keeps psk_rotator_vault_up in step."""
        try:
            self.runtime.store.check()
        except RotatorError as exc:
            self.metrics.vault_up.set(0)
            return str(exc)
        self.metrics.vault_up.set(1)
        return "ok"

    def _check_ready(self) -> None:
        detail: dict[str, Any] = {"holder": self.runtime.leases.holder, "vault": self._vault_state()}
        if self.settings.accounts:
            try:
                self.runtime.cloudflare.list_tunnels(self.settings.accounts[0].id)
                detail["cloudflare"] = "ok"
            except RotatorError as exc:
                detail["cloudflare"] = str(exc)
        self._ready = detail

    def ready(self) -> tuple[bool, dict[str, Any]]:
        detail = {**self._ready, "vault": self._vault_state()}
        if self.metrics.cloudflare_ok is False:
            detail["cloudflare"] = "token refused on the last call"
        elif self.metrics.cloudflare_ok:
            detail["cloudflare"] = "ok"
        leading = self.runtime.leases.held_accounts()
        detail["role"] = "leader" if leading else "standby"
        detail["leading_accounts"] = leading
        ok = detail.get("vault") == "ok" and detail.get("cloudflare", "ok") == "ok" and not self._stopping.is_set()
        return ok, detail

    # -- scheduled rotation -------------------------------------------------------------------
    def tick(self) -> None:
        now = self.clock()
        for acc in self.settings.accounts:
            if self._stopping.is_set():
                return
            if not self.runtime.leases.holds(acc.id):
                continue
            states = list((self.tunnels.get(acc.id) or {}).values())  # a copy: runs update it concurrently
            quiet = states and all(st.next_due is not None and st.next_due > now and not st.pending
                                   for st in states)
            if quiet and now - self._listed.get(acc.id, 0.0) < RELIST_SECONDS:
                continue  # nothing known is due: spare the Cloudflare rate budget
            self._listed[acc.id] = now
            self._execute(Run(new_rotation_id(), acc.id, None, False, "schedule"))

    def _due_fn(self, account_id: str) -> tuple[Callable[[TunnelInfo], bool], Callable[[TunnelInfo, Record], bool]]:
        account = next(a for a in self.settings.accounts if a.id == account_id)
        states = self.tunnels.setdefault(account_id, {})

        def select(t: TunnelInfo) -> bool:
            return account.policy_for(t.id, t.name) is not None

        def due(t: TunnelInfo, rec: Record) -> bool:
            policy = self._policy(account_id, t.id, t.name)
            st = states.setdefault(t.id, TunnelState(t.name))
            st.name = t.name
            st.state = "unmanaged" if rec.version == 0 else rec.state
            st.pending = rec.pending_psk is not None
            st.last_error = rec.last_error
            rotated = parse_time(rec.rotated_at)
            st.last_rotated = rotated or parse_time(t.last_generated_on)
            # A tunnel whose key is not in Vault yet is due now: managing it is what makes it safe.
            st.next_due = next_due(policy, t.id, rotated if rec.psk else None,
                                   self.clock(), st.failures, st.last_failure)
            labels = {"account": account_id, "tunnel": t.id}
            self.metrics.next_due.labels(**labels).set(st.next_due)
            if st.last_rotated is not None:
                self.metrics.last_success.labels(**labels).set(st.last_rotated)
            age = policy.max_age or (policy.every or 0) * 1.2
            if age:
                self.metrics.max_age.labels(**labels).set(age)
            return st.next_due <= self.clock()

        return select, due

    def _execute(self, run: Run) -> None:
        lock = self._account_locks.setdefault(run.account, threading.Lock())
        with lock:
            if self._stopping.is_set():
                run.state, run.error = "done", "shutting down"
                return
            run.state = "running"
            select, due = self._due_fn(run.account)
            forced = run.trigger != "schedule"
            req = RunRequest(run.account, tunnels=sorted(run.tunnels) if run.tunnels else None,
                             select=None if forced else select, due=_always(due) if forced else due,
                             dry_run=run.dry_run, rotation_id=run.id, psk_for=self.runtime.psk_for(run.account))
            try:
                report = self.runtime.engine.run(req)
            except ConfigError as exc:
                run.state, run.error = "done", str(exc)
                return
            run.report, run.state = report, "done"
            self._record(run, report)

    def _policy(self, account_id: str, tunnel_id: str, name: str) -> Policy:
        account = next(a for a in self.settings.accounts if a.id == account_id)
        return self.settings.policies[account.policy_for(tunnel_id, name) or "default"]

    def _record(self, run: Run, report: RunReport) -> None:
        states = self.tunnels.setdefault(run.account, {})
        now = self.clock()
        for o in report.outcomes:
            self.metrics.rotations.labels(account=run.account, result=o.result).inc()
            st = states.setdefault(o.tunnel_id, TunnelState(o.name))
            if o.result == ROTATED:
                st.failures, st.last_failure, st.last_error = 0, None, None
                st.last_rotated, st.pending, st.state = now, False, "active"
                st.next_due = next_due(self._policy(run.account, o.tunnel_id, o.name), o.tunnel_id, now, now)
                self.metrics.last_success.labels(account=run.account, tunnel=o.tunnel_id).set(now)
                self.metrics.next_due.labels(account=run.account, tunnel=o.tunnel_id).set(st.next_due)
            elif not report.dry_run:
                st.failures += 1
                st.last_failure = now
                st.last_error = o.reason
                st.pending = o.result == UNKNOWN or (o.reconciled and st.pending)
        self.metrics.pending.labels(account=run.account).set(sum(st.pending for st in list(states.values())))
        self.metrics.runs.labels(account=run.account, trigger=run.trigger, ok=str(report.ok).lower()).inc()
        counts = report.counts()
        emit = self.log.info if report.outcomes or report.error else self.log.debug
        emit("rotation_run", account=run.account, rotation_id=report.rotation_id, trigger=run.trigger,
                      dry_run=report.dry_run, ok=report.ok, error=report.error,
                      duration_seconds=round(report.finished_at - report.started_at, 3),
                      **{k: v for k, v in counts.items() if v})

    # -- admin control ------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = self.clock()
        out: dict[str, Any] = {"holder": self.runtime.leases.holder, "accounts": {}}
        for acc in self.settings.accounts:
            out["accounts"][acc.id] = {
                "leader": self.runtime.leases.holds(acc.id),
                "tunnels": {tid: {"name": st.name, "state": st.state, "pending": st.pending,
                                  "psk_age_seconds": None if st.last_rotated is None else int(now - st.last_rotated),
                                  "next_due": None if st.next_due is None else rfc3339(st.next_due),
                                  "last_error": st.last_error, "consecutive_failures": st.failures}
                            for tid, st in dict(self.tunnels.get(acc.id, {})).items()},
            }
        return out

    def trigger(self, account: str, tunnels: list[str] | None, dry_run: bool) -> tuple[str, bool]:
        if account not in self._account_locks:
            raise ConfigError(f"account {account} is not configured", "add it to [[accounts]] in the config")
        wanted = frozenset(tunnels) if tunnels else None
        with self._lock:
            for run in self.runs.values():
                if run.account == account and run.state in ("queued", "running") and run.dry_run == dry_run and (
                        run.tunnels is None or (wanted is not None and wanted <= run.tunnels)):
                    return run.id, True
            run = Run(new_rotation_id(), account, wanted, dry_run, "api")
            self.runs[run.id] = run
            if len(self.runs) > 500:
                for old in [r for r in self.runs.values() if r.state == "done"][:100]:
                    self.runs.pop(old.id, None)
        assert self._queue is not None
        self._queue.submit(self._execute, run)
        return run.id, False

    def run_view(self, run_id: str) -> dict[str, Any] | None:
        run = self.runs.get(run_id)
        return run.view() if run else None


def _always(due: Callable[[TunnelInfo, Record], bool]) -> Callable[[TunnelInfo, Record], bool]:
    """On-demand runs rotate what was asked, but still refresh the schedule view."""
    def forced(t: TunnelInfo, rec: Record) -> bool:
        due(t, rec)
        return True

    return forced


def _now_dt() -> Any:
    import datetime

    return datetime.datetime.now(datetime.UTC)


def build_daemon(settings: Settings, redactor: Redactor | None = None, tick_seconds: float = 60.0,
                 holder: str | None = None) -> Daemon:
    if not settings.accounts:
        raise ConfigError("no [[accounts]] configured", "list the accounts to manage in the config file")
    if settings.admin_token is None:
        raise ConfigError("no admin token", "set ROTATOR_ADMIN_TOKEN or admin.token_file")
    log = structlog.get_logger("rotator")
    metrics = Metrics(CollectorRegistry())
    runtime = build_runtime(settings, log=log, observe_cf=metrics.observe_cloudflare,
                            observe_vault=metrics.observe_vault, on_ratelimit=metrics.ratelimit_remaining.set,
                            on_step=metrics.observe_step, holder=holder)
    runtime.vault_auth.login()
    return Daemon(settings, runtime, metrics, log, tick_seconds=tick_seconds)


def serve_until_signal(daemon: Daemon) -> int:
    stop = stop_on_signals()
    daemon.start()
    stop.wait()
    daemon.stop()
    return 0


def run_daemon(settings: Settings, redactor: Redactor) -> int:
    return serve_until_signal(build_daemon(settings, redactor, tick_seconds=60.0))
