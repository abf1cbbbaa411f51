"""Regression tests from an adversarial review of the protocol against the invariant (DESIGN.md
sections 2 and 4): each reproduces one defect and ends with the invariant, both ends."""

from __future__ import annotations

from rotator.model import Outcome
from tests.fakes import hang
from tests.rotation.test_devices import dev, device_world, restart


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
