"""Far-end devices in the protocol (docs/design.md sections 4 and 9), in memory: the fault matrix with a
device. Every test ends with the extended invariant (Cloudflare's and the device's key each readable
from the latest record), in its strict form after a fault-free reconcile."""

from __future__ import annotations

from typing import Any

import pytest

from rotator.errors import VaultError
from rotator.model import Outcome, PskSetResult, Record, ack
from rotator.secret import Secret
from tests.fakes import ACCOUNT, Crash, FakeDevice, after_landing, garbage, hang, lost_answer, raising, refuse, waiting
from tests.rotation.world import World, lose_lease_after_validation, managed, world


def device_world(n: int = 4, batch_size: int = 4, **kw: Any) -> World:
    return managed(world(n, batch_size, device=FakeDevice("branch", timeout=0.3, **kw)))


@pytest.fixture
def w() -> World:
    return device_world()


def dev(w: World) -> FakeDevice:
    return w.devices[w.ids[0]]


def restart(w: World) -> None:
    """A new process after a crash: no lease in memory, no faults left."""
    w.engine.leases._held.clear()
    w.cf.faults.clear()
    w.vault.faults.clear()
    dev(w).faults.clear()


def settle(w: World) -> None:
    """A fault-free reconcile reaches the strict form."""
    restart(w)
    report = w.run(reconcile_only=True)
    assert report.error is None and all(o.result in (Outcome.ROTATED, Outcome.ROLLED_BACK) for o in report.outcomes)
    w.invariant(strict=True)


def test_both_ends_rotate_one_device_call_per_action_and_batch(w: World) -> None:
    before = {t: dev(w).keys[t] for t in w.ids}
    dev(w).calls.clear()
    report = w.run()
    assert report.ok and report.counts()[Outcome.ROTATED] == 4
    assert all(dev(w).keys[t] != before[t] for t in w.ids)
    assert [c[0] for c in dev(w).calls] == ["deliver", "verify"]
    assert all(w.rec(t).device == "branch" for t in w.ids)
    assert w.invariant(strict=True) == 4


def test_deliver_refused_rolls_the_device_back_and_cloudflare_never_sees_the_key(w: World) -> None:
    old = w.keys()
    applied = len(w.cf.applied)
    dev(w).faults.on("deliver", refuse("no space left for another secret"))
    report = w.run()
    assert {o.result for o in report.outcomes} == {Outcome.REFUSED}
    assert all("no space left" in (o.reason or "") for o in report.outcomes)
    assert len(w.cf.applied) == applied and w.keys() == old
    assert [c[0] for c in dev(w).calls][-2:] == ["deliver", "rollback"]
    assert all(w.rec(t).pending_psk is None for t in w.ids)
    w.invariant(strict=True)


@pytest.mark.parametrize("fault", [hang(), garbage], ids=["hangs", "garbage"])
def test_deliver_without_a_clear_answer_stays_pending(w: World, fault: Any) -> None:
    dev(w).faults.on("deliver", fault)
    report = w.run()
    assert {o.result for o in report.outcomes} == {Outcome.UNKNOWN}
    assert all(w.rec(t).pending_psk is not None for t in w.ids)
    assert w.cf.faults.counts["apply"] == 0
    w.invariant()  # the device holds the pending key
    settle(w)


def test_apply_unapplied_rolls_the_device_back_and_unstages(w: World) -> None:
    t1 = w.ids[0]
    w.cf.refuse([t1], "tunnel is being modified", stage="apply")
    report = w.run()
    assert w.by_id(report)[t1].result == Outcome.UNAPPLIED and report.counts()[Outcome.ROTATED] == 3
    assert w.rec(t1).pending_psk is None
    w.invariant(strict=True)


def test_apply_ambiguous_stays_pending(w: World) -> None:
    w.cf.faults.on("apply", lost_answer)
    report = w.run()
    assert {o.result for o in report.outcomes} == {Outcome.UNKNOWN}
    w.invariant()
    settle(w)


def test_verify_failed_rolls_both_ends_back_vault_first(w: World) -> None:
    old = w.keys()
    t1 = w.ids[0]
    dev(w).faults.on("verify", refuse("IKE_AUTH failed"))
    report = w.run()
    assert {o.result for o in report.outcomes} == {Outcome.ROLLED_BACK}
    assert all("verification failed: IKE_AUTH failed" in (o.reason or "") for o in report.outcomes)
    assert w.keys() == old and all(dev(w).keys[t] == old[t] for t in w.ids)
    states = [r.state for r in w.vault.versions[(ACCOUNT, t1)][-3:]]
    assert states == ["pending", "rolling_back", "active"]  # Vault first, then both ends, then unstaged
    assert w.cf.faults.counts["validate"] == 2 and w.cf.faults.counts["apply"] == 2  # the old key, validated first
    assert "IKE_AUTH failed" in (w.rec(t1).last_error or "")
    w.invariant(strict=True)


def test_verify_hangs_stays_pending(w: World) -> None:
    dev(w).faults.on("verify", hang(takes_key=False))
    report = w.run()
    assert {o.result for o in report.outcomes} == {Outcome.UNKNOWN}
    w.invariant()
    settle(w)


def test_first_rotation_cannot_roll_back_so_it_keeps_the_new_key_and_fails() -> None:
    w = world(2, device=FakeDevice("branch", timeout=0.3))
    dev(w).faults.on("verify", refuse("IKE_AUTH failed"))
    report = w.run()
    assert {o.result for o in report.outcomes} == {Outcome.FAILED} and not report.ok
    assert all("no previous key to roll back to" in (o.reason or "") for o in report.outcomes)
    assert all(w.rec(t).psk is not None and w.rec(t).pending_psk is None for t in w.ids)
    w.invariant(strict=True)


def test_vault_refusing_the_rollback_write_leaves_the_key_pending(w: World) -> None:
    dev(w).faults.on("verify", refuse("IKE_AUTH failed"))

    def refuse_rollback(rec: Record) -> None:
        if rec.state == "rolling_back":
            raise VaultError("permission denied", status=403)

    w.vault.faults.on("write", refuse_rollback, times=100)
    report = w.run()
    assert {o.result for o in report.outcomes} == {Outcome.UNKNOWN}
    assert all("recording the rollback in Vault failed" in (o.reason or "") for o in report.outcomes)
    w.invariant()
    settle(w)


# -- a crash between every two steps -----------------------------------------------------------------

def _crash_on_write(state: str) -> Any:
    def fault(rec: Record) -> None:
        if rec.state == state and (state != "active" or rec.pending_psk is None):
            raise Crash()
    return fault


CRASHES = {
    "stage|validate": lambda w: w.cf.faults.on("validate", raising(Crash())),
    "validate|deliver": lambda w: dev(w).faults.on("deliver", raising(Crash())),
    "deliver|apply": lambda w: w.cf.faults.on("apply", raising(Crash())),
    "apply|verify": lambda w: w.cf.faults.on("apply", after_landing(raising(Crash()))),
    "verify|promote": lambda w: w.vault.faults.on("write", _crash_on_write("active"), times=100),
}
BACK_CRASHES = {
    "verify|mark": lambda w: w.vault.faults.on("write", _crash_on_write("rolling_back"), times=100),
    "mark|restore_cloudflare": lambda w: w.cf.faults.on("validate", raising(Crash())),
    "restore_cloudflare|restore_device": lambda w: dev(w).faults.on("rollback", raising(Crash())),
    "restore_device|unstage": lambda w: w.vault.faults.on("write", _crash_on_write("active"), times=100),
}


@pytest.mark.parametrize("where", list(CRASHES))
def test_a_crash_between_two_steps_is_finished_by_reconcile(where: str) -> None:
    w = device_world()
    CRASHES[where](w)
    with pytest.raises(Crash):
        w.run()
    w.invariant()
    settle(w)


@pytest.mark.parametrize("where", list(BACK_CRASHES))
def test_a_crash_while_rolling_back_is_finished_by_reconcile(where: str) -> None:
    w = device_world()
    old = w.keys()
    dev(w).faults.on("verify", refuse("IKE_AUTH failed"))
    if where == "mark|restore_cloudflare":
        w.cf.faults.on("validate", lambda *_: None)  # the first validation is the forward one
    BACK_CRASHES[where](w)
    with pytest.raises(Crash):
        w.run()
    w.invariant()
    settle(w)
    if where != "verify|mark":  # once Vault said rolling_back, reconcile goes back, not forward
        assert w.keys() == old


def test_a_rolling_back_record_is_resumed_backwards(w: World) -> None:
    old = w.keys()
    dev(w).faults.on("verify", refuse("IKE_AUTH failed"))
    dev(w).faults.on("rollback", raising(Crash()))
    with pytest.raises(Crash):
        w.run()
    assert all(w.rec(t).state == "rolling_back" for t in w.ids)
    restart(w)
    report = w.run(reconcile_only=True)
    assert {o.result for o in report.outcomes} == {Outcome.ROLLED_BACK} and all(o.reconciled for o in report.outcomes)
    assert w.keys() == old
    w.invariant(strict=True)


# -- manual devices: the key waits for an acknowledgement ----------------------------------------------

def test_a_manual_key_waits_for_its_ack_then_is_applied() -> None:
    w = device_world(kind="manual", verify=False)
    old = w.keys()
    dev(w).faults.on("deliver", waiting, times=2)
    report = w.run()
    assert {o.result for o in report.outcomes} == {Outcome.WAITING} and w.keys() == old
    w.invariant()
    assert {o.result for o in w.run(reconcile_only=True).outcomes} == {Outcome.WAITING}
    for t in w.ids:  # the operator acknowledges (rotator ack)
        w.vault.put(ack(w.rec(t), "new"))
        dev(w).keys[t] = w.rec(t).pending_psk.reveal()  # type: ignore[union-attr]
    calls = len(dev(w).calls)
    report = w.run(reconcile_only=True)
    assert report.ok and report.counts()[Outcome.ROTATED] == 4
    assert len(dev(w).calls) == calls  # an acknowledged key is not delivered again
    w.invariant(strict=True)


@pytest.mark.parametrize("per", ["request", "device"])
def test_an_unacknowledged_key_times_out_and_is_withdrawn(per: str) -> None:
    w = device_world(kind="manual", verify=False)
    dev(w).faults.on("deliver", waiting, times=2)
    dev(w).faults.on("rollback", waiting, times=2)  # the operator is asked to put the old key back
    limit = {"ack_timeout": 3600.0} if per == "request" else {}
    if per == "device":
        dev(w).ack_timeout = 3600.0  # type: ignore[attr-defined]
    w.run(**limit)
    w.engine.clock = lambda: 4e9  # much later
    report = w.run(reconcile_only=True, **limit)
    assert {o.result for o in report.outcomes} == {Outcome.UNKNOWN}  # until the operator says it went back
    assert all("not acknowledged" in (o.reason or "") for o in report.outcomes)
    assert all(w.rec(t).state == "rolling_back" for t in w.ids)
    w.invariant()
    assert all(v is None for v in w.engine.acknowledge(ACCOUNT, w.ids, holds="previous").values())
    report = w.run(reconcile_only=True, **limit)
    assert {o.result for o in report.outcomes} == {Outcome.ROLLED_BACK}
    assert all(w.rec(t).pending_psk is None for t in w.ids)
    w.invariant(strict=True)


def test_ack_needs_a_pending_key() -> None:
    with pytest.raises(ValueError, match="no key waiting"):
        ack(Record(ACCOUNT, "0" * 32, 3, psk=Secret("k")))


# -- pairs, concurrency, rollback command, redaction ----------------------------------------------------

def test_a_redundant_pair_is_never_in_flight_together() -> None:
    w = world(4, 100, device=FakeDevice("hub", timeout=0.3), customer_endpoint="203.0.113.7")
    report = w.run()
    assert report.ok
    calls = [(c[0], c[3]) for c in dev(w).calls]
    # every tunnel shares device and endpoint: one at a time, each verified before the next is delivered
    assert calls == [("deliver", 1), ("verify", 1)] * 4
    w.invariant(strict=True)


def test_devices_are_called_concurrently() -> None:
    w = world(4, 100)
    a, b = FakeDevice("a", w.cf, timeout=2.0, latency=0.2), FakeDevice("b", w.cf, timeout=2.0, latency=0.2)
    w.devices = {t: (a if i % 2 else b) for i, t in enumerate(w.ids)}
    for t, d in w.devices.items():
        d.keys[t] = w.cf.key_of(t)
    assert w.run().ok
    for action in ("deliver", "verify"):
        (_, s1, e1, _), = [c for c in a.calls if c[0] == action]
        (_, s2, e2, _), = [c for c in b.calls if c[0] == action]
        assert s1 < e2 and s2 < e1, f"{action} calls did not overlap"
    w.invariant(strict=True)


def test_rollback_returns_both_ends_to_the_previous_key_vault_first(w: World) -> None:
    t1 = w.ids[1]
    assert w.run().ok  # a second rotation, so there is a previous key
    previous, current = w.rec(t1).previous_psk, w.rec(t1).psk
    assert previous is not None and current is not None
    report = w.run(rollback=True, tunnels=[t1])
    assert report.ok and [o.result for o in report.outcomes] == [Outcome.ROLLED_BACK]
    assert w.cf.key_of(t1) == previous.reveal() == dev(w).keys[t1]
    assert w.rec(t1).psk == previous and w.rec(t1).previous_psk == current
    w.invariant(strict=True)


def test_rollback_without_a_previous_key_is_refused() -> None:
    w = world(1, device=FakeDevice("branch", timeout=0.3))
    assert w.run().ok
    report = w.run(rollback=True, tunnels=[w.ids[0]])
    assert [o.result for o in report.outcomes] == [Outcome.REFUSED] and not report.ok
    w.invariant(strict=True)


def test_a_device_reason_quoting_the_key_is_redacted(w: World) -> None:
    def quoting(dev: FakeDevice, tunnels: Any, deadline: float) -> Any:
        from rotator.rotation.ports import DeviceResult, DeviceStatus

        return {t.tunnel_id: DeviceResult(DeviceStatus.FAILED, f"bad key {t.psk.reveal()}") for t in tunnels}

    dev(w).faults.on("deliver", quoting)
    report = w.run()
    text = str(report.as_dict())
    assert "**redacted**" in text and "bad key" in text
    assert all(w.rec(t).psk.reveal() not in text for t in w.ids)  # type: ignore[union-attr]
    w.invariant(strict=True)


def test_a_contradictory_apply_with_a_device_stays_pending(w: World) -> None:
    t1 = w.ids[0]

    @after_landing
    def odd(_a: str, psks: Any) -> PskSetResult:
        return PskSetResult(applied=set(psks), ambiguous={t1: "echoed another key"})

    w.cf.faults.on("apply", odd)
    report = w.run()
    assert w.by_id(report)[t1].result == Outcome.UNKNOWN
    w.invariant()
    settle(w)


# -- Cloudflare's health as a second opinion; what a failed attempt leaves in the record -----------------

def test_a_tunnel_cloudflare_reports_down_after_the_apply_is_rolled_back(w: World) -> None:
    from rotator.rotation.ports import HealthState
    from tests.fakes import FakeHealth

    old = w.keys()
    health = FakeHealth()
    t1 = w.ids[0]
    name = next(t.name for t in w.cf.tunnels[ACCOUNT] if t.id == t1)
    health.faults.on("health", lambda names: {n: HealthState.DOWN if n == name else HealthState.HEALTHY
                                              for n in names})
    report = w.run(health=health)
    assert w.by_id(report)[t1].result == Outcome.ROLLED_BACK and report.counts()[Outcome.ROTATED] == 3
    assert w.cf.key_of(t1) == old[t1] == dev(w).keys[t1]
    w.invariant(strict=True)


def test_health_without_an_answer_changes_nothing(w: World) -> None:
    from tests.fakes import FakeHealth

    health = FakeHealth()
    health.faults.on("health", raising(RuntimeError("GraphQL said no")))
    assert w.run(health=health).ok
    w.invariant(strict=True)


def test_a_pending_key_records_why_and_the_ipsec_id(w: World) -> None:
    dev(w).faults.on("verify", hang(takes_key=False))
    w.run()
    for t in w.ids:
        rec = w.rec(t)
        assert rec.pending_psk is not None and rec.ipsec_id
        assert rec.last_error is not None and "verification outcome unknown" in rec.last_error
    w.invariant()
    settle(w)
    assert all(w.rec(t).last_error is None for t in w.ids)


def test_a_rollback_that_fails_verification_leaves_both_ends_on_the_current_key(w: World) -> None:
    t1 = w.ids[1]
    assert w.run().ok
    current = w.rec(t1).psk
    assert current is not None
    dev(w).faults.on("verify", refuse("IKE_AUTH failed"))
    report = w.run(rollback=True, tunnels=[t1])
    assert [o.result for o in report.outcomes] == [Outcome.FAILED] and not report.ok
    assert w.cf.key_of(t1) == current.reveal() == dev(w).keys[t1] and w.rec(t1).psk == current
    w.invariant(strict=True)


def test_no_device_call_starts_without_the_lease(w: World) -> None:
    calls = len(dev(w).calls)
    lose_lease_after_validation(w)
    report = w.run()
    assert {o.result for o in report.outcomes} == {Outcome.UNKNOWN}
    assert all("lease lost" in (o.reason or "") for o in report.outcomes)
    assert len(dev(w).calls) == calls and w.cf.faults.counts["apply"] == 0
    w.invariant()
    w.engine.leases.ttl = 120.0
    settle(w)


def test_cloudflare_refusing_the_old_key_back_leaves_the_rollback_for_reconcile(w: World) -> None:
    old = w.keys()
    dev(w).faults.on("verify", refuse("IKE_AUTH failed"))
    w.cf.faults.on("validate", lambda *_: None)  # the forward validation passes

    def refuse_old(_a: str, psks: Any) -> PskSetResult:
        return PskSetResult(unapplied={t: "tunnel is being modified" for t in psks})

    w.cf.faults.on("validate", refuse_old)
    report = w.run()
    assert {o.result for o in report.outcomes} == {Outcome.UNKNOWN}
    assert all("being modified" in (o.reason or "") for o in report.outcomes)
    assert all(w.rec(t).state == "rolling_back" for t in w.ids)
    w.invariant()
    settle(w)
    assert w.keys() == old


def test_an_acknowledged_manual_key_cloudflare_refuses_waits_for_the_operator_to_go_back() -> None:
    w = device_world(kind="manual", verify=False)
    t1 = w.ids[0]
    dev(w).faults.on("deliver", waiting)
    w.run(tunnels=[t1])
    w.vault.put(ack(w.rec(t1), "new"))
    dev(w).keys[t1] = w.rec(t1).pending_psk.reveal()  # type: ignore[union-attr]
    w.cf.refuse([t1], "tunnel is being modified", stage="apply")
    dev(w).faults.on("rollback", waiting)
    report = w.run(tunnels=[t1], reconcile_only=True)
    assert [o.result for o in report.outcomes] == [Outcome.UNKNOWN]
    assert w.rec(t1).pending_psk is not None  # the device holds it until the operator says otherwise
    w.invariant()
    w.cf.refused.clear()
    settle(w)


def test_a_dry_run_changes_nothing_even_with_keys_in_flight(w: World) -> None:
    dev(w).faults.on("verify", refuse("IKE_AUTH failed"))
    dev(w).faults.on("rollback", raising(Crash()))
    with pytest.raises(Crash):
        w.run(tunnels=w.ids[:2])  # two tunnels left rolling back
    restart(w)
    w.cf.faults.on("apply", lost_answer)
    w.run(tunnels=w.ids[2:])  # two left pending
    restart(w)
    versions = {t: w.rec(t).version for t in w.ids}
    before, calls, applies = w.keys(), len(dev(w).calls), w.cf.faults.counts["apply"]
    w.cf.refuse(w.ids[2:], "tunnel is being modified", stage="validate")  # would send the pending keys back
    report = w.run(dry_run=True)
    assert not report.ok and {o.result for o in report.outcomes} <= {Outcome.SKIPPED, Outcome.REFUSED}
    assert w.keys() == before and len(dev(w).calls) == calls and w.cf.faults.counts["apply"] == applies
    assert {t: w.rec(t).version for t in w.ids} == versions
    w.cf.refused.clear()
    w.invariant()
    slept = sum(w.clock.slept)
    settle(w)
    # The lost apply may still land: rolling back waited on the lease clock for it (about a minute of
    # virtual time, none of it real), and only then went on.
    assert sum(w.clock.slept) - slept > 30


def test_the_ack_command_acknowledges_pending_keys_by_name_or_id() -> None:
    w = device_world(kind="manual", verify=False)
    dev(w).faults.on("deliver", waiting)
    w.run(tunnels=w.ids[:2])
    names = {t.id: t.name for t in w.cf.tunnels[ACCOUNT]}
    answer = w.engine.acknowledge(ACCOUNT, [names[w.ids[0]], w.ids[1], w.ids[2]], holds="new")
    assert "no key waiting" in (answer[w.ids[2]] or "")  # one refused: none is written (all or nothing)
    assert "another tunnel" in (answer[w.ids[0]] or "") and not any(w.rec(t).acked for t in w.ids)
    answer = w.engine.acknowledge(ACCOUNT, [names[w.ids[0]], w.ids[1]], holds="new")
    assert answer == {w.ids[0]: None, w.ids[1]: None}
    assert w.rec(w.ids[0]).acked and w.rec(w.ids[1]).acked and not w.rec(w.ids[2]).acked
    for t in w.ids[:2]:
        dev(w).keys[t] = w.rec(t).pending_psk.reveal()  # type: ignore[union-attr]
    report = w.run(reconcile_only=True)
    assert report.ok and report.counts()[Outcome.ROTATED] == 2
    w.invariant(strict=True)


def test_every_mutating_call_runs_inside_the_lease_managers_cover_when_it_has_one() -> None:
    import contextlib

    from rotator.rotation.lease import LeaseManager

    covered: list[tuple[float, bool]] = []

    class Covering(LeaseManager):
        @contextlib.contextmanager
        def covering(self, account_id: str, seconds: float, *, resend: bool = False):  # type: ignore[no-untyped-def]
            covered.append((seconds, resend))
            yield None

    w = device_world()
    w.engine.leases = Covering(w.vault, "replica-a")
    assert w.run().ok
    # apply (fresh keys), then the device deliver and verify, each covered once per batch
    assert sorted(covered) == sorted([(w.engine.apply_guard, False), (0.3, False), (0.3, True)])
    covered.clear()
    w.cf.faults.on("apply", lost_answer)
    w.run()
    restart(w)
    assert w.run(reconcile_only=True).ok
    assert (w.engine.apply_guard, True) in covered  # re-sending pending keys need not wait
    w.invariant(strict=True)


def test_a_first_key_the_device_may_hold_from_an_earlier_run_is_never_unstaged() -> None:
    w = world(1, device=FakeDevice("branch", timeout=0.3))
    t1 = w.ids[0]
    w.cf.faults.on("apply", raising(Crash()))
    with pytest.raises(Crash):
        w.run()  # delivered, then the process died before the apply
    restart(w)
    dev(w).faults.on("deliver", refuse("busy"))  # on resume the device refuses, but it holds the key
    report = w.run(reconcile_only=True)
    assert [o.result for o in report.outcomes] == [Outcome.UNKNOWN]
    assert w.rec(t1).pending_psk is not None
    w.invariant()
    settle(w)


def test_a_first_key_the_device_refuses_is_withdrawn_and_both_ends_keep_their_key() -> None:
    w = world(2, device=FakeDevice("branch", timeout=0.3))
    dev(w).faults.on("deliver", refuse("busy"))
    report = w.run()
    assert {o.result for o in report.outcomes} == {Outcome.REFUSED}
    assert all(w.rec(t).pending_psk is None and w.rec(t).psk is None for t in w.ids)
    assert w.invariant(strict=True) == 2  # both ends still hold the key they had before


def test_a_pair_partner_waits_while_the_other_key_stays_in_flight() -> None:
    w = managed(world(2, 100, device=FakeDevice("hub", timeout=0.3), customer_endpoint="203.0.113.7"))
    first, second = w.ids
    before = w.keys()
    dev(w).faults.on("deliver", hang())
    report = w.run()
    by = w.by_id(report)
    assert by[first].result == Outcome.UNKNOWN and by[second].result == Outcome.SKIPPED
    assert "redundant partner" in by[second].reason
    assert w.cf.key_of(second) == before[second] == dev(w).keys[second] and w.rec(second).pending_psk is None
    w.invariant()
    report = w.run()  # the key in flight settles first, then its partner rotates
    assert [o.tunnel_id for o in report.outcomes] == [first, second] and report.ok
    w.invariant(strict=True)
