"""Hostile answers at the boundary, end to end: the simulators' faults through the real adapters and the
engine. Each test ends by asserting the invariant (docs/design.md section 2)."""

from __future__ import annotations

import json

import pytest

from rotator.rotation.engine import RunRequest
from tests.helpers import PREFIX, assert_invariant, record, run_cli, runtime


@pytest.fixture
def rt(sims, tmp_path):
    r = runtime(sims, "[cloudflare]\nretry_attempts = 2\n", tmp_path)
    yield r
    r.close()


def account(sims):
    return next(iter(sims.tunnels_by_account))


def settles(sims, rt, acc):
    """The invariant holds now, and a fault-free reconcile reaches its strict form."""
    assert_invariant(sims, acc)
    rt.engine.run(RunRequest(acc, reconcile_only=True))
    assert_invariant(sims, acc, strict=True)


@pytest.mark.parametrize("kind", ["echo_other_key", "both_maps"])
def test_a_contradictory_apply_keeps_the_key_pending(sims, rt, kind):
    acc = account(sims)
    victim = sims.tunnels_by_account[acc][0]
    assert rt.engine.run(RunRequest(acc)).ok
    sims.cloudflare.contradict([victim], kind=kind, stage="apply")
    rt.engine.run(RunRequest(acc))
    data = record(sims, acc, victim)
    # Cloudflare really holds the key it answered about in a contradictory way: it must still be in Vault.
    assert sims.cloudflare.psk_of(acc, victim) == data.get("pending_psk")
    assert_invariant(sims, acc)
    sims.cloudflare.clear_contradictions()
    settles(sims, rt, acc)


def test_a_contradictory_validation_never_applies(sims, rt):
    acc = account(sims)
    victim = sims.tunnels_by_account[acc][1]
    assert rt.engine.run(RunRequest(acc)).ok
    before = sims.cloudflare.psk_of(acc, victim)
    sims.cloudflare.contradict([victim], kind="echo_other_key", stage="validate")
    report = rt.engine.run(RunRequest(acc))
    assert sims.cloudflare.psk_of(acc, victim) == before
    # A contradiction is ambiguous: the key stays pending (never applied, never unstaged) ...
    assert {o.tunnel_id: o.result for o in report.outcomes}[victim] == "unknown"
    assert_invariant(sims, acc)
    # ... and a fault-free reconcile settles it.
    sims.cloudflare.clear_contradictions()
    assert rt.engine.run(RunRequest(acc, reconcile_only=True)).ok
    assert_invariant(sims, acc, strict=True)


def test_odd_tunnel_ids_never_touch_vault(sims, rt):
    acc = account(sims)
    other = sims.cloudflare.add_account()
    other_tunnel = sims.cloudflare.add_tunnel(other)
    sims.tunnels_by_account[other] = [other_tunnel]
    assert rt.engine.run(RunRequest(other)).ok
    other_record = record(sims, other, other_tunnel)
    assert rt.engine.run(RunRequest(acc)).ok  # leaves a lease record for acc
    lease_before = sims.vault.read_data(f"{PREFIX}/_leases/{acc}")
    for odd in (f"../{other}/{other_tunnel}", f"../_leases/{acc}", "sub/dir", ".."):
        sims.cloudflare.add_tunnel(acc, tunnel_id=odd)
    keys_before = sims.vault.keys_under("")
    rt.engine.run(RunRequest(acc))
    assert record(sims, other, other_tunnel) == other_record
    assert set(sims.vault.keys_under("")) == set(keys_before)
    lease_after = sims.vault.read_data(f"{PREFIX}/_leases/{acc}")
    assert lease_after is not None and "psk" not in lease_after and lease_before is not None
    assert_invariant(sims, acc, strict=True)
    assert_invariant(sims, other, strict=True)


@pytest.mark.parametrize("variant", ["html", "not_json", "deep", "types"])
def test_garbage_from_vault_is_a_one_line_failure(sims, rt, variant):
    acc = account(sims)
    assert rt.engine.run(RunRequest(acc)).ok
    sims.vault.garbage_next("kv.read", variant=variant, count=3)
    report = rt.engine.run(RunRequest(acc))
    assert all("\n" not in (o.reason or "") for o in report.outcomes)
    settles(sims, rt, acc)


def test_an_out_of_band_change_is_visible_in_the_listing(sims, rt):
    acc = account(sims)
    victim = sims.tunnels_by_account[acc][2]
    assert rt.engine.run(RunRequest(acc)).ok
    before = {t.id: t.last_generated_on for t in rt.cloudflare.list_tunnels(acc)}
    sims.cloudflare.change_psk_out_of_band(acc, victim)
    after = {t.id: t.last_generated_on for t in rt.cloudflare.list_tunnels(acc)}
    assert after[victim] > before[victim]
    assert record(sims, acc, victim)["psk"] != sims.cloudflare.psk_of(acc, victim)  # drift, for the engine


@pytest.mark.parametrize("route", ["cf.psk_apply", "cf.list"])
def test_a_deeply_nested_cloudflare_answer_is_one_line_and_the_keys_stay_pending(sims, route):
    """Issue 20, item 4: a 200 nested 100,000 brackets deep killed `rotate` with a RecursionError."""
    acc = account(sims)
    env = sims.env()
    assert run_cli(["rotate", "--account", acc, "--all"], env).returncode == 0
    sims.cloudflare.garbage_next(route, variant="deep")
    proc = run_cli(["rotate", "--account", acc, "--all", "--output", "json"], env)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and "RecursionError" not in proc.stderr
    if route == "cf.psk_apply":  # the apply may have landed: every key of the batch stays pending
        report = json.loads(proc.stdout)
        assert {t["result"] for t in report["tunnels"]} == {"unknown"}
        assert all("pending_psk" in (record(sims, acc, t) or {}) for t in sims.tunnels_by_account[acc])
    else:
        assert len(proc.stderr.strip().splitlines()) == 1 and "CLOUDFLARE_BASE_URL" in proc.stderr
    assert_invariant(sims, acc)
    assert run_cli(["reconcile", "--account", acc], env).returncode == 0
    assert_invariant(sims, acc, strict=True)
