"""The rotation protocol in memory: every behaviour tests/test_engine.py proves over HTTP, plus
contradictions, redaction, drift and unusable ids. Every test ends by asserting the invariant."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from rotator.errors import CasConflict, CloudflareError, ConfigError, VaultError
from rotator.model import Outcome, PskSetResult, Record
from rotator.rotation.engine import RunRequest
from rotator.schedule import Policy
from tests.fakes import ACCOUNT, Crash, after_landing, lost_answer, raising
from tests.rotation.world import World, lose_lease_after_validation, managed, world


@pytest.fixture(params=[True, False], ids=["pipelined", "sequential"])
def w(request: pytest.FixtureRequest) -> World:
    return managed(world(pipelined=request.param))


def test_happy_path_rotates_every_tunnel_with_the_minimum_of_calls() -> None:
    w = world()
    before = w.keys()
    report = w.run()
    assert report.ok and report.counts()[Outcome.ROTATED] == 6
    assert all(w.cf.key_of(t) != before[t] for t in w.ids)
    counts = w.cf.faults.counts
    assert (counts["list"], counts["validate"], counts["apply"]) == (1, 2, 2)  # 6 tunnels, batches of 4
    for t in w.ids:
        rec = w.rec(t)
        assert rec.state == "active" and rec.rotation_id == report.rotation_id and rec.rotated_at
        assert rec.tunnel_name and rec.ipsec_id and rec.cf_generated_on == w.cf.generated_on[t]
    assert w.invariant(strict=True) == 6


def test_second_rotation_keeps_previous_psk(w: World) -> None:
    first = {t: w.rec(t).psk for t in w.ids}
    assert w.run().ok
    assert all(w.rec(t).previous_psk == first[t] for t in w.ids)
    w.invariant(strict=True)


def test_partial_unapplied_psks(w: World) -> None:
    t1 = w.ids[0]
    old = w.cf.key_of(t1)
    w.cf.refuse([t1], "tunnel is being modified", stage="apply")
    report = w.run()
    by = w.by_id(report)
    assert by[t1].result == Outcome.UNAPPLIED and "being modified" in by[t1].reason
    assert report.counts()[Outcome.ROTATED] == 5 and not report.ok
    rec = w.rec(t1)
    assert rec.pending_psk is None and rec.psk is not None and rec.psk.reveal() == old
    assert rec.last_error is not None and "being modified" in rec.last_error
    w.invariant(strict=True)


def test_refused_by_validate_only_is_never_applied(w: World) -> None:
    t1 = w.ids[1]
    w.cf.refuse([t1], "peer config mismatch", stage="validate")
    applied_before = len(w.cf.applied)
    report = w.run()
    assert w.by_id(report)[t1].result == Outcome.REFUSED and "peer config mismatch" in w.by_id(report)[t1].reason
    assert t1 not in {t for t, _ in w.cf.applied[applied_before:]}
    assert w.rec(t1).pending_psk is None
    w.invariant(strict=True)


def test_vault_refusing_record_writes_means_nothing_reaches_cloudflare(w: World) -> None:
    before = w.keys()
    w.vault.faults.on("write", raising(VaultError("permission denied", status=403)), times=6)
    report = w.run()
    assert {o.result for o in report.outcomes} == {Outcome.UNAPPLIED}
    assert all("permission denied" in (o.reason or "") for o in report.outcomes)
    assert w.keys() == before and w.cf.faults.counts["apply"] == 0 and w.cf.faults.counts["validate"] == 0
    w.invariant(strict=True)


def test_vault_down_for_the_lease_fails_cleanly(w: World) -> None:
    before = w.keys()
    w.vault.faults.on("lease", raising(VaultError("Vault is sealed", status=503)))
    report = w.run()
    assert not report.ok and report.error is not None and "sealed" in report.error
    assert w.keys() == before
    w.invariant(strict=True)


def test_vault_down_between_apply_and_promote_leaves_key_pending_then_reconcile(w: World) -> None:
    w.cf.faults.on("apply", lambda *_: w.vault.faults.on("write", raising(VaultError("sealed")), times=100))
    report = w.run()
    unknown = report.counts()[Outcome.UNKNOWN]
    assert unknown >= 4 and {o.result for o in report.outcomes} <= {Outcome.UNKNOWN, Outcome.UNAPPLIED}
    w.invariant()  # Cloudflare holds pending_psk
    w.vault.faults.clear()
    settled = w.run(reconcile_only=True)
    assert settled.ok and all(o.reconciled for o in settled.outcomes) and len(settled.outcomes) == unknown
    w.invariant(strict=True)


def test_apply_response_lost_leaves_pending_then_reconcile(w: World) -> None:
    w.cf.faults.on("apply", lost_answer)
    report = w.run()
    assert [o.result for o in report.outcomes].count(Outcome.UNKNOWN) == 4
    assert [o.result for o in report.outcomes].count(Outcome.SKIPPED) == 2  # the run stops
    assert all(w.rec(t).pending_psk is not None for t in w.ids[:4])
    w.invariant()
    settled = w.run(reconcile_only=True)
    assert settled.ok and settled.counts()[Outcome.ROTATED] == 4
    w.invariant(strict=True)


def test_definite_apply_refusal_unstages_and_stops_the_run(w: World) -> None:
    w.cf.faults.on("apply", raising(CloudflareError("bad request", status=400)))
    report = w.run()
    results = [o.result for o in report.outcomes]
    assert results.count(Outcome.UNAPPLIED) == 4 and results.count(Outcome.SKIPPED) == 2
    assert all("apply call failed" in (o.reason or "") for o in report.outcomes if o.result == Outcome.SKIPPED)
    assert w.cf.faults.counts["apply"] == 1
    assert all(w.rec(t).pending_psk is None for t in w.ids)
    w.invariant(strict=True)


def test_validate_call_failing_unstages_and_spares_the_rate_budget(w: World) -> None:
    w.cf.faults.on("validate", raising(CloudflareError("server error", status=500, retryable=True)))
    report = w.run()
    assert {o.result for o in report.outcomes} == {Outcome.UNAPPLIED, Outcome.SKIPPED}
    assert w.cf.faults.counts["validate"] == 1 and w.cf.faults.counts["apply"] == 0
    assert all(w.rec(t).pending_psk is None for t in w.ids)
    w.invariant(strict=True)


def test_dry_run_changes_nothing(w: World) -> None:
    before = w.keys()
    versions = {t: w.rec(t).version for t in w.ids}
    report = w.run(dry_run=True)
    assert report.ok and report.counts()[Outcome.WOULD_ROTATE] == 6
    assert w.keys() == before and {t: w.rec(t).version for t in w.ids} == versions
    w.invariant(strict=True)


def test_a_second_rotator_stands_by_while_the_lease_is_held(w: World) -> None:
    w.engine.leases.acquire(ACCOUNT)
    other = world(holder="replica-b")
    other.cf, other.vault = w.cf, w.vault
    other.engine.api, other.engine.store, other.engine.leases.store = w.cf, w.vault, w.vault
    report = other.engine.run(RunRequest(ACCOUNT))
    assert report.error is not None and "leased to replica-a" in report.error
    w.engine.leases.release(ACCOUNT)
    w.invariant(strict=True)


def test_record_changed_concurrently_is_skipped(w: World) -> None:
    t1 = w.ids[0]

    def interfere(rec: Record) -> None:
        if rec.tunnel_id == t1:
            w.vault.put(dataclasses.replace(w.rec(t1), rotation_id="someone-else"))

    w.vault.faults.on("write", interfere)
    report = w.run()
    assert w.by_id(report)[t1].result == Outcome.SKIPPED and report.counts()[Outcome.ROTATED] == 5
    w.invariant(strict=True)


def test_unknown_tunnel_name_is_a_usage_error_before_any_change(w: World) -> None:
    with pytest.raises(ConfigError):
        w.run(tunnels=["no-such-tunnel"])
    assert w.cf.faults.counts["validate"] == 0
    w.invariant(strict=True)


def test_select_by_name(w: World) -> None:
    report = w.run(tunnels=["tun00002"])
    assert [o.name for o in report.outcomes] == ["tun00002"] and report.ok
    w.invariant(strict=True)


def test_stop_between_batches_takes_the_staged_ahead_keys_back(w: World) -> None:
    stopping = threading.Event()
    w.cf.faults.on("apply", lambda *_: stopping.set())
    w.engine.should_stop = stopping.is_set
    report = w.run()
    assert report.counts()[Outcome.ROTATED] == 4 and report.counts()[Outcome.SKIPPED] == 2
    assert all(o.reason == "shutting down" for o in report.outcomes if o.result == Outcome.SKIPPED)
    assert all(w.rec(t).pending_psk is None for t in w.ids)
    w.invariant(strict=True)


def test_lease_lost_before_apply_leaves_keys_pending_for_the_holder(w: World) -> None:
    lose_lease_after_validation(w)
    report = w.run()
    assert {o.result for o in report.outcomes} == {Outcome.SKIPPED} and len(report.outcomes) == 6
    assert w.cf.faults.counts["apply"] == 0
    assert all(w.rec(t).pending_psk is not None for t in w.ids[:4])  # staged: left for the lease holder
    assert all(w.rec(t).pending_psk is None for t in w.ids[4:])  # staged ahead, never sent: taken back
    w.invariant()
    w.engine.leases.ttl = 120.0
    w.vault.faults.clear()
    assert w.run(reconcile_only=True).ok
    w.invariant(strict=True)


# -- issue 9.1: contradictions stay pending ----------------------------------------------------------

def _odd_apply(tunnel: str, how: str):  # type: ignore[no-untyped-def]
    @after_landing
    def fault(account_id, psks):  # type: ignore[no-untyped-def]
        result = PskSetResult(applied=set(psks))
        if how == "echo":
            result.ambiguous[tunnel] = "the key echoed back differs from the one sent"
        else:
            result.unapplied[tunnel] = "tunnel is being modified"
        return result
    return fault


@pytest.mark.parametrize("how", ["echo", "both"])
def test_contradictory_apply_answer_stays_pending_never_unstaged_nor_promoted(w: World, how: str) -> None:
    t1 = w.ids[0]
    w.cf.faults.on("apply", _odd_apply(t1, how))
    report = w.run()
    assert w.by_id(report)[t1].result == Outcome.UNKNOWN and "contradictory" in w.by_id(report)[t1].reason
    rec = w.rec(t1)
    assert rec.pending_psk is not None and rec.pending_psk.reveal() == w.cf.key_of(t1)
    w.invariant()
    assert w.run(reconcile_only=True).ok
    w.invariant(strict=True)


def test_contradictory_validation_answer_is_not_applied(w: World) -> None:
    t1 = w.ids[0]
    before = w.cf.key_of(t1)
    w.cf.faults.on("validate", lambda _a, psks: PskSetResult(applied=set(psks), ambiguous={t1: "echoed another key"}))
    report = w.run()
    assert w.by_id(report)[t1].result == Outcome.UNKNOWN and w.cf.key_of(t1) == before
    w.invariant()
    assert w.run(reconcile_only=True).ok
    w.invariant(strict=True)


# -- issue 9.7: reason texts are redacted against the batch's keys -------------------------------------

def test_reasons_quoting_a_key_are_redacted_everywhere(w: World) -> None:
    t1 = w.ids[0]
    old = w.rec(t1).psk
    assert old is not None

    def quoting(_a, psks):  # type: ignore[no-untyped-def]
        return PskSetResult(applied=set(psks) - {t1},
                            unapplied={t1: f"key {psks[t1].reveal()} rejected, was {old.reveal()}"})

    w.cf.faults.on("validate", quoting)
    report = w.run()
    reason = w.by_id(report)[t1].reason
    assert "rejected" in reason and "**redacted**" in reason and old.reveal() not in reason
    rec = w.rec(t1)
    assert rec.last_error is not None and "**redacted**" in rec.last_error and old.reveal() not in rec.last_error
    assert all(k.reveal() not in str(report.as_dict()) for k in (old, w.rec(t1).psk) if k)
    w.invariant(strict=True)


# -- drift and unusable ids --------------------------------------------------------------------------

def test_a_key_changed_outside_the_rotator_is_drift_and_is_rekeyed(w: World) -> None:
    t1 = w.ids[2]
    w.cf.set_out_of_band(t1, "set-in-the-dashboard")
    report = w.run(policy_for=lambda t: Policy("default", every=86400.0))
    assert report.drifted == [t1] and [o.tunnel_id for o in report.outcomes] == [t1]
    assert w.by_id(report)[t1].result == Outcome.ROTATED and w.cf.key_of(t1) != "set-in-the-dashboard"
    assert w.rec(t1).cf_generated_on == w.cf.generated_on[t1]
    assert w.run(policy_for=lambda t: Policy("default", every=86400.0)).drifted == []
    w.invariant(strict=True)


def test_on_drift_report_only_reports(w: World) -> None:
    t1 = w.ids[2]
    w.cf.set_out_of_band(t1, "set-in-the-dashboard")
    report = w.run(policy_for=lambda t: Policy("default", every=86400.0), on_drift="report")
    assert report.drifted == [t1] and report.outcomes == []
    assert w.cf.key_of(t1) == "set-in-the-dashboard"
    assert [v.tunnel_id for v in report.views if v.drifted] == [t1]


def test_a_pending_key_is_not_mistaken_for_drift(w: World) -> None:
    w.cf.faults.on("apply", lost_answer)
    w.run()
    report = w.run(reconcile_only=True)
    assert report.drifted == [] and report.ok
    w.invariant(strict=True)


def test_unusable_tunnel_ids_are_refused_and_never_touch_vault() -> None:
    w = world(n=3)
    bad = dataclasses.replace(w.cf.tunnels[ACCOUNT][0], id="../_leases/" + ACCOUNT,
                              problem="tunnel id is not 32 lowercase hex digits")
    w.cf.tunnels[ACCOUNT][0] = bad
    w.cf.keys[bad.id] = "x"
    reads = w.vault.faults.counts["read"]
    report = w.run()
    by = w.by_id(report)
    assert by[bad.id].result == Outcome.REFUSED and "32 lowercase hex" in by[bad.id].reason
    assert report.counts()[Outcome.ROTATED] == 2 and w.vault.faults.counts["read"] == reads + 2
    assert (ACCOUNT, bad.id) not in w.vault.versions and w.cf.keys[bad.id] == "x"
    w.cf.tunnels[ACCOUNT].pop(0)
    w.invariant(strict=True)


def test_scheduled_runs_rotate_only_what_is_due(w: World) -> None:
    report = w.run(policy_for=lambda t: Policy("default", every=86400.0))
    assert report.outcomes == [] and len(report.views) == 6
    assert all(v.next_due is not None and v.state == "active" for v in report.views)
    report = w.run(policy_for=lambda t: Policy("default", every=1e-6))
    assert report.ok and report.counts()[Outcome.ROTATED] == 6
    w.invariant(strict=True)


def test_a_crash_after_staging_is_finished_by_reconcile(w: World) -> None:
    w.cf.faults.on("validate", raising(Crash()))
    with pytest.raises(Crash):
        w.run()
    w.invariant()
    w.engine.leases._held.clear()  # the process died: a new one starts with no lease in memory
    assert w.run(reconcile_only=True).ok
    w.invariant(strict=True)


def test_a_vault_write_answer_lost_after_landing_is_not_promoted_twice(w: World) -> None:
    t1 = w.ids[0]
    state = {"done": False}

    def land_then_fail(rec: Record) -> None:
        if rec.tunnel_id == t1 and rec.state == "active" and rec.pending_psk is None and not state["done"]:
            state["done"] = True
            w.vault.put(rec)
            raise CasConflict("lost answer; the retry conflicts with its own write")

    w.vault.faults.on("write", land_then_fail, times=100)
    assert w.run().ok
    w.invariant(strict=True)


def test_a_tunnel_without_a_policy_is_never_due(w: World) -> None:
    t1 = w.ids[0]
    report = w.run(policy_for=lambda t: None if t.id == t1 else Policy("default", every=1e-6))
    assert report.counts()[Outcome.ROTATED] == 5 and t1 not in w.by_id(report)
    w.invariant(strict=True)
