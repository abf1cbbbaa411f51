"""Per-account leases: one rotator acts on an account at a time (docs/design.md section 4).

The rules, in the order they are applied:

- A holder id names its process: ``host:pid:nonce``. The nonce starts with a tag of the machine
  and pid namespace (namespace and machine id hashed, plus the boot time) and the process's start
  time (both readable under the systemd unit's ``ProcSubset=pid``), so another process
  in the same pid namespace can tell for sure whether the holder is still running (a pid reused by
  a younger process counts as gone). A holder in another namespace or on another machine (a
  restarted container, another replica) cannot be checked: its lease is waited out.
- ``acquire`` renews our own lease, takes a free or expired one, and takes over AT ONCE a lease
  whose holder is a process of this machine that is gone. A live holder (or one on another
  machine, which cannot be checked) keeps the account until its lease expires: ``LeaseTaken``
  says who and until when; ``acquire_waiting`` waits for that (bounded by the expiry it saw).
- Every mutating call under a lease runs inside ``covering(account, seconds)`` where ``seconds``
  is the call's total deadline (connect, send, receive, slow body). The lease is renewed first
  and a keepalive thread renews it while the call is in flight; the deadline handed to the call
  (latest start of an attempt) leaves the call's whole deadline before the lease ends. The lease
  record carries ``busy_until``: the latest instant such a call may still land.
- Nobody sends fresh keys (or rolls back) before a predecessor's ``busy_until`` (a dead holder
  taken over, or a lease released after a call whose outcome is unknown): ``covering`` waits for
  it. Re-sending keys already pending in Vault needs no wait: a late landing cannot contradict them.
- ``release`` never hands the account over while a covered call is in flight; after a call that
  ended without an answer it releases with ``busy_until`` still set.
- ``lease_ttl`` shorter than twice the longest call deadline is a configuration error
  (``check_lease_ttl``): a lease renewed just before a call then always outlives it.

KV v2 versions of the lease record are its audit trail; ``unlock`` writes who cleared whom.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from rotator.errors import CasConflict, ConfigError, LeaseHeld, RotatorError, VaultError
from rotator.model import Lease
from rotator.schedule import format_duration

POLL_SECONDS = 1.0  # how often a waiting rotator looks at the lease again
MAX_WAIT_SECONDS = 3600.0  # a lease record claiming more than this is not trusted for a wait
KEEPALIVE_MIN_SECONDS = 0.2
CLOCK_MARGIN_SECONDS = 2.0  # expiry is wall-clock time read on other machines: leave room for skew


class LeaseStore(Protocol):
    """Where leases live (the Vault adapter): CAS on the record's version, like every record."""

    def read_lease(self, account_id: str) -> Lease: ...

    def write_lease(self, account_id: str, holder: str, expires_at: float, cas: int, *,
                    busy_until: float = 0.0, note: Mapping[str, str] | None = None) -> int: ...


class Liveness(enum.Enum):
    ALIVE = "alive on this host"
    GONE = "a process of this host that is gone"
    UNKNOWN = "on another host"


class LeaseTaken(LeaseHeld):
    """Another holder has the account: who, until when (UNIX time) and whether it is known alive."""

    def __init__(self, message: str, hint: str, holder: str, until: float, liveness: Liveness,
                 admin_url: str = "") -> None:
        super().__init__(message, hint)
        self.holder, self.until, self.liveness, self.admin_url = holder, until, liveness, admin_url


def holder_hint(lease: Lease) -> str:
    """What to do about a live holder. Never "stop it": the holder may be the production daemon."""
    if lease.admin_url:
        return (f"it is the daemon leading the account: hand the request to it (ROTATOR_ADMIN_URL={lease.admin_url} "
                "and ROTATOR_ADMIN_TOKEN, without --local), or try again once it lets the account go")
    return "another rotator is working on it; let it finish, then try again"


class LeaseLost(LeaseHeld):
    """The lease could not be renewed before a call: the call was not sent."""


def check_lease_ttl(lease_ttl: float, deadlines: Mapping[str, float]) -> None:
    """``rotation.lease_ttl`` must be at least twice every call deadline (config keys -> seconds)."""
    if lease_ttl < 2:
        raise ConfigError("rotation.lease_ttl: must be at least 2s", "the default is 120s")
    if not deadlines:
        return
    key, longest = max(deadlines.items(), key=lambda kv: kv[1])
    if lease_ttl < 2 * longest:
        raise ConfigError(
            f"rotation.lease_ttl ({_secs(lease_ttl)}) is shorter than twice {key} ({_secs(longest)}): "
            "a call could outlive the lease and land after another rotator took the account over",
            f"raise rotation.lease_ttl to at least {_secs(2 * longest)} or lower {key}")


def call_window(ttl: float, seconds: float) -> tuple[float, float]:
    """For a call of total deadline ``seconds`` right after a renewal: (latest start, latest landing),
    both as seconds from the renewal. The whole call ends before the lease does."""
    margin = margin_for(seconds)
    start = min(seconds, ttl - seconds - margin)
    return start, start + seconds + margin


def margin_for(seconds: float) -> float:
    return min(CLOCK_MARGIN_SECONDS, seconds / 4)


def _secs(value: float) -> str:
    return format_duration(value)


def _utc(ts: float) -> str:
    return time.strftime("%H:%M:%SZ", time.gmtime(ts))


# -- holder ids ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HolderId:
    host: str
    pid: int
    scope: str  # machine + pid namespace tag and boot time ("<tag>-<btime>"); "" when it could not be determined
    start: str  # the process's start time (clock ticks since boot); "" when unknown
    nonce: str

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.scope or 'x'}.{self.start or '0'}.{self.nonce}"

    @classmethod
    def parse(cls, text: str) -> HolderId | None:
        parts = text.split(":")
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        tags = parts[2].split(".")
        if len(tags) != 3 or not all(tags):
            return None
        scope = "" if tags[0] == "x" else tags[0]
        start = "" if tags[1] == "0" else tags[1]
        return cls(parts[0], int(parts[1]), scope, start, tags[2])


BOOT_TIME_SLACK = 1  # seconds two readings of the boot time may differ by and still be the same boot


def boot_time() -> int | None:
    """This boot's start as UNIX seconds, as /proc/stat's ``btime``, without /proc (see LocalProcesses._scope)."""
    try:
        return math.floor(time.clock_gettime(time.CLOCK_REALTIME) - time.clock_gettime(time.CLOCK_BOOTTIME))
    except (AttributeError, OSError):  # not Linux
        return None


class LocalProcesses:
    """Makes this process's holder id and tells whether another holder id is a live process here."""

    def __init__(self, proc: str = "/proc", machine_id: str = "/etc/machine-id") -> None:
        self.proc, self.machine_id = proc, machine_id
        self.host = socket.gethostname().replace(":", "_") or "localhost"
        self.pid = os.getpid()
        self.scope = self._scope()
        self.start = self._start_of(self.pid) or ""

    def new_holder(self) -> str:
        return str(HolderId(self.host, self.pid, self.scope, self.start, secrets.token_hex(3)))

    def probe(self, holder: str) -> Liveness:
        h = HolderId.parse(holder)
        if h is None or not self.scope or h.host != self.host or not self.same_scope(h.scope) or not h.start:
            return Liveness.UNKNOWN
        if h.pid == self.pid:
            # This very process, or an earlier process that had our pid.
            return Liveness.ALIVE if h.start == self.start else Liveness.GONE
        try:
            os.kill(h.pid, 0)
        except ProcessLookupError:
            return Liveness.GONE
        except PermissionError:
            pass  # it exists, under another user
        except OSError:
            return Liveness.UNKNOWN
        start = self._start_of(h.pid)
        if start is not None and start != h.start:
            return Liveness.GONE  # the pid now belongs to a younger process
        return Liveness.ALIVE  # when its start time is unreadable, assume the worst: alive

    def _scope(self) -> str:
        """``<tag>-<btime>``: a hash of the pid namespace (and /etc/machine-id when readable), and the
        boot time in whole seconds. Only what the shipped systemd unit leaves visible is read: with
        ``ProcSubset=pid`` /proc holds nothing but the process directories (no /proc/sys, so no boot_id,
        and no /proc/stat), and ``ProtectProc=invisible`` hides other users' processes (proc(5), mount
        options ``subset=pid`` and ``hidepid``; the kernel's Documentation/filesystems/proc.rst and
        tools/testing/selftests/proc/proc-subset-pid.c: only pids, /proc/self, /proc/thread-self;
        systemd.exec(5), ``ProcSubset=``). The boot time is what /proc/stat calls
        ``btime``: the kernel computes that as CLOCK_REALTIME minus CLOCK_BOOTTIME (fs/proc/stat.c,
        getboottime64), which any process can read with clock_gettime(2). It moves only when the wall
        clock is stepped: two readings then differ and the holder counts as "another host" (waited
        for), the safe side. A one-shot command with the full /proc computes the same scope."""
        try:
            ns = os.readlink(os.path.join(self.proc, "self/ns/pid"))
        except OSError:
            return ""
        try:
            with open(self.machine_id, encoding="ascii") as fh:
                machine = fh.read().strip()
        except (OSError, ValueError):
            machine = ""
        btime = boot_time()
        if btime is None:
            return ""
        return f"{hashlib.sha256(f'{machine}|{ns}'.encode()).hexdigest()[:8]}-{btime}"

    def same_scope(self, other: str) -> bool:
        """Same machine, pid namespace and boot: the tags match and the boot times are at most
        BOOT_TIME_SLACK apart (two readings of a boot time straddling a second, or a leap second)."""
        mine, _, my_boot = self.scope.partition("-")
        theirs, _, their_boot = other.partition("-")
        if not mine or mine != theirs or not my_boot.isdigit() or not their_boot.isdigit():
            return False
        return abs(int(my_boot) - int(their_boot)) <= BOOT_TIME_SLACK

    def _start_of(self, pid: int) -> str | None:
        try:
            with open(os.path.join(self.proc, str(pid), "stat"), encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            return None
        fields = stat.rpartition(")")[2].split()
        return fields[19] if len(fields) > 19 and fields[19].isdigit() else None


# -- the manager --------------------------------------------------------------------------------

@dataclass
class _Cover:
    account_id: str
    busy_until: float
    done: threading.Event


class LeaseManager:
    """Per-account leases in Vault (CAS + expiry) so one rotator acts on an account at a time.

    Thread-safe: the daemon renews from its scheduler, runs renew before each call, and keepalive
    threads renew while a call is in flight.
    """

    def __init__(self, store: LeaseStore, holder: str, ttl: float = 120.0,
                 clock: Callable[[], float] = time.time, *, processes: LocalProcesses | None = None,
                 sleep: Callable[[float], None] = time.sleep, log: Any = None) -> None:
        self.store, self.holder, self.ttl, self.clock, self.sleep = store, holder, ttl, clock, sleep
        self.processes = processes or LocalProcesses()
        self.log = log or structlog.get_logger("rotator.rotation.lease")
        self._held: dict[str, Lease] = {}
        self._inflight: dict[str, list[_Cover]] = {}
        self._pinned: dict[str, float] = {}  # no mutating call before this (a call may still land)
        self._note: dict[str, str] = {}  # written with every renewal (the daemon's admin URL)
        self._lock = threading.RLock()

    def advertise(self, admin_url: str) -> None:
        """Record ``admin_url`` in every lease we write from now on: a one-shot command that meets the
        lease hands its request there instead of waiting (cli.py; docs/design.md sections 4 and 5)."""
        with self._lock:
            self._note = {"admin_url": admin_url} if admin_url else {}

    # -- taking ---------------------------------------------------------------------------------
    def acquire(self, account_id: str) -> Lease:
        """Take or renew the lease; raises LeaseTaken (a LeaseHeld) if another live holder has it."""
        with self._lock:
            lease = self._held.get(account_id)
            if lease is not None:
                try:
                    return self._write(account_id, lease.version)
                except CasConflict:
                    self._held.pop(account_id, None)
            current = self.store.read_lease(account_id)
            now = self.clock()
            if current.holder and current.holder != self.holder and current.expires_at > now:
                liveness = self.processes.probe(current.holder)
                if liveness is not Liveness.GONE:
                    raise self._taken(account_id, current, liveness, now)
                self.log.warning("lease_taken_over", account=account_id, previous_holder=current.holder,
                                 reason="its process is gone")
            if current.holder != self.holder:  # of our own calls we know which may still land
                self._pin(account_id, current.busy_until)
            try:
                return self._write(account_id, current.version, busy_until=self._pinned_at(account_id))
            except CasConflict as exc:
                raise LeaseHeld(f"account {account_id}: another rotator took the lease first",
                                "another replica is rotating it; this one stands by") from exc

    def acquire_waiting(self, account_id: str, *, wait: bool = True,
                        notice: Callable[[str], None] = lambda line: None) -> Lease:
        """``acquire``, waiting for a live holder's lease to expire (bounded by the expiry first seen).

        With ``wait=False`` the first ``LeaseTaken`` is raised at once. Before waiting, ``notice`` gets
        one line for a person: who holds it and how long we wait. A holder that renews its lease while
        we wait is alive and working: after its first expiry we give up.
        """
        give_up: float | None = None
        started = self.clock()
        for _ in range(int(MAX_WAIT_SECONDS / POLL_SECONDS) + 2):
            try:
                return self.acquire(account_id)
            except LeaseTaken as exc:
                now = self.clock()
                if not wait:
                    raise
                if give_up is None:
                    give_up = min(exc.until, now + MAX_WAIT_SECONDS) + POLL_SECONDS
                    notice(f"account {account_id} is leased to {exc.holder} ({exc.liveness.value}) until "
                                f"{_utc(exc.until)}; waiting up to {math.ceil(give_up - now)}s "
                                "(--no-wait fails at once instead)")
                elif now >= give_up:
                    raise LeaseTaken(
                        f"account {account_id} is still leased to {exc.holder} after waiting "
                        f"{now - started:.0f}s: it renewed its lease, so it is alive and working on it",
                        exc.hint, exc.holder, exc.until, exc.liveness, exc.admin_url) from None
                self.sleep(max(0.0, min(POLL_SECONDS, give_up - now)))
        raise LeaseHeld(f"account {account_id}: gave up waiting for the lease", "try again later")

    def _taken(self, account_id: str, current: Lease, liveness: Liveness, now: float) -> LeaseTaken:
        return LeaseTaken(f"account {account_id} is leased to {current.holder} ({liveness.value}) for another "
                          f"{current.expires_at - now:.0f}s", holder_hint(current), current.holder,
                          current.expires_at, liveness, current.admin_url)

    def _write(self, account_id: str, cas: int, busy_until: float | None = None) -> Lease:
        """Write our lease for another TTL; ``busy_until`` None keeps what our lease says."""
        if busy_until is None:
            held = self._held.get(account_id)
            busy_until = held.busy_until if held is not None and held.version == cas else 0.0
        expires = self.clock() + self.ttl
        version = self.store.write_lease(account_id, self.holder, expires, cas, busy_until=busy_until,
                                         note=self._note or None)
        lease = self._held[account_id] = Lease(self.holder, expires, version, busy_until,
                                               self._note.get("admin_url", ""))
        return lease

    def _pinned_at(self, account_id: str) -> float:
        until = self._pinned.get(account_id, 0.0)
        return until if until > self.clock() else 0.0

    def _pin(self, account_id: str, until: float) -> None:
        now = self.clock()
        if until > now:
            # A call under a lease lands before that lease ends: more than a TTL ahead is not believed.
            self._pinned[account_id] = max(self._pinned.get(account_id, 0.0), min(until, now + self.ttl))

    # -- calls under the lease ------------------------------------------------------------------
    @contextlib.contextmanager
    def covering(self, account_id: str, seconds: float, *, resend: bool = False) -> Iterator[float]:
        """Run one mutating call of total deadline ``seconds`` under the lease; yields its deadline.

        The deadline (UNIX time) is the latest instant an attempt of the call may start: the whole
        call, retries included, then ends before the lease, renewed just now, does. Raises LeaseLost
        (nothing sent) when the lease cannot be renewed. A keepalive renews it during the call.
        When the call ends without an answer (an exception not marked ``ambiguous=False``), it may
        still land until ``busy_until``: no call is sent before that, and a release keeps it.

        ``resend``: the call only sends keys that are already pending in Vault. A late landing of an
        earlier call cannot contradict those (its keys are pending too, and stay so until promoted),
        so such a call need not wait; every other call (fresh keys, a rollback) waits.
        """
        if not resend:
            self._wait_for_pin(account_id)
        cover, deadline = self._begin(account_id, seconds)
        keepalive = threading.Thread(target=self._keepalive, args=(cover,), daemon=True,
                                     name=f"lease-keepalive-{account_id[:8]}")
        keepalive.start()
        answered = False
        try:
            yield deadline
            answered = True
        except BaseException as exc:
            # A definite refusal (an error that says it is not ambiguous) cannot land later either.
            answered = getattr(exc, "ambiguous", None) is False
            raise
        finally:
            cover.done.set()
            keepalive.join(timeout=max(0.0, cover.busy_until - self.clock()) + 5.0)
            self._end(cover, answered)

    def _begin(self, account_id: str, seconds: float) -> tuple[_Cover, float]:
        """Renew the lease, recording how long the call may land; returns the cover and the deadline."""
        start, landing = call_window(self.ttl, seconds)
        if start <= 0:
            raise LeaseLost(f"account {account_id}: a lease of {_secs(self.ttl)} is too short for a call of "
                            f"{_secs(seconds)}",
                            "raise rotation.lease_ttl to at least twice the call's timeout")
        with self._lock:
            held = self._held.get(account_id)
            if held is None:
                raise LeaseLost(f"account {account_id}: this rotator does not hold the lease",
                                "the staged keys are left for the lease holder to reconcile")
            now = self.clock()
            busy = max(now + landing, self._pinned_at(account_id),
                       *(c.busy_until for c in self._inflight.get(account_id, [])))
            try:
                lease = self._write(account_id, held.version, busy_until=busy)
            except VaultError as exc:
                if isinstance(exc, CasConflict):
                    self._held.pop(account_id, None)
                raise LeaseLost(f"lease not renewed before the call ({exc})",
                                "the staged keys are left for the lease holder to reconcile") from exc
            cover = _Cover(account_id, lease.busy_until, threading.Event())
            self._inflight.setdefault(account_id, []).append(cover)
            return cover, now + start

    def _end(self, cover: _Cover, answered: bool) -> None:
        with self._lock:
            covers = self._inflight[cover.account_id]
            covers.remove(cover)
            if not covers:
                del self._inflight[cover.account_id]
            if answered:
                self._clear_busy(cover.account_id)
            else:  # no answer: the call may still land until busy_until; nobody sends before that
                self._pin(cover.account_id, cover.busy_until)

    def _keepalive(self, cover: _Cover) -> None:
        """Renew the lease every third of its TTL until the call ends (at the latest at busy_until)."""
        interval = max(KEEPALIVE_MIN_SECONDS, self.ttl / 3)
        for _ in range(int((cover.busy_until - self.clock()) / interval) + 2):
            if cover.done.wait(timeout=max(0.0, min(interval, cover.busy_until - self.clock()))):
                return
            if self.clock() >= cover.busy_until:
                return
            with self._lock:
                held = self._held.get(cover.account_id)
                if held is None:
                    return
                try:
                    self._write(cover.account_id, held.version)
                except RotatorError as exc:
                    # The call's deadline already ends before the lease: keep trying while it runs.
                    self.log.warning("lease_keepalive_failed", account=cover.account_id, error=str(exc))
                    if isinstance(exc, CasConflict):
                        return

    def _clear_busy(self, account_id: str) -> None:
        """The call answered: nothing of it can land later. Best effort (a stale busy_until only delays)."""
        held = self._held.get(account_id)
        if held is None or held.busy_until == 0.0 or self._inflight.get(account_id):
            return
        try:
            self._write(account_id, held.version, busy_until=self._pinned_at(account_id))
        except RotatorError as exc:
            self.log.debug("lease_busy_clear_failed", account=account_id, error=str(exc))

    def _wait_for_pin(self, account_id: str) -> None:
        """Wait (bounded) until no call of a predecessor (or an unanswered one of ours) can land."""
        with self._lock:
            until = self._pinned_at(account_id)
            if not until:
                self._pinned.pop(account_id, None)
                return
        now = self.clock()
        self.log.warning("lease_waiting_for_late_call", account=account_id, seconds=round(until - now, 3),
                         message=f"an earlier call may still land until {_utc(until)}; waiting "
                                 f"{math.ceil(until - now)}s before sending fresh keys")
        for _ in range(int(MAX_WAIT_SECONDS / POLL_SECONDS) + 2):
            now = self.clock()
            if now >= until:
                break
            self.sleep(min(POLL_SECONDS, until - now))
        with self._lock:
            if self._pinned.get(account_id, 0.0) <= self.clock():
                self._pinned.pop(account_id, None)

    def busy_until(self) -> float:
        """The latest instant a call in flight under any of our leases may land (0 when none)."""
        with self._lock:
            return max((c.busy_until for covers in self._inflight.values() for c in covers), default=0.0)

    # -- giving back ----------------------------------------------------------------------------
    def release(self, account_id: str) -> bool:
        """Give the account back; returns False when it was kept because a covered call is in flight."""
        with self._lock:
            if self._inflight.get(account_id):
                self.log.warning("lease_kept", account=account_id,
                                 reason="a call under the lease may still land; it expires on its own",
                                 busy_until=self.busy_until())
                return False
            lease = self._held.pop(account_id, None)
            if lease is None:
                return True
            try:
                self.store.write_lease(account_id, "", 0.0, lease.version, busy_until=self._pinned_at(account_id))
            except VaultError:
                pass  # it expires on its own
            return True

    def expires_at(self, account_id: str) -> float | None:
        with self._lock:
            lease = self._held.get(account_id)
            return lease.expires_at if lease is not None else None

    def holds(self, account_id: str, margin: float = 0.0) -> bool:
        with self._lock:
            lease = self._held.get(account_id)
            return lease is not None and lease.expires_at - margin > self.clock()

    def held_accounts(self) -> list[str]:
        with self._lock:
            return [a for a, lease in self._held.items() if lease.expires_at > self.clock()]


# -- unlock -------------------------------------------------------------------------------------

def unlock(store: LeaseStore, account_id: str, processes: LocalProcesses, me: str,
           clock: Callable[[], float] = time.time) -> str:
    """Clear a lease whose holder is known to be gone; returns a one-line account of what was done.

    Refuses (LeaseTaken) when the holder is alive on this host or cannot be checked (another host)
    and its lease has not expired. The cleared version records who cleared whom.
    """
    current = store.read_lease(account_id)
    now = clock()
    if not current.holder:
        return f"account {account_id}: the lease is free; nothing to unlock"
    liveness = processes.probe(current.holder)
    expired = current.expires_at <= now
    if not expired and liveness is Liveness.ALIVE:
        pid = HolderId.parse(current.holder).pid  # type: ignore[union-attr]  # ALIVE implies it parsed
        hint = holder_hint(current) if current.admin_url else (
            f"process {pid} is still working on it; when it ends it releases the lease (nothing to unlock)")
        raise LeaseTaken(f"account {account_id} is leased to {current.holder}, a live process on this host",
                         hint, current.holder, current.expires_at, liveness, current.admin_url)
    if not expired and liveness is Liveness.UNKNOWN:
        raise LeaseTaken(f"account {account_id} is leased to {current.holder}, which cannot be checked from here "
                         f"(another host or container); it expires in {current.expires_at - now:.0f}s",
                         holder_hint(current) if current.admin_url else
                         "wait for it to finish or for its lease to expire", current.holder,
                         current.expires_at, liveness, current.admin_url)
    busy = current.busy_until if current.busy_until > now else 0.0
    try:
        version = store.write_lease(account_id, "", 0.0, current.version, busy_until=busy, note={
            "released_by": me, "previous_holder": current.holder,
            "released_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))})
    except CasConflict as exc:
        raise LeaseHeld(f"account {account_id}: the lease changed while unlocking", "run unlock again") from exc
    why = "its lease had expired" if expired else "its process is gone"
    tail = f"; the next rotator waits {math.ceil(busy - now)}s for a call of it that may still land" if busy else ""
    return (f"account {account_id}: cleared the lease of {current.holder} ({why}); "
            f"the old holder stays in Vault's history (version {version - 1}){tail}")
