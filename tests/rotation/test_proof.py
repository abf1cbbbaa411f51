"""The proof of each rotation in the record (docs/design.md section 3, ``verified_at``/``verified_by``),
computed in one place (``steps.verified_by``) from what the verify and health steps saw; the drift
marker a re-key leaves. In memory against the port fakes; every test ends with the invariant."""

from __future__ import annotations

import pytest

from rotator.model import ack
from rotator.rotation.ports import HealthState
from tests.fakes import ACCOUNT, FakeDevice, FakeHealth, refuse, waiting
from tests.rotation.world import managed, world


@pytest.mark.parametrize("proof", ["ike_reauth", "vendor_status"])
def test_a_verified_rotation_records_the_devices_proof(proof: str) -> None:
    device = FakeDevice("edge", kind="exec")
    device.proof = proof
    w = world(2, device=device)
    assert w.run().ok
    for t in w.ids:
        rec = w.rec(t)
        assert (rec.verified_by, rec.device, rec.verified_at) == (proof, "edge", rec.rotated_at)
    assert w.invariant(strict=True) == 2


def test_without_a_device_the_proof_is_none_or_cloudflares_health() -> None:
    w = world(2)
    assert w.run().ok
    assert {w.rec(t).verified_by for t in w.ids} == {"none"}
    w.cf.faults.counts.clear()
    report = w.run(health=FakeHealth(HealthState.HEALTHY))
    assert report.ok
    assert {w.rec(t).verified_by for t in w.ids} == {"health"}
    report = w.run(health=FakeHealth(HealthState.NO_DATA))  # no data proves nothing
    assert report.ok and {w.rec(t).verified_by for t in w.ids} == {"none"}
    assert w.invariant(strict=True) == 2


def test_a_device_that_does_not_verify_proves_nothing() -> None:
    w = world(1, device=FakeDevice("edge", kind="exec", verify=False))
    assert w.run().ok
    assert w.rec(w.ids[0]).verified_by == "none"
    assert w.invariant(strict=True) == 1


def test_a_manual_ack_is_recorded_with_the_acknowledged_rotation() -> None:
    device = FakeDevice("desk", kind="manual", verify=False)
    w = world(1, device=device)
    device.faults.on("deliver", waiting)
    first = w.run()
    assert [str(o.result) for o in first.outcomes] == ["waiting"]
    tid = w.ids[0]
    staged = w.rec(tid)
    assert staged.verified_by is None and staged.verified_at is None
    w.vault.write_many([ack(staged, holds="new")])
    device.keys[tid] = staged.pending_psk.reveal() if staged.pending_psk else ""  # the operator typed it in
    later = w.run(reconcile_only=True)
    assert later.ok
    rec = w.rec(tid)
    assert (rec.verified_by, rec.acked_rotation_id, rec.device) == ("operator_ack", first.rotation_id, "desk")
    assert rec.rotation_id == later.rotation_id != first.rotation_id
    assert w.invariant(strict=True) == 1


def test_staging_clears_the_proof_and_a_failed_attempt_leaves_none() -> None:
    device = FakeDevice("edge", kind="strongswan")
    w = managed(world(1, device=device))
    tid = w.ids[0]
    assert w.rec(tid).verified_by == "ike_reauth"
    device.faults.on("deliver", refuse())
    report = w.run()
    assert [str(o.result) for o in report.outcomes] == ["refused"]
    versions = w.vault.versions[(ACCOUNT, tid)][-2:]  # the staged version, then the unstaged one
    assert [(v.state, v.verified_by, v.verified_at) for v in versions] == [("pending", None, None),
                                                                           ("active", None, None)]
    assert w.invariant(strict=True) == 1


def test_a_drift_re_key_carries_cloudflares_time_and_a_rotation_clears_it() -> None:
    w = managed(world(2))
    drifted = w.ids[0]
    w.cf.set_out_of_band(drifted, "someone-else-set-this-key")
    seen = w.cf.generated_on[drifted]
    report = w.run()  # nothing is due: only the drifted tunnel is re-keyed
    assert report.drifted == [drifted]
    assert w.rec(drifted).drift_generated_on == seen
    assert w.rec(w.ids[1]).drift_generated_on is None
    assert w.run(tunnels=[drifted]).ok
    assert w.rec(drifted).drift_generated_on is None
    assert w.invariant(strict=True) == 2


def test_after_a_rollback_the_restored_key_is_not_taken_for_drift() -> None:
    device = FakeDevice("edge", kind="strongswan")
    w = managed(world(1, device=device))
    tid = w.ids[0]
    device.faults.on("verify", refuse("IKE_AUTH failed"))
    report = w.run()
    assert [str(o.result) for o in report.outcomes] == ["rolled_back"]
    assert w.rec(tid).cf_generated_on == w.cf.generated_on[tid]  # the restore's stamp, not the abandoned key's
    later = w.run(reconcile_only=True)
    assert later.drifted == [] and later.ok
    assert w.invariant(strict=True) == 1
