"""Regression tests from an adversarial review of the protocol against the invariant (docs/design.md
sections 2 and 4): each reproduces one defect and ends with the invariant, both ends."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from rotator.errors import CloudflareError
from rotator.model import Outcome, ack
from tests.fakes import ACCOUNT, FakeDevice, hang, lost_answer, raising, waiting
from tests.rotation.test_devices import dev, device_world, restart, settle
from tests.rotation.world import managed, world


def test_a_pending_key_whose_device_left_the_config_is_never_unstaged() -> None:
    """The key was delivered to device ``branch``; the configuration then stops naming a device for
    the tunnel. Rolling back (or resuming) must not unstage a key the old device may hold."""
    w = device_world()
    t1 = w.ids[0]
    dev(w).faults.on("deliver", hang())  # the device takes the key, the answer is lost
    assert [o.result for o in w.run(tunnels=[t1]).outcomes] == [Outcome.UNKNOWN]
    assert dev(w).keys[t1] == w.rec(t1).pending_psk.reveal()  # type: ignore[union-attr]
    restart(w)
    for request in ({"rollback": True}, {"reconcile_only": True}):
        report = w.run(tunnels=[t1], device_for=lambda t: None, **request)
        assert [o.result for o in report.outcomes] == [Outcome.UNKNOWN], request
        assert "branch" in (report.outcomes[0].reason or "")
        assert w.rec(t1).pending_psk is not None
        w.invariant()


def test_a_manual_rollback_can_be_acknowledged_and_then_finishes() -> None:
    """A manual device is asked to go back (the rollback answers WAITING, 'acknowledge it'); the
    operator's acknowledgement of the rolling_back record must let the next run finish the rollback
    instead of leaving it in flight for ever."""
    w = device_world(kind="manual", verify=False)
    t1 = w.ids[0]
    dev(w).faults.on("deliver", waiting)
    w.run(tunnels=[t1])
    w.vault.put(ack(w.rec(t1), "new"))
    old = w.rec(t1).psk
    dev(w).keys[t1] = w.rec(t1).pending_psk.reveal()  # type: ignore[union-attr]
    w.cf.refuse([t1], "tunnel is being modified", stage="apply")
    dev(w).faults.on("rollback", waiting, times=10)
    assert [o.result for o in w.run(tunnels=[t1], reconcile_only=True).outcomes] == [Outcome.UNKNOWN]
    assert w.rec(t1).state == "rolling_back"
    assert [o.result for o in w.run(tunnels=[t1], reconcile_only=True).outcomes] == [Outcome.UNKNOWN]
    w.invariant()  # the delivery's acknowledgement does not count as the rollback's
    dev(w).keys[t1] = old.reveal()  # type: ignore[union-attr]  # the operator puts the old key back ...
    assert w.engine.acknowledge(ACCOUNT, [t1], holds="previous") == {t1: None}  # ... and acknowledges it
    w.cf.refused.clear()
    report = w.run(tunnels=[t1], reconcile_only=True)
    assert [o.result for o in report.outcomes] == [Outcome.ROLLED_BACK], report.outcomes[0].reason
    w.invariant(strict=True)


def test_an_ack_timeout_never_unstages_a_key_the_operator_may_have_typed_in() -> None:
    """A manual key is only acknowledged late: the operator typed it into the device but the ack
    timed out. Withdrawing it must wait for the operator to put the old key back and say so."""
    w = device_world(kind="manual", verify=False)
    t1 = w.ids[0]
    dev(w).faults.on("deliver", waiting, times=2)
    dev(w).faults.on("rollback", waiting, times=10)
    w.run(tunnels=[t1], ack_timeout=3600.0)
    old = w.rec(t1).psk
    dev(w).keys[t1] = w.rec(t1).pending_psk.reveal()  # type: ignore[union-attr]  # typed in, never acked
    w.engine.clock = lambda: 4e9  # much later
    report = w.run(tunnels=[t1], reconcile_only=True, ack_timeout=3600.0)
    assert [o.result for o in report.outcomes] == [Outcome.UNKNOWN]
    assert "not acknowledged" in (report.outcomes[0].reason or "")
    w.invariant()
    assert w.rec(t1).state == "rolling_back"
    dev(w).keys[t1] = old.reveal()  # type: ignore[union-attr]  # the operator goes back ...
    assert w.engine.acknowledge(ACCOUNT, [t1], holds="previous") == {t1: None}  # ... and says so
    report = w.run(tunnels=[t1], reconcile_only=True, ack_timeout=3600.0)
    assert [o.result for o in report.outcomes] == [Outcome.ROLLED_BACK], report.outcomes[0].reason
    assert "not acknowledged" in (report.outcomes[0].reason or "")
    w.invariant(strict=True)


def test_an_ack_binds_to_the_rotation_and_state_the_operator_acted_on() -> None:
    """The operator types key K1 (rotation R1) into the device; meanwhile the ack timed out and the
    withdrawal asks for the old key back. An ack meant for K1 must not be taken as 'back on psk'
    (which would unstage K1 while the device holds it), nor for a key staged later."""
    w = device_world(kind="manual", verify=False)
    t1 = w.ids[0]
    dev(w).faults.on("deliver", waiting, times=2)
    dev(w).faults.on("rollback", waiting, times=10)
    w.run(tunnels=[t1], ack_timeout=3600.0)
    seen = w.rec(t1)  # what the operator looked at: rotation R1, pending
    assert seen.rotation_id is not None
    dev(w).keys[t1] = seen.pending_psk.reveal()  # type: ignore[union-attr]
    w.engine.clock = lambda: 4e9
    w.run(tunnels=[t1], reconcile_only=True, ack_timeout=3600.0)
    now = w.rec(t1)
    assert now.state == "rolling_back"
    with pytest.raises(ValueError, match="is rolling back"):
        ack(now, "new", seen.rotation_id)
    with pytest.raises(ValueError, match="moved on"):
        ack(now, "previous", "20261126T000000Z-000000")
    w.vault.put(ack(now, "previous", seen.rotation_id))  # the operator says: the old key is back ...
    dev(w).keys[t1] = seen.psk.reveal()  # type: ignore[union-attr]
    report = w.run(tunnels=[t1], reconcile_only=True)
    assert [o.result for o in report.outcomes] == [Outcome.ROLLED_BACK]
    w.invariant(strict=True)


def test_promotion_never_overrides_a_rollback_recorded_under_it() -> None:
    """While the key is being verified, another writer records state=rolling_back for the same pending
    key (and goes on to put psk back at both ends). The promotion's CAS conflicts; retrying it over
    the rollback would leave the old key, which both ends are being returned to, only in previous_psk."""
    w = device_world()
    t1 = w.ids[0]

    def rollback_recorded_meanwhile(device: Any, tunnels: Any, deadline: float) -> None:
        rec = w.rec(t1)
        w.vault.put(dataclasses.replace(rec, state="rolling_back", last_error="verification failed elsewhere"))

    dev(w).faults.on("verify", rollback_recorded_meanwhile)
    report = w.run(tunnels=[t1])
    assert [o.result for o in report.outcomes] == [Outcome.UNKNOWN]
    assert w.rec(t1).state == "rolling_back" and w.rec(t1).pending_psk is not None
    old = w.rec(t1).psk
    assert old is not None
    w.cf.set_out_of_band(t1, old.reveal())  # the other writer finishes its rollback at both ends
    dev(w).keys[t1] = old.reveal()
    w.invariant()
    settle(w)


def test_a_failed_validation_call_leaves_a_key_in_flight_pending() -> None:
    """A reconcile whose validation call fails (retries exhausted) learns nothing about a key an
    earlier run may have applied at both ends: it stays pending instead of being rolled back."""
    w = device_world()
    t1 = w.ids[0]
    w.cf.faults.on("apply", lost_answer)
    assert [o.result for o in w.run(tunnels=[t1]).outcomes] == [Outcome.UNKNOWN]
    key = w.rec(t1).pending_psk
    restart(w)
    w.cf.faults.on("validate", raising(CloudflareError("503 Service Unavailable (retries exhausted)")))
    report = w.run(tunnels=[t1], reconcile_only=True)
    assert [o.result for o in report.outcomes] == [Outcome.UNKNOWN], report.outcomes[0].reason
    assert w.rec(t1).state == "pending" and w.rec(t1).pending_psk == key
    w.invariant()
    settle(w)
    assert w.rec(t1).psk == key  # finished forward, not rolled back


def test_a_pair_partner_outside_the_selection_still_holds_its_partner_back() -> None:
    """Pairs are never in flight together (docs/design.md section 4), also when the run names one tunnel."""
    w = managed(world(2, 100, device=FakeDevice("hub", timeout=0.3), customer_endpoint="203.0.113.7"))
    first, second = w.ids
    dev(w).faults.on("deliver", hang())
    w.run(tunnels=[first])
    assert w.rec(first).pending_psk is not None
    restart(w)
    report = w.run(tunnels=[second])
    w.invariant()
    assert [o.result for o in report.outcomes] == [Outcome.SKIPPED]
