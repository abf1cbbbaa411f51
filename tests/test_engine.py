"""The rotation protocol against the simulators over loopback: happy path and every fault.

Every test ends by asserting the invariant of docs/design.md section 2. The same behaviours, and those
that need a fault at a point no simulator offers (a seal between apply and promote, a concurrent
writer, a shutdown between batches), are tested in memory in tests/rotation/.
"""

from __future__ import annotations

import threading

import pytest

from rotator.rotation.engine import REFUSED, ROTATED, SKIPPED, UNAPPLIED, UNKNOWN, WOULD_ROTATE, RunRequest
from tests.helpers import assert_invariant, custom_runtime, record, runtime


def account(sims):
    return next(iter(sims.tunnels_by_account))


def rotate_all(rt, acc, **kw):
    return rt.engine.run(RunRequest(acc, **kw))


@pytest.fixture
def rt(sims, tmp_path):
    r = runtime(sims, "[cloudflare]\nbatch_size = 4\nretry_attempts = 3\n", tmp_path)
    yield r
    r.close()


@pytest.fixture
def managed(sims, rt):
    """Every tunnel rotated once, so every tunnel is managed before a fault is injected."""
    acc = account(sims)
    assert rotate_all(rt, acc).ok
    sims.cloudflare.counts.clear()
    sims.vault.counts.clear()
    return acc


def test_happy_path_rotates_every_tunnel_with_the_minimum_of_calls(sims, rt):
    acc = account(sims)
    before = sims.cloudflare.psks(acc)
    report = rotate_all(rt, acc)
    assert report.ok and report.counts()[ROTATED] == 6
    after = sims.cloudflare.psks(acc)
    assert all(after[t] != before[t] for t in after)
    counts = sims.cloudflare.request_counts()
    # 1 list + 2 calls per batch: 6 tunnels in batches of 4 -> 2 batches
    assert counts == {"cf.list": 1, "cf.psk_validate": 2, "cf.psk_apply": 2}
    vault = sims.vault.request_counts()
    assert vault["kv.read"] == 6 + 1  # records + lease
    for t in sims.tunnels_by_account[acc]:
        data = record(sims, acc, t)
        assert data["state"] == "active" and data["rotation_id"] == report.rotation_id and data["rotated_at"]
        assert data["account_id"] == acc and data["tunnel_name"]
    assert assert_invariant(sims, acc, strict=True) == 6


def test_second_rotation_keeps_previous_psk(sims, rt, managed):
    acc = managed
    first = {t: record(sims, acc, t)["psk"] for t in sims.tunnels_by_account[acc]}
    assert rotate_all(rt, acc).ok
    for t in sims.tunnels_by_account[acc]:
        assert record(sims, acc, t)["previous_psk"] == first[t]
    assert_invariant(sims, acc, strict=True)


def test_partial_unapplied_psks(sims, rt, managed):
    acc = managed
    t1 = sims.tunnels_by_account[acc][0]
    old = sims.cloudflare.psk_of(acc, t1)
    sims.cloudflare.refuse_tunnels([t1], reason="tunnel is being modified", stage="apply")
    report = rotate_all(rt, acc)
    by = {o.tunnel_id: o for o in report.outcomes}
    assert by[t1].result == UNAPPLIED and "tunnel is being modified" in by[t1].reason
    assert sum(o.result == ROTATED for o in report.outcomes) == 5 and not report.ok
    data = record(sims, acc, t1)
    assert "pending_psk" not in data and data["psk"] == old and "being modified" in data["last_error"]
    assert_invariant(sims, acc, strict=True)


def test_refused_by_validate_only_is_never_applied(sims, rt, managed):
    acc = managed
    t1 = sims.tunnels_by_account[acc][1]
    sims.cloudflare.refuse_tunnels([t1], reason="peer config mismatch", stage="validate")
    report = rotate_all(rt, acc)
    by = {o.tunnel_id: o for o in report.outcomes}
    assert by[t1].result == REFUSED and "peer config mismatch" in by[t1].reason
    assert t1 not in {h.tunnel for h in sims.cloudflare.applied_history()[-5:]}
    assert "pending_psk" not in record(sims, acc, t1)
    assert_invariant(sims, acc, strict=True)


def test_vault_refusing_writes_means_nothing_reaches_cloudflare(sims, rt, managed):
    acc = managed
    before = sims.cloudflare.psks(acc)
    sims.vault.refuse_writes(403)
    report = rotate_all(rt, acc)
    assert not report.ok
    counts = sims.cloudflare.request_counts()
    assert "cf.psk_apply" not in counts and "cf.psk_validate" not in counts
    assert sims.cloudflare.psks(acc) == before
    sims.vault.refuse_writes(None)
    assert_invariant(sims, acc, strict=True)


def test_vault_refusing_record_writes_only(sims, rt, managed):
    """The lease can be written but records cannot: every tunnel is unapplied, none applied."""
    acc = managed
    before = sims.cloudflare.psks(acc)
    for t in sims.tunnels_by_account[acc]:
        sims.vault.policies["rotator"] = [
            ("secret/data/cloudflare/magic-ipsec/_leases/*", {"create", "read", "update"}),
            ("secret/data/cloudflare/magic-ipsec/*", {"read"}),
            ("secret/metadata/cloudflare/magic-ipsec/*", {"read", "list"}),
        ]
    report = rotate_all(rt, acc)
    assert {o.result for o in report.outcomes} == {UNAPPLIED}
    assert all("denied permission" in o.reason for o in report.outcomes)
    assert sims.cloudflare.psks(acc) == before and "cf.psk_apply" not in sims.cloudflare.request_counts()
    assert_invariant(sims, acc, strict=True)


def test_vault_sealed_fails_cleanly(sims, rt, managed):
    acc = managed
    before = sims.cloudflare.psks(acc)
    sims.vault.seal()
    report = rotate_all(rt, acc)
    assert not report.ok and "sealed" in report.error
    assert sims.cloudflare.psks(acc) == before
    sims.vault.unseal()
    assert_invariant(sims, acc, strict=True)


def test_429_and_5xx_are_retried_to_success(sims, rt, managed):
    acc = managed
    sims.cloudflare.fail_next("cf.list", count=1, status=429, retry_after=1)
    sims.cloudflare.fail_next("cf.psk_validate", count=1, status=502, html=True)
    sims.cloudflare.fail_next("cf.psk_apply", count=2, status=503)
    report = rotate_all(rt, acc)
    assert report.ok and report.counts()[ROTATED] == 6
    assert sims.cloudflare.request_counts()["cf.psk_apply"] == 2 + 2
    assert_invariant(sims, acc, strict=True)


def test_apply_response_lost_is_retried_and_settles(sims, rt, managed):
    acc = managed
    sims.cloudflare.drop_next("cf.psk_apply")
    report = rotate_all(rt, acc)
    assert report.ok  # the retry re-applies the same keys, which is harmless
    assert_invariant(sims, acc, strict=True)


def test_apply_response_lost_without_retries_leaves_pending_then_reconcile(sims, tmp_path, managed):
    acc = managed
    with custom_runtime(sims, "[cloudflare]\nretry_attempts = 1\n", tmp_path) as rt:
        sims.cloudflare.drop_next("cf.psk_apply")
        report = rotate_all(rt, acc)
        assert {o.result for o in report.outcomes} == {UNKNOWN}
        assert all("pending_psk" in record(sims, acc, t) for t in sims.tunnels_by_account[acc])
        assert_invariant(sims, acc)  # Cloudflare holds the pending keys
        settled = rotate_all(rt, acc, reconcile_only=True)
        assert settled.ok and settled.counts()[ROTATED] == 6
        assert_invariant(sims, acc, strict=True)


def test_apply_answer_arrives_too_late(sims, tmp_path, managed):
    acc = managed
    with custom_runtime(sims, "[cloudflare]\nretry_attempts = 1\ntimeout = 1\n", tmp_path) as rt:
        sims.cloudflare.late_next("cf.psk_apply", delay=2.0)
        report = rotate_all(rt, acc)
        assert {o.result for o in report.outcomes} == {UNKNOWN}
        assert_invariant(sims, acc)
        assert rotate_all(rt, acc, reconcile_only=True).ok
        assert_invariant(sims, acc, strict=True)


def test_definite_apply_refusal_unstages_and_stops_the_run(sims, rt, managed):
    acc = managed
    sims.cloudflare.fail_next("cf.psk_apply", count=2, status=400)
    report = rotate_all(rt, acc)
    # Batch 1 (4 tunnels) refused; batch 2, staged ahead, is taken back instead of hitting the same wall.
    assert [o.result for o in report.outcomes].count(UNAPPLIED) == 4
    assert [o.result for o in report.outcomes].count(SKIPPED) == 2
    assert all("apply call failed" in o.reason for o in report.outcomes if o.result == SKIPPED)
    assert sims.cloudflare.request_counts()["cf.psk_apply"] == 1
    assert all("pending_psk" not in record(sims, acc, t) for t in sims.tunnels_by_account[acc])
    assert_invariant(sims, acc, strict=True)


def test_validate_call_failing_unstages_and_spares_the_rate_budget(sims, rt, managed):
    acc = managed
    sims.cloudflare.fail_next("cf.psk_validate", count=10, status=500)
    report = rotate_all(rt, acc)
    assert {o.result for o in report.outcomes} == {UNAPPLIED, SKIPPED}
    counts = sims.cloudflare.request_counts()
    assert "cf.psk_apply" not in counts and counts["cf.psk_validate"] == 3  # one batch's retries, not two
    assert all("pending_psk" not in record(sims, acc, t) for t in sims.tunnels_by_account[acc])
    assert_invariant(sims, acc, strict=True)


def test_vault_stage_write_response_lost_is_settled_by_reading_back(sims, rt, managed):
    acc = managed
    sims.vault.drop_next("kv.write", count=2)
    report = rotate_all(rt, acc)
    assert report.ok
    assert_invariant(sims, acc, strict=True)


def test_dry_run_changes_nothing(sims, rt, managed):
    acc = managed
    before = sims.cloudflare.psks(acc)
    versions = {t: sims.vault.version_of(f"cloudflare/magic-ipsec/{acc}/{t}") for t in before}
    report = rotate_all(rt, acc, dry_run=True)
    assert report.ok and report.counts()[WOULD_ROTATE] == 6
    assert sims.cloudflare.psks(acc) == before
    assert {t: sims.vault.version_of(f"cloudflare/magic-ipsec/{acc}/{t}") for t in before} == versions
    assert "kv.write" not in sims.vault.request_counts()
    assert_invariant(sims, acc, strict=True)


def test_two_rotators_on_one_account(sims, tmp_path, managed):
    acc = managed
    sims.cloudflare.set_latency(0.05)
    a = runtime(sims, "[cloudflare]\nbatch_size = 2\n", tmp_path, holder="replica-a")
    b = runtime(sims, "[cloudflare]\nbatch_size = 2\n", tmp_path, holder="replica-b")
    reports = {}
    barrier = threading.Barrier(2)

    def go(name, rt):
        barrier.wait()
        reports[name] = rotate_all(rt, acc)

    threads = [threading.Thread(target=go, args=(n, r)) for n, r in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a.close()
    b.close()
    results = [reports["a"], reports["b"]]
    assert any(r.ok for r in results)
    loser = [r for r in results if not r.ok]
    for r in loser:
        assert (r.error and "leased" in r.error) or all(o.result == SKIPPED for o in r.outcomes)
    assert_invariant(sims, acc, strict=True)


def test_unknown_tunnel_name_is_a_usage_error_before_any_change(sims, rt, managed):
    from rotator.errors import ConfigError

    acc = managed
    with pytest.raises(ConfigError):
        rotate_all(rt, acc, tunnels=["no-such-tunnel"])
    assert "cf.psk_validate" not in sims.cloudflare.request_counts()
    assert_invariant(sims, acc, strict=True)


def test_select_by_name(sims, rt, managed):
    acc = managed
    report = rotate_all(rt, acc, tunnels=["tun00002"])
    assert [o.name for o in report.outcomes] == ["tun00002"] and report.ok
    assert_invariant(sims, acc, strict=True)


@pytest.mark.parametrize("how", ["delete", "destroy", "metadata_only"])
def test_record_deleted_or_destroyed_by_hand_is_rotated_again(sims, rt, managed, how):
    import hvac

    acc = managed
    t1 = sims.tunnels_by_account[acc][0]
    path = f"cloudflare/magic-ipsec/{acc}/{t1}"
    kv = hvac.Client(url=sims.vault_addr, token=sims.vault.root_token).secrets.kv.v2
    if how == "delete":
        kv.delete_latest_version_of_secret(path)
    elif how == "destroy":
        kv.destroy_secret_versions(path, [sims.vault.version_of(path)])
    else:
        kv.delete_metadata_and_all_versions(path)
        kv.update_metadata(path, max_versions=20)
    report = rotate_all(rt, acc, tunnels=[t1])
    assert report.ok, report.as_dict()
    assert_invariant(sims, acc, strict=True)


def test_a_retried_apply_never_outlives_the_lease(sims, tmp_path, managed):
    """A Retry-After longer than the lease has left: the apply is not retried after the lease."""
    acc = managed
    with custom_runtime(sims, "[rotation]\nlease_ttl = \"4s\"\n[cloudflare]\ntimeout = 2\n", tmp_path) as rt:
        sims.cloudflare.fail_next("cf.psk_apply", count=1, status=429, retry_after=30)
        report = rotate_all(rt, acc)
        assert {o.result for o in report.outcomes} == {UNAPPLIED}
        assert all("outlive" in o.reason for o in report.outcomes)
        assert sims.cloudflare.request_counts()["cf.psk_apply"] == 1
        assert_invariant(sims, acc, strict=True)


def test_a_tunnel_cloudflare_lists_twice_is_refused_once_and_never_touched(sims, rt, managed):
    """Issue 20 item 1 over HTTP: the simulator's listing names one tunnel twice, under a second name."""
    acc = managed
    victim = sims.tunnels_by_account[acc][0]
    sims.cloudflare.list_twice(acc, victim, "dup-of-the-first")
    before, held = record(sims, acc, victim), sims.cloudflare.psk_of(acc, victim)
    report = rotate_all(rt, acc)
    mine = [o for o in report.outcomes if o.tunnel_id == victim]
    assert [o.result for o in mine] == [REFUSED] and "dup-of-the-first" in mine[0].name
    assert "listing names tunnel" in mine[0].reason and len(report.outcomes) == 6
    assert report.counts()[ROTATED] == 5 and not report.ok
    assert record(sims, acc, victim) == before and sims.cloudflare.psk_of(acc, victim) == held
    sims.cloudflare.clear_listed_twice()
    assert rotate_all(rt, acc, tunnels=[victim]).ok
    assert_invariant(sims, acc, strict=True)
