"""In-memory fakes of every port in rotator/rotation/ports.py, with fault injection, and the
invariant (docs/design.md section 2, both ends) as one assertion usable by every test.

The fakes behave like the real services on the points the protocol relies on: Vault's CAS and
versions, Cloudflare's bulk set answer (applied / unapplied / contradictory), a device that holds
one key per tunnel and verifies against the key Cloudflare holds. Faults are injected by naming an
operation and what happens there; ``Crash`` (a BaseException) simulates the process dying.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rotator.adapters.devices._common import DeviceBase
from rotator.errors import CasConflict, CloudflareError, VaultError
from rotator.model import Lease, PskSetResult, Record, TunnelInfo, check_distinct
from rotator.rotation.ports import DeviceResult, DeviceStatus, DeviceTunnel, HealthState, KeyRules
from rotator.secret import Secret

Fault = Callable[..., Any]


class VirtualClock:
    """A clock that moves only when someone sleeps on it (or a test advances it): waits on time (a lease
    pin, a retry backoff, a rate window) go through their whole logic in no real time. Starts at the
    real UNIX time so timestamps look like today's. Thread-safe; ``slept`` lists every wait."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start
        self.slept: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.slept.append(seconds)
            self.now += seconds


class Crash(BaseException):
    """The process died here (SIGKILL): nothing after this point runs."""


class Faults:
    """``on(op, fault, times)``: the next ``times`` calls of ``op`` run ``fault(*args)`` first. A fault
    raises (an error, or Crash) or returns a value the fake uses instead of its normal behaviour."""

    def __init__(self) -> None:
        self._faults: dict[str, list[Fault]] = defaultdict(list)
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def on(self, op: str, fault: Fault, times: int = 1) -> None:
        with self._lock:
            self._faults[op].extend([fault] * times)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, op: str) -> Fault | None:
        with self._lock:
            self.counts[op] += 1
            queue = self._faults.get(op)
            return queue.pop(0) if queue else None


def raising(exc: BaseException) -> Fault:
    def fault(*_: Any) -> Any:
        raise exc
    return fault


_clock = itertools.count(1)


def stamp() -> str:
    """A strictly increasing RFC 3339 time (Cloudflare's last_generated_on)."""
    n = next(_clock)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(1_700_000_000 + n)) + "Z"


def tid(n: int) -> str:
    return f"{n:032x}"


ACCOUNT = "023e105f4ecef8ad9ca31a8372d0c353"


# -- Vault -----------------------------------------------------------------------------------------

class FakeVault:
    """RecordStore: KV v2 semantics for records (CAS on version, history kept) and leases.
    Ops for faults: ``read``, ``write`` (per record, args: the record), ``lease`` (read),
    ``lease_write``."""

    def __init__(self) -> None:
        self.versions: dict[tuple[str, str], list[Record]] = defaultdict(list)
        self.leases: dict[str, Lease] = {}
        self.faults = Faults()
        self._lock = threading.Lock()

    def latest(self, account_id: str, tunnel_id: str) -> Record | None:
        with self._lock:
            history = self.versions.get((account_id, tunnel_id))
            return dataclasses.replace(history[-1]) if history else None

    def read(self, account_id: str, tunnel_id: str) -> Record:
        fault = self.faults.take("read")
        if fault is not None:
            fault(account_id, tunnel_id)
        return self.latest(account_id, tunnel_id) or Record(account_id, tunnel_id)

    def read_many(self, account_id: str, tunnel_ids: Sequence[str]) -> dict[str, Record | VaultError]:
        out: dict[str, Record | VaultError] = {}
        for t in tunnel_ids:
            try:
                out[t] = self.read(account_id, t)
            except VaultError as exc:
                out[t] = exc
        return out

    def write_many(self, records: list[Record]) -> dict[str, Record | VaultError]:
        check_distinct((f"{r.account_id}/{r.tunnel_id}" for r in records), "write_many")  # as VaultStore
        out: dict[str, Record | VaultError] = {}
        for rec in records:
            try:
                out[rec.tunnel_id] = self._write(rec)
            except VaultError as exc:
                out[rec.tunnel_id] = exc
        return out

    def _write(self, rec: Record) -> Record:
        fault = self.faults.take("write")
        if fault is not None:
            fault(rec)
        with self._lock:
            history = self.versions[(rec.account_id, rec.tunnel_id)]
            if rec.version != len(history):
                raise CasConflict(f"check-and-set parameter did not match the current version for {rec.tunnel_id}")
            stored = dataclasses.replace(rec, version=len(history) + 1)
            history.append(stored)
            return dataclasses.replace(stored)

    def put(self, rec: Record) -> Record:
        """Write outside the rotator (an operator, another replica)."""
        current = self.latest(rec.account_id, rec.tunnel_id)
        return self._write(dataclasses.replace(rec, version=current.version if current else 0))

    def read_lease(self, account_id: str) -> Lease:
        fault = self.faults.take("lease")
        if fault is not None:
            fault(account_id)
        with self._lock:
            lease = self.leases.get(account_id)
            return dataclasses.replace(lease) if lease else Lease("", 0.0, 0)

    def write_lease(self, account_id: str, holder: str, expires_at: float, cas: int, *,
                    busy_until: float = 0.0, note: Mapping[str, str] | None = None) -> int:
        fault = self.faults.take("lease_write")
        if fault is not None:
            fault(account_id)
        with self._lock:
            current = self.leases.get(account_id, Lease("", 0.0, 0))
            if current.version != cas:
                raise CasConflict("lease changed")
            self.leases[account_id] = Lease(holder, expires_at, cas + 1, busy_until, (note or {}).get("admin_url", ""))
            return cas + 1


# -- Cloudflare ------------------------------------------------------------------------------------

class FakeCloudflare:
    """TunnelApi. Ops for faults: ``list``, ``validate``, ``apply`` (args: account, psks). A fault runs
    before the call takes effect, or after it landed when wrapped in ``after_landing``; one that
    returns a PskSetResult replaces the answer."""

    def __init__(self) -> None:
        self.tunnels: dict[str, list[TunnelInfo]] = defaultdict(list)
        self.keys: dict[str, str] = {}
        self.initial: dict[str, str] = {}  # the key each tunnel had before the rotator managed it
        self.generated_on: dict[str, str] = {}
        self.refused: dict[tuple[str, str], str] = {}  # (stage, tunnel) -> reason
        self.faults = Faults()
        self.applied: list[tuple[str, str]] = []  # (tunnel, key) in order
        self._lock = threading.Lock()

    def add(self, account_id: str, n: int, start: int = 0, **info: Any) -> list[str]:
        ids = [tid(start + i + 1) for i in range(n)]
        for i, t in enumerate(ids):
            self.tunnels[account_id].append(TunnelInfo(t, f"tun{start + i + 1:05d}", **info))
            self.keys[t] = self.initial[t] = f"initial-{t}"
        return ids

    def list_twice(self, account_id: str, tunnel_id: str, name: str) -> None:
        """A broken listing: the tunnel appears a second time, under ``name`` (issue 20 item 1)."""
        first = next(t for t in self.tunnels[account_id] if t.id == tunnel_id)
        self.tunnels[account_id].append(dataclasses.replace(first, name=name))

    def key_of(self, tunnel_id: str) -> str:
        with self._lock:
            return self.keys[tunnel_id]

    def set_out_of_band(self, tunnel_id: str, key: str) -> None:
        """Someone changed the key in the dashboard or with Terraform."""
        with self._lock:
            self.keys[tunnel_id] = key
            self.generated_on[tunnel_id] = stamp()

    def list_tunnels(self, account_id: str) -> list[TunnelInfo]:
        fault = self.faults.take("list")
        if fault is not None:
            fault(account_id)
        with self._lock:
            return [dataclasses.replace(t, last_generated_on=self.generated_on.get(t.id)) for t in
                    self.tunnels[account_id]]

    def refuse(self, tunnels: Sequence[str], reason: str, stage: str = "apply") -> None:
        self.refused.update({(stage, t): reason for t in tunnels})

    def set_psks(self, account_id: str, psks: Mapping[str, Secret], *, validate_only: bool,
                 deadline: float | None = None) -> PskSetResult:
        op = "validate" if validate_only else "apply"
        fault = self.faults.take(op)
        late = fault is not None and getattr(fault, "after_landing", False)
        replaced = fault(account_id, psks) if fault is not None and not late else None
        if isinstance(replaced, PskSetResult):
            return replaced
        result = PskSetResult()
        with self._lock:
            for t, key in psks.items():
                if (op, t) in self.refused:
                    result.unapplied[t] = self.refused[(op, t)]
                    continue
                result.applied.add(t)
                if not validate_only:
                    self.keys[t] = key.reveal()
                    self.generated_on[t] = result.generated_on[t] = stamp()
                    result.ipsec_ids[t] = f"ipsec-{t[-6:]}"
                    self.applied.append((t, key.reveal()))
        if fault is not None and late:
            replaced = fault(account_id, psks)  # after the apply landed: a lost or odd answer
            if isinstance(replaced, PskSetResult):
                return replaced
        return result


def after_landing(fault: Fault) -> Fault:
    """Run ``fault`` after the apply has landed (a lost answer, a contradictory one, a crash)."""
    fault.after_landing = True  # type: ignore[attr-defined]
    return fault


@after_landing
def lost_answer(*_: Any) -> Any:
    raise CloudflareError("connection reset after the request was sent", ambiguous=True)


# -- far-end device --------------------------------------------------------------------------------

class FakeDevice(DeviceBase):
    """Device: holds one key per tunnel; ``verify`` checks it against the key Cloudflare holds (a
    fresh IKE authentication succeeds only when both ends agree). Ops for faults: ``deliver``,
    ``verify``, ``rollback`` (args: the tunnels); a fault's return value replaces the answer.
    Helpers for faults: refuse(), hang(), garbage(), waiting().

    Kit attributes: ``interrupts`` (a delivered tunnel is down until Cloudflare holds its key: the
    fake's ``up`` then says False for it), ``key_rules``, ``pairs`` (tunnel id -> pair key, else the
    kit's default by customer endpoint), ``status`` (tunnel id -> up, the vendor's own view; a
    tunnel not in it is not known, unless ``interrupts`` makes the fake judge it by the keys)."""

    def __init__(self, name: str, cloudflare: FakeCloudflare | None = None, *, kind: str = "fake",
                 timeout: float = 0.5, verify: bool = True, latency: float = 0.0, interrupts: bool = False,
                 key_rules: KeyRules | None = None, pairs: Mapping[str, str] | None = None,
                 verify_timeout: float | None = None) -> None:
        self.name, self.kind, self.timeout, self.verifies = name, kind, timeout, verify
        self.interrupts, self.verify_timeout = interrupts, verify_timeout
        self.key_rules = key_rules or KeyRules()
        self.pairs = dict(pairs) if pairs is not None else None
        self.status: dict[str, bool] = {}
        self.in_flight: set[str] = set()  # tunnels delivered and not yet verified or rolled back
        self.overlaps: list[tuple[str, ...]] = []  # pairs seen with two tunnels in flight at once
        self.cloudflare = cloudflare
        self.latency = latency
        self.keys: dict[str, str] = {}
        self.faults = Faults()
        self.calls: list[tuple[str, float, float, int]] = []  # (action, start, end, tunnels)
        self._lock = threading.Lock()

    def _call(self, action: str, tunnels: Sequence[DeviceTunnel], deadline: float,
              work: Callable[[DeviceTunnel], DeviceResult]) -> dict[str, DeviceResult]:
        start = time.monotonic()
        try:
            fault = self.faults.take(action)
            if fault is not None:
                replaced = fault(self, tunnels, deadline)
                if replaced is not None:
                    return dict(replaced)
            if self.latency:
                time.sleep(min(self.latency, max(0.0, deadline - time.monotonic())))
            return {t.tunnel_id: work(t) for t in tunnels}
        finally:
            with self._lock:
                self.calls.append((action, start, time.monotonic(), len(tunnels)))

    def _hold(self, t: DeviceTunnel) -> DeviceResult:
        with self._lock:
            self.keys[t.tunnel_id] = t.psk.reveal()
        return DeviceResult(DeviceStatus.OK)

    def _deliver(self, t: DeviceTunnel) -> DeviceResult:
        with self._lock:
            if self.pairs is not None and t.tunnel_id in self.pairs:
                pair = self.pairs[t.tunnel_id]
                busy = tuple(o for o in self.in_flight if self.pairs.get(o) == pair)
                if busy:
                    self.overlaps.append((t.tunnel_id, *busy))
            self.in_flight.add(t.tunnel_id)
        return self._hold(t)

    def _settled(self, tunnels: Sequence[DeviceTunnel]) -> None:
        with self._lock:
            self.in_flight.difference_update(t.tunnel_id for t in tunnels)

    def deliver(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
                deadline: float) -> dict[str, DeviceResult]:
        return self._call("deliver", tunnels, deadline, self._deliver)

    def rollback(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
                 deadline: float) -> dict[str, DeviceResult]:
        try:
            return self._call("rollback", tunnels, deadline, self._hold)
        finally:
            self._settled(tunnels)

    def pair_of(self, account_id: str, tunnels: Sequence[TunnelInfo], *, deadline: float) -> dict[str, str]:
        if self.pairs is None:
            return super().pair_of(account_id, tunnels, deadline=deadline)
        return {t.id: self.pairs[t.id] for t in tunnels if t.id in self.pairs}

    def tunnels_up(self, account_id: str, tunnels: Sequence[TunnelInfo], *, deadline: float) -> dict[str, bool]:
        self.faults.counts["tunnels_up"] += 1
        out = {t.id: self.status[t.id] for t in tunnels if t.id in self.status}
        if self.interrupts and self.cloudflare is not None:
            for t in tunnels:
                if t.id not in out and t.id in self.keys:
                    out[t.id] = self.cloudflare.key_of(t.id) == self.keys[t.id]
        return out

    def verify(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
                deadline: float) -> dict[str, DeviceResult]:
        def check(t: DeviceTunnel) -> DeviceResult:
            held = self.keys.get(t.tunnel_id)
            if held != t.psk.reveal():
                return DeviceResult(DeviceStatus.FAILED, "the device does not hold the key")
            if self.cloudflare is not None and self.cloudflare.key_of(t.tunnel_id) != held:
                return DeviceResult(DeviceStatus.FAILED, "IKE_AUTH failed: AUTHENTICATION_FAILED")
            return DeviceResult(DeviceStatus.OK)
        try:
            return self._call("verify", tunnels, deadline, check)
        finally:
            self._settled(tunnels)


def refuse(reason: str = "device said no") -> Fault:
    def fault(dev: FakeDevice, tunnels: Sequence[DeviceTunnel], deadline: float) -> dict[str, DeviceResult]:
        return {t.tunnel_id: DeviceResult(DeviceStatus.FAILED, reason) for t in tunnels}
    return fault


def hang(takes_key: bool = True) -> Fault:
    """The device takes the key (or not) and never answers: the call returns at its deadline, empty."""
    def fault(dev: FakeDevice, tunnels: Sequence[DeviceTunnel], deadline: float) -> dict[str, DeviceResult]:
        if takes_key:
            for t in tunnels:
                dev._hold(t)
        time.sleep(max(0.0, deadline - time.monotonic()))
        return {}
    return fault


def garbage(dev: FakeDevice, tunnels: Sequence[DeviceTunnel], deadline: float) -> Any:
    """Answers for tunnels it was not asked about, and none for those it was."""
    for t in tunnels:
        dev._hold(t)
    return {"not-a-tunnel": "<html>"}


def waiting(dev: FakeDevice, tunnels: Sequence[DeviceTunnel], deadline: float) -> dict[str, DeviceResult]:
    return {t.tunnel_id: DeviceResult(DeviceStatus.WAITING, "waiting for an operator") for t in tunnels}


class FakeHealth:
    def __init__(self, state: HealthState = HealthState.HEALTHY) -> None:
        self.state = state
        self.faults = Faults()

    def tunnel_health(self, account_id: str, tunnel_names: Sequence[str], *, since: float,
                      deadline: float) -> dict[str, HealthState]:
        fault = self.faults.take("health")
        if fault is not None:
            return dict(fault(tunnel_names))
        return {n: self.state for n in tunnel_names}


# -- the invariant ---------------------------------------------------------------------------------

def assert_invariant(cloudflare: FakeCloudflare, vault: FakeVault, account_id: str,
                     devices: Mapping[str, FakeDevice] | None = None, strict: bool = False) -> int:
    """docs/design.md section 2, both ends. ``devices``: tunnel id -> the device that terminates it.
    Returns how many managed tunnels were checked.

    Non-strict: for every managed tunnel, Cloudflare's key and the device's key are each the latest
    record's psk or pending_psk (during a tunnel's first rotation, also the key it had before).
    Strict (no rotation in flight): both are psk and nothing is pending."""
    checked = 0
    for tunnel in {t.id: t for t in cloudflare.tunnels[account_id]}.values():  # a tunnel listed twice once
        rec = vault.latest(account_id, tunnel.id)
        if rec is None or (rec.psk is None and rec.pending_psk is None and tunnel.id not in cloudflare.initial):
            continue  # never rotated by us: not managed yet
        checked += 1
        allowed = {k.reveal() for k in (rec.psk, rec.pending_psk) if k is not None}
        if rec.psk is None and tunnel.id in cloudflare.initial:
            allowed.add(cloudflare.initial[tunnel.id])  # a first rotation in flight: the ends may still
            # hold the key they had before the rotator managed them
        ends = {"Cloudflare": cloudflare.key_of(tunnel.id)}
        device = (devices or {}).get(tunnel.id)
        if device is not None and tunnel.id in device.keys:
            ends[f"device {device.name}"] = device.keys[tunnel.id]
        for end, held in ends.items():
            if strict:
                expected = rec.psk.reveal() if rec.psk is not None else cloudflare.initial.get(tunnel.id)
                assert held == expected, f"{tunnel.id}: {end} holds a key that is not the record's psk"
            else:
                assert held in allowed, f"{tunnel.id}: {end} holds a key Vault does not have (invariant broken)"
        if strict:
            assert rec.pending_psk is None and rec.state == "active", f"{tunnel.id}: still {rec.state}"
    return checked
