"""A small world for protocol tests: fake Cloudflare, fake Vault, optional devices, one engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rotator.errors import VaultError
from rotator.model import Record
from rotator.psk import PskGenerator, PskPolicy
from rotator.rotation.engine import Engine, RunReport, RunRequest
from rotator.rotation.lease import LeaseManager
from tests.fakes import ACCOUNT, FakeCloudflare, FakeDevice, FakeVault, VirtualClock, assert_invariant, raising


@dataclass
class World:
    cf: FakeCloudflare
    vault: FakeVault
    engine: Engine
    ids: list[str]
    clock: VirtualClock = field(default_factory=VirtualClock)  # the lease manager's time
    devices: dict[str, FakeDevice] = field(default_factory=dict)  # tunnel id -> device

    def run(self, **kw: Any) -> RunReport:
        if self.devices and "device_for" not in kw:
            kw["device_for"] = lambda t: self.devices.get(t.id)
        return self.engine.run(RunRequest(ACCOUNT, **kw))

    def rec(self, tunnel_id: str) -> Record:
        rec = self.vault.latest(ACCOUNT, tunnel_id)
        assert rec is not None
        return rec

    def invariant(self, strict: bool = False) -> int:
        return assert_invariant(self.cf, self.vault, ACCOUNT, self.devices, strict=strict)

    def by_id(self, report: RunReport) -> dict[str, Any]:
        return {o.tunnel_id: o for o in report.outcomes}

    def keys(self) -> dict[str, str]:
        return {t: self.cf.key_of(t) for t in self.ids}


def world(n: int = 6, batch_size: int = 4, *, device: FakeDevice | None = None, ttl: float = 120.0,
          pipelined: bool = True, holder: str = "replica-a", **tunnel_info: Any) -> World:
    cf, vault, clock = FakeCloudflare(), FakeVault(), VirtualClock()
    ids = cf.add(ACCOUNT, n, **tunnel_info)
    leases = LeaseManager(vault, holder, ttl=ttl, clock=clock, sleep=clock.sleep)
    engine = Engine(cf, vault, PskGenerator(PskPolicy()), leases, batch_size=batch_size, pipelined=pipelined)
    w = World(cf, vault, engine, ids, clock)
    if device is not None:
        device.cloudflare = cf
        w.devices = dict.fromkeys(ids, device)
        for t in ids:  # the device starts on the key Cloudflare holds
            device.keys[t] = cf.key_of(t)
    return w


def managed(w: World) -> World:
    """Every tunnel rotated once, so every tunnel is managed before a fault is injected."""
    assert w.run().ok
    w.cf.faults.counts.clear()
    return w


def lose_lease_after_validation(w: World) -> None:
    """Every mutating call must renew the lease first, and renewing fails once validation is done."""
    w.engine.leases.ttl = 0.0

    def seal(*_: object) -> None:
        for op in ("lease", "lease_write"):
            w.vault.faults.on(op, raising(VaultError("sealed")), times=100)

    w.cf.faults.on("validate", seal)
