"""The composition root of the long-lived service: APScheduler jobs, the admin server, signals, HA.

Two jobs run on APScheduler (3.x, ``max_instances=1``, coalescing, an explicit misfire grace):
``leases`` keeps or takes each account's lease (leadership) and the Vault token fresh; ``tick``
rotates the due tunnels of every account this replica leads. On-demand runs from the admin API
go through a one-worker queue, single-flight per account and tunnel set. SIGTERM/SIGINT stop new
work, let the in-flight batch finish (bounded), release the leases and exit 0.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CollectorRegistry

from rotator.config import Settings, check_for_daemon, split_listen
from rotator.errors import ConfigError, LeaseHeld, RotatorError, VaultError
from rotator.httpserver import ServerThread, stop_on_signals
from rotator.model import Record, TunnelInfo
from rotator.rotation.engine import ROTATED, UNKNOWN, WAITING, RunReport, RunRequest, new_rotation_id
from rotator.rotation.ports import HistoryStore
from rotator.schedule import Policy, next_cron, parse_cron
from rotator.service.admin import build_app
from rotator.service.inventory import TunnelView, assess, from_plan, rotated, summary
from rotator.service.logging import Redactor
from rotator.service.metrics import Metrics
from rotator.service.runs import DONE, FAILED, RUNNING, Run, Runs
from rotator.wiring import RunOptions, Runtime, build_runtime

SHUTDOWN_GRACE = 30.0
RELIST_SECONDS = 600.0  # new tunnels are noticed within this long even when nothing is due
CONNECT_BACKOFF_MAX = 60.0  # at start-up, Vault and Cloudflare are retried at most this far apart
REFRESH_CHUNK = 64  # records read back per round after a run (Daemon._refresh)


@dataclass
class Daemon:
    settings: Settings
    runtime: Runtime
    metrics: Metrics
    log: Any
    tick_seconds: float = 60.0
    clock: Callable[[], float] = time.time
    views: dict[str, dict[str, TunnelView]] = field(default_factory=dict)
    runs: Runs = field(default_factory=Runs)
    _failures: dict[str, dict[str, tuple[int, float]]] = field(default_factory=dict)
    _waiting: dict[str, set[str]] = field(default_factory=dict)  # tunnels whose key waits for an ack
    _partner_down: dict[str, set[str]] = field(default_factory=dict)  # tunnels waiting for their partner
    _stopping: threading.Event = field(default_factory=threading.Event)
    _account_locks: dict[str, threading.Lock] = field(default_factory=dict)
    _queue: concurrent.futures.ThreadPoolExecutor | None = None
    _scheduler: BackgroundScheduler | None = None
    _server: ServerThread | None = None
    _ready: dict[str, Any] = field(default_factory=dict)
    _listed: dict[str, float] = field(default_factory=dict)
    _leading: dict[str, bool] = field(default_factory=dict)
    _connected: dict[str, bool] = field(default_factory=dict)
    _retry_at: dict[str, tuple[int, float]] = field(default_factory=dict)
    _report_at: float | None = None  # when the [report] cron next fires

    def __post_init__(self) -> None:
        for acc in self.settings.accounts:
            self._account_locks[acc.id] = threading.Lock()
            self.views[acc.id] = {}
            self._failures[acc.id] = {}
        self.runs = Runs(queue_limit=self.settings.admin.queue)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, serve_admin: bool = True) -> None:
        """Bind the admin port first (a clash is a one-line ConfigError before any lease is taken),
        then connect and lead. Vault or Cloudflare unreachable: start anyway, not ready, retry."""
        if serve_admin:
            host, port = split_listen(self.settings.admin.listen)
            app = build_app(self, self.metrics.registry, self.settings.admin.token)
            try:
                self._server = ServerThread(app, host=host, port=port, name="admin").start()
            except OSError as exc:
                reason = "address in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
                raise ConfigError(f"cannot listen on {self.settings.admin.listen}: {reason}",
                                  "set admin.listen to a free HOST:PORT or stop what holds it") from None
            # Every lease we write names where we answer: a one-shot command that meets it hands its
            # request here instead of waiting for a lease we renew forever (issue 20 item 5).
            self.runtime.leases.advertise(self.settings.admin.advertise_url or advertised(self._server.url))
        self._queue = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="on-demand")
        self.connect()
        scheduler = BackgroundScheduler(timezone="UTC", job_defaults={
            "max_instances": 1, "coalesce": True, "misfire_grace_time": 30})
        scheduler.add_job(self.connect, "interval", seconds=1.0, id="connect")
        scheduler.add_job(self.maintain_leases, "interval", seconds=max(1.0, self.settings.rotation.lease_ttl / 3),
                          id="leases")
        scheduler.add_job(self.tick, "interval", seconds=self.tick_seconds, id="tick", next_run_time=_now_dt())
        if self.settings.report is not None:
            # The report's cron means what a policy's does (rotator.schedule, crontab day-of-week: 0 is
            # Sunday); APScheduler 3's CronTrigger.from_crontab counts 0 as Monday (agronholm/apscheduler#286,
            # fixed only in 4.x), so a minutely job asks ours.
            self._report_at = next_cron(parse_cron(self.settings.report.cron), self.clock(), "UTC")
            scheduler.add_job(self.report_if_due, "interval", seconds=60.0, id="report")
        scheduler.start()
        self._scheduler = scheduler
        self.log.info("daemon_started", accounts=len(self.settings.accounts), admin=self.admin_url,
                      holder=self.runtime.leases.holder)

    @property
    def admin_url(self) -> str | None:
        return self._server.url if self._server else None

    def _wait_for_runs(self) -> None:
        """Let in-flight runs end: for the grace period, and beyond it while a call under a lease may
        still land (every call has a total deadline, so this is bounded too)."""
        grace_end = time.monotonic() + SHUTDOWN_GRACE
        passes = int(SHUTDOWN_GRACE + 3 * self.settings.rotation.lease_ttl) + 10
        for lock in self._account_locks.values():
            for _ in range(passes):
                wait = max(grace_end - time.monotonic(), self.runtime.leases.busy_until() - self.clock())
                if lock.acquire(timeout=max(0.0, min(wait, 1.0))):
                    lock.release()
                    break
                if wait <= 0:
                    break

    def stop(self, release: bool = True) -> float:
        """Stop new work, finish the in-flight batch (bounded), release leases. Returns seconds taken."""
        started = time.monotonic()
        self._stopping.set()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        if self._queue is not None:
            self._queue.shutdown(wait=False, cancel_futures=True)
        self.runs.cancel_waiting("shutting down")
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

    # -- connecting: Vault first, then Cloudflare, each retried with backoff until it answers --------
    def connect(self) -> None:
        if self._stopping.is_set():
            return
        if not self._connected.get("vault") and self._attempt("vault", self._connect_vault):
            self.maintain_leases()
        if self._connected.get("vault") and not self._connected.get("cloudflare") and self.settings.accounts:
            self._attempt("cloudflare", lambda: self.runtime.cloudflare.list_tunnels(self.settings.accounts[0].id))

    def _connect_vault(self) -> None:
        self.runtime.vault_auth.login()
        self.runtime.check_vault()

    def _attempt(self, what: str, action: Callable[[], object]) -> bool:
        failures, at = self._retry_at.get(what, (0, 0.0))
        if time.monotonic() < at:
            return False
        try:
            action()
        except RotatorError as exc:
            wait = min(CONNECT_BACKOFF_MAX, 2.0 ** failures)
            self._retry_at[what] = (failures + 1, time.monotonic() + wait)
            self._ready[what] = str(exc)
            (self.log.warning if failures == 0 else self.log.debug)(
                f"{what}_unavailable", error=str(exc), retry_in_seconds=wait, attempt=failures + 1)
            return False
        self._connected[what] = True
        self._ready[what] = "ok"
        if failures:
            self.log.info(f"{what}_available", attempts=failures + 1)
        return True

    # -- leadership ---------------------------------------------------------------------------
    def maintain_leases(self) -> None:
        if self._stopping.is_set() or not self._connected.get("vault"):
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

    def report_if_due(self) -> list[str]:
        """The ``report`` job: write the reports once the cron's next time has come."""
        if self.settings.report is None or self._report_at is None or self.clock() < self._report_at:
            return []
        self._report_at = next_cron(parse_cron(self.settings.report.cron), self.clock(), "UTC")
        return self.write_reports()

    def write_reports(self) -> list[str]:
        """``[report]``: the audit report of each account this replica leads, for the period ending now,
        written atomically as ``<directory>/psk-report-<account>-<from>-<to>.<format>``. A failure is
        logged and the next run tries again; nothing is left half written."""
        from rotator.service import report as rpt

        settings = self.settings.report
        if settings is None:
            return []
        end = self.clock()
        start = end - settings.period
        manual = [d.name for d in self.settings.devices if d.kind == "manual"]
        store = self.runtime.store
        written: list[str] = []
        for acc in self.settings.accounts:
            if not self._leading.get(acc.id, False):
                continue
            try:
                if not isinstance(store, HistoryStore):
                    raise VaultError("the record store keeps no version history", "use the Vault KV v2 store")
                os.makedirs(settings.directory, exist_ok=True)
                made = rpt.collect(store, [acc.id], rpt.policy_lookup(self.settings), start, end, manual)
                paths = rpt.write_files(made, settings.directory, rpt.file_stem(acc.id, start, end), settings.output)
            except (VaultError, OSError) as exc:
                self.log.warning("report_failed", account=acc.id, error=str(exc))
                continue
            written.extend(paths)
            self.log.info("report_written", account=acc.id, files=paths, digest=made["digest"],
                          breached=made["fleet"]["breached"])
        return written

    def _vault_state(self) -> str:
        """``ok`` or why Vault cannot be used; keeps psk_rotator_vault_up in step."""
        try:
            self.runtime.check_vault()
        except RotatorError as exc:
            self.metrics.vault_up.set(0)
            return str(exc)
        self.metrics.vault_up.set(1)
        return "ok"

    def ready(self) -> tuple[bool, dict[str, Any]]:
        detail: dict[str, Any] = {"holder": self.runtime.leases.holder}
        detail["vault"] = self._vault_state() if self._connected.get("vault") else self._ready.get(
            "vault", "connecting")
        if not self._connected.get("cloudflare"):
            detail["cloudflare"] = self._ready.get("cloudflare", "connecting")
        elif self.metrics.cloudflare_ok is False:
            detail["cloudflare"] = "token refused on the last call"
        else:
            detail["cloudflare"] = "ok"
        leading = self.runtime.leases.held_accounts()
        detail["role"] = "leader" if leading else "standby"
        detail["leading_accounts"] = leading
        ok = detail["vault"] == "ok" and detail["cloudflare"] == "ok" and not self._stopping.is_set()
        return ok, detail

    # -- scheduled rotation -------------------------------------------------------------------
    def tick(self) -> None:
        now = self.clock()
        for acc in self.settings.accounts:
            if self._stopping.is_set():
                return
            if not self.runtime.leases.holds(acc.id):
                continue
            views = list((self.views.get(acc.id) or {}).values())  # a copy: runs update it concurrently
            quiet = views and all(v.next_due is not None and v.next_due > now and not v.pending for v in views)
            if quiet and now - self._listed.get(acc.id, 0.0) < RELIST_SECONDS:
                continue  # nothing known is due: spare the Cloudflare rate budget
            self._listed[acc.id] = now
            self._execute(Run(new_rotation_id(), acc.id, None, False, "schedule"))

    def _policy(self, account_id: str, tunnel: TunnelInfo) -> Policy | None:
        account = next(a for a in self.settings.accounts if a.id == account_id)
        name = account.policy_for(tunnel.id, tunnel.name)
        return None if name is None else self.settings.policies[name]

    def _observe(self, account_id: str, report: RunReport) -> None:
        """Keep what the plan saw of each tunnel (service/inventory.py) for /v1/status, and export it."""
        views = self.views.setdefault(account_id, {})
        failures = self._failures.setdefault(account_id, {})
        for seen in report.views:
            policy = self._policy(account_id, TunnelInfo(seen.tunnel_id, seen.name))
            before = views.get(seen.tunnel_id)
            view = from_plan(seen, policy, failures.get(seen.tunnel_id, (0, None))[0])
            views[seen.tunnel_id] = view
            if view.drifted and not (before and before.drifted):
                self.metrics.drift_detected.labels(account=account_id).inc()
                self.log.warning("drift_detected", account=account_id, tunnel=view.tunnel_id, tunnel_name=view.name,
                                 message="Cloudflare reports a key set outside the rotator")
            self.metrics.observe_tunnel(account_id, view)

    def _execute(self, run: Run) -> None:
        """One run, whatever happens inside it: it ends done or failed, and the account is free again."""
        lock = self._account_locks.setdefault(run.account, threading.Lock())
        with lock:
            if self._stopping.is_set():
                run.state, run.error = FAILED, "shutting down"
                return
            run.state = RUNNING
            try:
                report = self.runtime.engine.run(self._request(run))
            except RotatorError as exc:
                run.state, run.error = FAILED, str(exc)
                self.log.error("rotation_run", account=run.account, rotation_id=run.id, trigger=run.trigger,
                               kind=run.kind, ok=False, error=run.error)
                self.metrics.runs.labels(account=run.account, trigger=run.trigger, ok="false").inc()
                return
            except Exception as exc:  # the run boundary: nothing may wedge the daemon
                run.state = FAILED
                run.error = f"internal error ({type(exc).__name__}); the daemon log has the details"
                self.log.error("rotation_run_crashed", account=run.account, rotation_id=run.id,
                               trigger=run.trigger, kind=run.kind, error=run.error, exc_info=True)
                self.metrics.runs.labels(account=run.account, trigger=run.trigger, ok="false").inc()
                return
            run.report, run.state = report, DONE
            self._observe(run.account, report)
            self._record(run, report)

    def _request(self, run: Run) -> RunRequest:
        """The run's request: the schedule decides in the engine's pure plan (rotation/plan.py)."""
        account = run.account
        common: dict[str, Any] = {
            "rotation_id": run.id, "policy_for": lambda t: self._policy(account, t),
            "failures": dict(self._failures.get(account, {})), **self.runtime.request_options(account),
        }

        def select(t: TunnelInfo) -> bool:
            return self._policy(account, t) is not None

        if run.trigger == "schedule" or run.due:
            return RunRequest(account, select=select, dry_run=run.dry_run, **common)
        if run.reconcile:
            return RunRequest(account, select=select, reconcile_only=True, dry_run=run.dry_run, **common)
        return RunRequest(account, tunnels=sorted(run.tunnels) if run.tunnels else None, due=lambda t, rec: True,
                          dry_run=run.dry_run, rollback=run.rollback, **common)

    def _record(self, run: Run, report: RunReport) -> None:
        failures = self._failures.setdefault(run.account, {})
        views = self.views.setdefault(run.account, {})
        now = self.clock()
        for o in report.outcomes:
            if report.dry_run:
                continue  # a dry run changes nothing: not a rotation, not a failure
            self.metrics.rotations.labels(account=run.account, result=o.result).inc()
            waiting = self._waiting.setdefault(run.account, set())
            (waiting.add if o.result == "waiting" else waiting.discard)(o.tunnel_id)
            gated = self._partner_down.setdefault(run.account, set())
            (gated.add if o.tunnel_id in report.partner_down else gated.discard)(o.tunnel_id)
            if o.result == ROTATED:
                failures.pop(o.tunnel_id, None)
                tunnel = TunnelInfo(o.tunnel_id, o.name)
                policy = self._policy(run.account, tunnel) or self.settings.policies["default"]
                before = views.get(o.tunnel_id)
                view = rotated(before, tunnel, policy, now, report.rotation_id)
                views[o.tunnel_id] = view
                self.metrics.observe_tunnel(run.account, view)
            else:
                count, _ = failures.get(o.tunnel_id, (0, now))
                failures[o.tunnel_id] = (count + 1, now)
                before = views.get(o.tunnel_id)
                if before is not None:
                    pending = o.result in (UNKNOWN, WAITING) or (o.reconciled and before.pending)
                    waits = o.result == WAITING  # waiting for an operator is not a failure (issue 20 item 11)
                    views[o.tunnel_id] = dataclasses.replace(before, pending=pending, failed=not waits, waiting=waits,
                                                             last_error=o.reason, failures=count + 1)
        if not report.dry_run:
            try:
                self._refresh(run.account, report)
            except RotatorError as exc:  # the views derived from the outcomes stay
                self.log.warning("status_refresh_failed", account=run.account, error=str(exc))
        current = list(views.values())
        self.metrics.pending.labels(account=run.account).set(sum(v.pending for v in current))
        self.metrics.waiting_ack.labels(account=run.account).set(len(self._waiting.get(run.account, ())))
        self.metrics.partner_down.labels(account=run.account).set(len(self._partner_down.get(run.account, ())))
        self.metrics.runs.labels(account=run.account, trigger=run.trigger, ok=str(report.ok).lower()).inc()
        counts = report.counts()
        if report.error:
            emit = self.log.error
        elif not report.ok:
            emit = self.log.warning
        else:
            emit = self.log.info if report.outcomes else self.log.debug
        emit("rotation_run", account=run.account, rotation_id=report.rotation_id, trigger=run.trigger,
             kind=run.kind, dry_run=report.dry_run, ok=report.ok, error=report.error,
             duration_seconds=round(report.finished_at - report.started_at, 3),
             **{k: v for k, v in counts.items() if v})

    def _refresh(self, account: str, report: RunReport) -> None:
        """The views of the tunnels a run acted on, from their records as the run left them: the same
        ``assess`` as ``rotator status`` (service/inventory.py), so /v1/status shows what the CLI shows
        (device, rotation id, ipsec id, state). One Vault read per tunnel acted on, in chunks: a chunk
        whose every read failed ends the refresh (Vault went away: a wait of one call deadline, not one per
        tunnel), and where a read failed the view derived from the outcome stays. Drift is the listing's
        to judge: a rotated tunnel is not drifted, another keeps what the plan saw."""
        outcomes = {o.tunnel_id: o for o in report.outcomes}
        ids = list(outcomes)
        records: dict[str, Record | VaultError] = {}
        for start in range(0, len(ids), REFRESH_CHUNK):
            chunk = self.runtime.store.read_many(account, ids[start:start + REFRESH_CHUNK])
            records.update(chunk)
            if all(isinstance(r, VaultError) for r in chunk.values()):
                break
        views, failures, now = self.views.setdefault(account, {}), self._failures.get(account, {}), self.clock()
        for tid, o in outcomes.items():
            record = records.get(tid)
            if not isinstance(record, Record):
                continue
            tunnel = TunnelInfo(tid, o.name)
            count, last = failures.get(tid, (0, None))
            view = assess(self._policy(account, tunnel), tunnel, record, now, count, last,
                          manual=self.runtime.is_manual(record.device))
            before = views.get(tid)
            drifted = bool(before and before.drifted) and o.result != ROTATED
            views[tid] = dataclasses.replace(view, drifted=drifted)
            self.metrics.observe_tunnel(account, views[tid])

    # -- admin control ------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = self.clock()
        out: dict[str, Any] = {"holder": self.runtime.leases.holder, "accounts": {},
                               "cloudflare_rate_budget": self.runtime.budget_view()}
        for acc in self.settings.accounts:
            views = dict(self.views.get(acc.id, {}))
            out["accounts"][acc.id] = {
                "leader": self.runtime.leases.holds(acc.id),
                "summary": summary(views.values()),
                "tunnels": {tid: view.as_dict(now) for tid, view in views.items()},
            }
        return out

    def trigger(self, account: str, tunnels: list[str] | None, dry_run: bool,
                kind: str = "rotate") -> tuple[str, bool]:
        """Queue an on-demand run. ConfigError: unknown account or tunnel; QueueFull: too many waiting."""
        if account not in self._account_locks:
            raise ConfigError(f"account {account} is not configured", "add it to [[accounts]] in the config")
        if tunnels:
            self._check_tunnels(account, tunnels)
        wanted = frozenset(tunnels) if tunnels else None
        run, deduplicated = self.runs.admit(Run(new_rotation_id(), account, wanted, dry_run, "api",
                                                reconcile=kind == "reconcile", rollback=kind == "rollback",
                                                due=kind == "due"))
        if not deduplicated:
            assert self._queue is not None
            self._queue.submit(self._execute, run)
        return run.id, deduplicated

    def _check_tunnels(self, account: str, tunnels: list[str]) -> None:
        """Every named tunnel exists (by id or name), from the last listing, or a fresh one when it is not there."""
        def unknown() -> list[str]:
            views = self.views.get(account, {})
            names = {v.name for v in views.values()}
            return [t for t in tunnels if t not in views and t not in names]

        missing = unknown()
        if missing:
            try:
                for t in self.runtime.cloudflare.list_tunnels(account):
                    self.views.setdefault(account, {}).setdefault(
                        t.id, TunnelView(t.id, t.name, "unknown", False, False, False, None, None, None))
            except RotatorError:
                return  # cannot tell now: the run reports it
            missing = unknown()
        if missing:
            raise ConfigError(f"no tunnel {missing[0]!r} in account {account}",
                              "name tunnels by id or exact name as GET /v1/status lists them")

    def acknowledge(self, account: str, tunnels: list[str], holds: str | None,
                    rotation_id: str | None) -> tuple[dict[str, str | None], str | None]:
        """The admin API's ack: the engine's (model.ack's rules, all or nothing), then a reconcile run
        that finishes what was acknowledged. ConfigError: unknown account or tunnel."""
        if account not in self._account_locks:
            raise ConfigError(f"account {account} is not configured", "add it to [[accounts]] in the config")
        answer = self.runtime.engine.acknowledge(account, tunnels, holds, rotation_id)
        if any(why is not None for why in answer.values()):
            return answer, None
        return answer, self.trigger(account, None, False, "reconcile")[0]

    def run_view(self, run_id: str) -> dict[str, Any] | None:
        run = self.runs.get(run_id)
        return run.view() if run else None


def advertised(url: str) -> str:
    """The admin URL to record in leases: a wildcard bind (0.0.0.0, ::) is reached over loopback here."""
    return url.replace("//0.0.0.0:", "//127.0.0.1:").replace("//[::]:", "//[::1]:")


def _now_dt() -> Any:
    import datetime

    return datetime.datetime.now(datetime.UTC)


def build_daemon(settings: Settings, redactor: Redactor | None = None, tick_seconds: float = 60.0,
                 holder: str | None = None) -> Daemon:
    """Builds the parts; no network. Vault and Cloudflare are first reached by ``Daemon.start``."""
    check_for_daemon(settings)
    log = structlog.get_logger("rotator")
    metrics = Metrics(CollectorRegistry())
    metrics.known([a.id for a in settings.accounts], [d.name for d in settings.devices])
    stopping = threading.Event()
    runtime = build_runtime(settings, log=log, observer=metrics, holder=holder,
                            options=RunOptions(keep_leases=True, should_stop=stopping.is_set))
    return Daemon(settings, runtime, metrics, log, tick_seconds=tick_seconds, _stopping=stopping)


def serve_until_signal(daemon: Daemon) -> int:
    """Start, serve until SIGTERM/SIGINT, stop. Leases are released on every way out."""
    stop = stop_on_signals()
    try:
        daemon.start()
        stop.wait()
    finally:
        daemon.stop()
    return 0


def run_daemon(settings: Settings, redactor: Redactor) -> int:
    return serve_until_signal(build_daemon(settings, redactor, tick_seconds=60.0))
