"""The engine with real device adapters: Vault and Cloudflare simulators, the simulated webhook device
(whose verification succeeds only when Cloudflare holds the same key), and exec hooks. Every test
ends with the invariant on both ends: Cloudflare's key and the device's key are each the latest
record's psk or pending_psk (strictly psk once nothing is in flight)."""

from __future__ import annotations

import sys
import tomllib

import pytest

from rotator.adapters.devices import DeviceRegistry, parse_devices
from rotator.rotation.engine import RunRequest
from rotator.sim.device import start as start_device
from tests import helpers
from tests.helpers import assert_invariant, record, runtime


@pytest.fixture
def world(sims, tmp_path):
    acc = next(iter(sims.tunnels_by_account))
    device = start_device(str(tmp_path), peer=sims.cloudflare.psk_of)
    rt = runtime(sims, "[cloudflare]\nbatch_size = 4\nretry_attempts = 2\n", tmp_path)
    registry = DeviceRegistry(parse_devices(tomllib.loads(device.config("site", timeout="3s"))["devices"]))
    try:
        yield sims, rt, acc, device.sim, registry
    finally:
        registry.close()
        rt.close()
        device.stop()
        helpers.SECRETS.update(device.sim.keys.values())


def run(rt, acc, registry, **kw):
    return rt.engine.run(RunRequest(acc, device_for=registry.for_account(acc), **kw))


def both_ends(sims, acc, device_sim, strict=False) -> int:
    """The invariant, Cloudflare's end and the device's end (the shared helper)."""
    return helpers.assert_both_ends(sims, acc, device_sim.held, strict=strict)


def outcomes(report) -> dict[str, str]:
    return {o.tunnel_id: str(o.result) for o in report.outcomes}


def test_a_rotation_reaches_both_ends_and_verifies(world):
    sims, rt, acc, device_sim, registry = world
    report = run(rt, acc, registry)
    assert report.ok, outcomes(report)
    assert both_ends(sims, acc, device_sim, strict=True) == 6
    assert device_sim.keys_of(acc) == {t: sims.cloudflare.psk_of(acc, t) for t in sims.tunnels_by_account[acc]}
    for tid in sims.tunnels_by_account[acc]:  # each tunnel delivered once, then verified once
        assert [c.action for c in device_sim.calls if tid in c.tunnel_ids] == ["deliver", "verify"]
    assert (record(sims, acc, sims.tunnels_by_account[acc][0]) or {}).get("device") == "site"


@pytest.mark.parametrize("fault, outcome, reason", [
    ("refuse", "refused", "sim-device refused the key"),  # Cloudflare never sees the key
    ("fail_verify", "rolled_back", "AUTHENTICATION_FAILED"),  # both ends go back to the old key
])
def test_a_device_that_says_no_leaves_both_ends_on_the_old_key(world, fault, outcome, reason):
    sims, rt, acc, device_sim, registry = world
    assert run(rt, acc, registry).ok
    bad = sims.tunnels_by_account[acc][1]
    before = sims.cloudflare.psk_of(acc, bad)
    getattr(device_sim, fault)([bad])
    report = run(rt, acc, registry)
    assert outcomes(report)[bad] == outcome
    assert reason in next(o.reason for o in report.outcomes if o.tunnel_id == bad)
    assert sims.cloudflare.psk_of(acc, bad) == before == device_sim.held(acc, bad)
    assert sum(1 for r in outcomes(report).values() if r == "rotated") == 5
    both_ends(sims, acc, device_sim, strict=True)


@pytest.mark.parametrize("fault", ["hang_verify", "garbage_deliver", "deep_deliver"])
def test_an_unclear_device_answer_leaves_the_key_pending_until_reconcile(world, fault):
    sims, rt, acc, device_sim, registry = world
    assert run(rt, acc, registry).ok
    if fault == "hang_verify":
        device_sim.hang_next(5.0, count=1, action="verify")  # past the device's 3 s timeout
    elif fault == "deep_deliver":  # a 200 nested 100,000 brackets deep: unreadable, not a crash
        device_sim.garbage_next("device.deliver", variant="deep")
    else:
        device_sim.answer_garbage(count=1, action="deliver")
    verified_before = len(device_sim.calls_of("verify"))
    report = run(rt, acc, registry, tunnels=sims.tunnels_by_account[acc][:1])
    assert list(outcomes(report).values()) == ["unknown"]
    both_ends(sims, acc, device_sim)
    if fault == "hang_verify":  # the hung request lands on its own later; let it, then reconcile
        helpers.wait_for(lambda: len(device_sim.calls_of("verify")) > verified_before, timeout=15,
                         what="the hung verification to land")
    report = run(rt, acc, registry, reconcile_only=True)
    assert report.ok, outcomes(report)
    both_ends(sims, acc, device_sim, strict=True)


def hook(tmp_path, body: str) -> str:
    path = tmp_path / "hook"
    path.write_text(f"#!{sys.executable}\nimport json, sys\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_an_exec_hook_that_prints_a_key_and_fails_is_refused_and_redacted(sims, tmp_path):
    acc = next(iter(sims.tunnels_by_account))
    path = hook(tmp_path, "doc = json.load(sys.stdin)\n"
                          "print('cannot set', doc['tunnels'][0]['psk'], file=sys.stderr)\nsys.exit(2)")
    specs = parse_devices([{"name": "branch", "kind": "exec", "tunnels": ["*"], "command": [path]}])
    rt = runtime(sims, "", tmp_path)
    try:
        report = run(rt, acc, DeviceRegistry(specs), tunnels=sims.tunnels_by_account[acc][:2])
    finally:
        rt.close()
    assert set(outcomes(report).values()) == {"refused"}
    reasons = " ".join(o.reason or "" for o in report.outcomes)
    assert "exit status 2: cannot set **redacted**" in reasons
    for tid in sims.tunnels_by_account[acc][:2]:
        data = record(sims, acc, tid) or {}
        assert "pending_psk" not in data
    assert_invariant(sims, acc, strict=True)


def test_an_unreachable_device_keeps_cloudflare_on_the_old_key(world, tmp_path):
    sims, rt, acc, device_sim, registry = world
    key_file = tmp_path / "gone.key"
    key_file.write_text(device_sim.secret)
    assert run(rt, acc, registry).ok
    tid = sims.tunnels_by_account[acc][0]
    before = sims.cloudflare.psk_of(acc, tid)
    gone = DeviceRegistry(parse_devices([{"name": "site", "kind": "webhook", "tunnels": ["*"], "timeout": "2s",
                                          "url": "http://127.0.0.1:9/psk", "secret_file": str(key_file)}]))
    try:
        report = run(rt, acc, gone, tunnels=[tid])
    finally:
        gone.close()
    (outcome,) = report.outcomes
    # The device is also told to roll back, which cannot reach it either: the key stays pending.
    assert outcome.result == "unknown" and "cannot connect" in outcome.reason
    assert sims.cloudflare.psk_of(acc, tid) == before == device_sim.held(acc, tid)  # nothing reached anyone
    both_ends(sims, acc, device_sim)
    report = run(rt, acc, registry, reconcile_only=True)  # the device answers again
    assert report.ok, outcomes(report)
    both_ends(sims, acc, device_sim, strict=True)


def test_a_rolled_back_tunnel_is_not_drift_for_the_next_runs(world):
    """Issue 20 item 6 over HTTP: the rollback's apply at Cloudflare moves last_generated_on; the record
    keeps what Cloudflare answered, so neither status nor the next run takes it for drift."""
    from rotator.schedule import Policy

    sims, rt, acc, device_sim, registry = world
    assert run(rt, acc, registry).ok
    bad = sims.tunnels_by_account[acc][1]
    device_sim.fail_verify([bad])
    assert outcomes(run(rt, acc, registry, tunnels=[bad]))[bad] == "rolled_back"
    listed = {t.id: t for t in rt.cloudflare.list_tunnels(acc)}[bad]
    assert record(sims, acc, bad)["cf_generated_on"] == listed.last_generated_on
    daily = Policy("daily", every=86400.0)
    for request in ({"reconcile_only": True}, {"policy_for": lambda t: daily}):
        report = run(rt, acc, registry, **request)
        assert report.drifted == [] and bad not in outcomes(report), outcomes(report)
    both_ends(sims, acc, device_sim, strict=True)
