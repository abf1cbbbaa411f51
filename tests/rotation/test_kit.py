"""The device kit in the protocol (docs/design.md section 10), in memory against the port fakes:
redundant pairs as the device names them, partner gating for devices whose deliver interrupts the
tunnel, key rules enforced at deliver, an unmatched tunnel refused. Every test ends with the
invariant for both ends."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rotator.adapters.devices._common import match_endpoint
from rotator.model import Outcome, TunnelInfo
from rotator.rotation.ports import DeviceResult, DeviceTunnel, HealthState, KeyRules
from rotator.rotation.steps import PARTNER_DOWN
from tests.fakes import FakeDevice, FakeHealth, hang
from tests.rotation.world import World, managed, world

AWS_RULES = KeyRules(8, 64, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._", "0",
                     "8-64 characters of A-Z a-z 0-9 . _, not starting with 0")


def paired(n: int = 4, **kw: Any) -> dict[str, str]:
    """Tunnels 1+2, 3+4, ... are the two tunnels of one vendor connection."""
    return {f"{i:032x}": f"conn-{(i - 1) // 2}" for i in range(1, n + 1)}


def gated_world(n: int = 4, device: FakeDevice | None = None, **kw: Any) -> World:
    dev = device or FakeDevice("aws", timeout=0.3, interrupts=True, pairs=paired(n))
    interrupts, dev.interrupts = dev.interrupts, False  # managed first, without gating
    w = managed(world(n, 100, device=dev, **kw))
    dev.interrupts = interrupts
    return w


def dev_of(w: World) -> FakeDevice:
    return w.devices[w.ids[0]]


def delivered(w: World) -> int:
    return sum(n for action, _, _, n in dev_of(w).calls if action == "deliver")


class NoStatus(FakeDevice):
    """A device with no status of its own: partner gating must ask Cloudflare's tunnel health."""

    def tunnels_up(self, account_id: str, tunnels: Sequence[TunnelInfo], *, deadline: float) -> dict[str, bool]:
        return {}


class PairBlind(FakeDevice):
    """Knows its pairs (for the overlap check) but does not tell the engine: the negative control."""

    def pair_of(self, account_id: str, tunnels: Sequence[TunnelInfo], *, deadline: float) -> dict[str, str]:
        return {}


# -- pairs --------------------------------------------------------------------------------------------

def test_two_tunnels_of_one_pair_are_never_in_flight_together() -> None:
    w = gated_world(6)
    dev_of(w).overlaps.clear()
    dev_of(w).calls.clear()
    report = w.run()
    assert report.ok and report.counts()[Outcome.ROTATED] == 6
    assert dev_of(w).overlaps == []
    deliveries = [n for action, _, _, n in dev_of(w).calls if action == "deliver"]
    assert deliveries == [3, 3]  # one tunnel of each pair per wave; the wave is verified first
    w.invariant(strict=True)


def test_the_negative_control_a_device_that_hides_its_pairs_overlaps() -> None:
    """Shows the check above can fail: with the pairs unknown to the engine, both tunnels of a pair
    (distinct customer endpoints, as AWS's two tunnels have) go out in one wave."""
    w = world(4, 100, device=PairBlind("aws", timeout=0.3, pairs=paired(4)))
    assert w.run().ok
    assert dev_of(w).overlaps
    w.invariant(strict=True)


def test_a_device_without_pair_of_keeps_the_usual_pair_by_endpoint() -> None:
    w = managed(world(2, 100, device=FakeDevice("hub", timeout=0.3), customer_endpoint="203.0.113.7"))
    dev_of(w).calls.clear()
    assert w.run().ok
    assert [n for a, _, _, n in dev_of(w).calls if a == "deliver"] == [1, 1]
    w.invariant(strict=True)


# -- partner gating -----------------------------------------------------------------------------------

def test_a_tunnel_whose_partner_is_down_waits_untouched() -> None:
    w = gated_world(4)
    t1, t2, t3, t4 = w.ids
    dev_of(w).status[t2] = False  # the vendor reports t1's partner down
    before = w.keys()
    held = dict(dev_of(w).keys)
    dev_of(w).calls.clear()
    report = w.run(tunnels=[t1, t3])
    by = w.by_id(report)
    assert by[t1].result is Outcome.SKIPPED and by[t1].reason.startswith(PARTNER_DOWN)
    assert "tun00002 down" in by[t1].reason
    assert by[t3].result is Outcome.ROTATED
    assert report.partner_down == [t1]
    assert w.cf.key_of(t1) == before[t1] and dev_of(w).keys[t1] == held[t1]  # nothing sent for t1
    assert delivered(w) == 1  # only t3
    rec = w.rec(t1)
    assert rec.pending_psk is None and rec.state == "active"  # unstaged cleanly
    w.invariant(strict=True)
    dev_of(w).status.clear()  # the partner is back: t1 rotates
    report = w.run(tunnels=[t1])
    assert [o.result for o in report.outcomes] == [Outcome.ROTATED] and report.partner_down == []
    w.invariant(strict=True)


def test_a_device_whose_deliver_does_not_interrupt_is_never_gated() -> None:
    w = gated_world(2, FakeDevice("fw", timeout=0.3, interrupts=False, pairs=paired(2)))
    dev_of(w).status[w.ids[1]] = False
    assert w.run(tunnels=[w.ids[0]]).ok
    assert dev_of(w).faults.counts["tunnels_up"] == 0
    w.invariant(strict=True)


def partner_down_health() -> FakeHealth:
    """Cloudflare's health: the partner tun00002 down, every other tunnel healthy."""
    health = FakeHealth()
    health.faults.on("health", lambda names: {n: HealthState.DOWN if n == "tun00002" else HealthState.HEALTHY
                                              for n in names}, times=10)
    return health


def test_without_vendor_status_cloudflare_health_decides() -> None:
    w = gated_world(2, NoStatus("aws", timeout=0.3, interrupts=True, pairs=paired(2)))
    t1 = w.ids[0]
    report = w.run(tunnels=[t1], health=partner_down_health())
    assert [o.result for o in report.outcomes] == [Outcome.SKIPPED]
    assert report.outcomes[0].reason.startswith(PARTNER_DOWN) and "tun00002 down" in report.outcomes[0].reason
    w.invariant(strict=True)
    assert w.run(tunnels=[t1], health=FakeHealth(HealthState.HEALTHY)).ok
    w.invariant(strict=True)


def test_a_tunnel_that_is_down_anyway_is_not_held_back_by_its_partner() -> None:
    """Both tunnels of a pair down (e.g. keys changed outside the rotator): rotating one takes nothing
    down, and holding each back for the other would keep the pair down for ever."""
    w = gated_world(2)
    t1, t2 = w.ids
    dev_of(w).status.update({t1: False, t2: False})
    report = w.run(tunnels=[t1])
    assert [o.result for o in report.outcomes] == [Outcome.ROTATED] and report.partner_down == []
    w.invariant(strict=True)


def test_a_partner_whose_state_nobody_knows_holds_the_tunnel_back() -> None:
    w = gated_world(2, NoStatus("aws", timeout=0.3, interrupts=True, pairs=paired(2)))
    report = w.run(tunnels=[w.ids[0]])
    assert report.outcomes[0].result is Outcome.SKIPPED
    assert "state unknown" in (report.outcomes[0].reason or "")
    w.invariant(strict=True)


def test_a_pending_key_is_finished_even_while_the_partner_is_down() -> None:
    """Reconcile is not gated: the tunnel may already be down on the pending key, and holding it back
    would keep it down; the repeated deliver sends the same pending key."""
    w = gated_world(2)
    t1, t2 = w.ids
    dev_of(w).faults.on("deliver", hang())  # the device takes the key, the answer is lost
    assert [o.result for o in w.run(tunnels=[t1]).outcomes] == [Outcome.UNKNOWN]
    w.invariant()
    dev_of(w).faults.clear()
    dev_of(w).status[t2] = False
    report = w.run(reconcile_only=True)
    assert [o.result for o in report.outcomes] == [Outcome.ROTATED]
    w.invariant(strict=True)


# -- key rules and matching at deliver ------------------------------------------------------------------

def test_deliver_never_sends_a_key_that_breaks_the_device_key_rules() -> None:
    w = managed(world(2, 100, device=FakeDevice("short", timeout=0.3)))
    dev_of(w).key_rules = KeyRules(8, 16, None, "", "8-16 characters")  # the policy makes 32
    held = dict(dev_of(w).keys)
    before = w.keys()
    dev_of(w).calls.clear()
    report = w.run()
    assert {o.result for o in report.outcomes} == {Outcome.REFUSED}
    assert all("not sent" in (o.reason or "") and "8-16 characters" in (o.reason or "") for o in report.outcomes)
    assert delivered(w) == 0 and dev_of(w).keys == held and w.keys() == before
    assert all(w.rec(t).pending_psk is None for t in w.ids)
    w.invariant(strict=True)


def test_the_aws_rules_refuse_a_key_starting_with_zero_and_take_the_aws_preset() -> None:
    assert AWS_RULES.refuses("0" + "a" * 31) is not None
    assert AWS_RULES.refuses("a" * 7) is not None and AWS_RULES.refuses("a-" * 10) is not None
    assert AWS_RULES.refuses("A._" + "z" * 29) is None
    from rotator.psk import PRESETS
    alphabet, first = PRESETS["aws"]
    assert AWS_RULES.refuses_policy(32, alphabet, first) is None
    assert "start with '0'" in (AWS_RULES.refuses_policy(32, PRESETS["alnum"][0]) or "")
    assert "outside 8..64" in (AWS_RULES.refuses_policy(128, alphabet, first) or "")


class Endpoints(FakeDevice):
    """Matches tunnels to the vendor's by outside address, like a vendor kind does."""

    vendor = {"198.51.100.1": "vpn-1/tunnel-a"}

    def _deliver(self, t: DeviceTunnel) -> DeviceResult:
        found = match_endpoint(t, self.vendor, "VPN connections vpn-1")
        return found if isinstance(found, DeviceResult) else super()._deliver(t)


def test_an_unmatched_tunnel_is_refused_and_nothing_is_sent_anywhere() -> None:
    w = world(2, 100, device=Endpoints("aws", timeout=0.3), customer_endpoint="203.0.113.9")
    before, held = w.keys(), dict(dev_of(w).keys)
    report = w.run()
    assert {o.result for o in report.outcomes} == {Outcome.REFUSED}
    reason = report.outcomes[0].reason or ""
    assert "203.0.113.9" in reason and "vpn-1" in reason
    assert w.keys() == before and dev_of(w).keys == held and not w.cf.applied
    assert all(w.rec(t).pending_psk is None for t in w.ids)
    w.invariant(strict=True)


def test_a_tunnel_without_customer_endpoint_is_refused_naming_what_to_set() -> None:
    w = world(1, 100, device=Endpoints("aws", timeout=0.3))
    report = w.run()
    assert report.outcomes[0].result is Outcome.REFUSED
    assert "customer_endpoint" in (report.outcomes[0].reason or "")
    w.invariant(strict=True)


def test_a_verify_that_polls_longer_than_the_lease_is_not_a_lease_covered_call() -> None:
    """verify_timeout (docs/design.md section 10, long operations) is not bound by the lease TTL: only
    calls that change a key are; a covered 600 s call under a 120 s lease would be refused."""
    dev = FakeDevice("aws", timeout=0.3, verify_timeout=600.0)
    w = managed(world(2, 100, device=dev, ttl=120.0))
    report = w.run()
    assert report.ok, [o.reason for o in report.outcomes]
    w.invariant(strict=True)
    dev.verify_timeout = None  # the same verify as a lease-covered call of the device's timeout: fine too
    assert w.run().ok
    w.invariant(strict=True)
