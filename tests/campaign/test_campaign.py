"""The fault campaign in the normal suite: a short, seeded run that must find no violation.

ROTATOR_CAMPAIGN_SEED replays a schedule; ROTATOR_CAMPAIGN_SECONDS and ROTATOR_CAMPAIGN_FAULTS change
the budget and the fault classes (see tests/campaign/harness.py). ``make campaign`` is the long mode.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.campaign.gate import Gate
from tests.campaign.harness import (
    CLASSES,
    DEFAULT_FAULTS,
    Campaign,
    GatedSimulators,
    find_secrets,
    from_env,
    parse_faults,
)
from tests.campaign.monitor import PREFIX, Monitor
from tests.helpers import wait_for

pytestmark = pytest.mark.campaign


@pytest.mark.timeout(240)
@pytest.mark.long
def test_campaign_keeps_the_invariant(capsys):
    args = from_env(default_seconds=50.0)
    print(f"campaign seed {args['seed']} (ROTATOR_CAMPAIGN_SEED={args['seed']} replays it)")
    result = Campaign(**args, stop_at_first=True).run()
    with capsys.disabled():
        print("\n" + result.summary())
    # It did real work: rounds, rotators that reached Cloudflare, faults, continuous checks.
    assert result.rounds >= 1 and result.processes >= 4 and result.applies >= 1, result.report()
    assert result.faults_armed + result.kills >= 1 and result.figures.snapshots >= 50, result.report()
    assert result.ok, result.report()


def test_fault_classes_parse():
    assert parse_faults(None) == DEFAULT_FAULTS
    assert parse_faults("all") == tuple(CLASSES)
    assert set(CLASSES) - set(DEFAULT_FAULTS) <= {"takeover"}
    assert parse_faults("all,-drift,-oddids") == tuple(c for c in CLASSES if c not in ("drift", "oddids"))
    assert "drift" not in parse_faults("all,-drift")
    assert parse_faults("kill,drift") == ("kill", "drift")
    with pytest.raises(ValueError, match="unknown fault class 'nope'"):
        parse_faults("kill,nope")


def _set(sims, account, keys, validate=False):
    r = httpx.post(f"{sims.cloudflare_base_url}/accounts/{account}/magic/ipsec_tunnels/psk",
                   params={"validate_only": "true"} if validate else None,
                   json={"psks": [{"id": t, "psk": k} for t, k in keys.items()]},
                   headers={"Authorization": f"Bearer {sims.cloudflare_api_token}"})
    r.raise_for_status()
    return r.json()["result"]


def _record(sims, account, tunnel, **data):
    r = httpx.post(f"{sims.vault_addr}/v1/secret/data/{PREFIX}/{account}/{tunnel}", json={"data": data},
                   headers={"X-Vault-Token": sims.vault.root_token})
    r.raise_for_status()


def test_the_monitor_sees_a_key_vault_does_not_have_and_tells_drift_apart():
    with GatedSimulators(accounts=1, tunnels=3) as sims:
        acc = next(iter(sims.tunnels_by_account))
        t1, t2, t3 = sims.tunnels_by_account[acc]
        for t in (t1, t2, t3):
            _record(sims, acc, t, psk="K" * 32 + t[:4], state="active")
        _set(sims, acc, {t: "K" * 32 + t[:4] for t in (t1, t2, t3)})
        monitor = Monitor(sims, time.time(), lambda: 1)
        assert monitor.check() == [] and monitor.check(strict=True) == []
        _record(sims, acc, t1, psk="K" * 32 + t1[:4], pending_psk="P" * 32, state="pending")
        _set(sims, acc, {t1: "P" * 32})
        assert monitor.check() == []  # pending_psk is readable from Vault: fine while in flight
        assert [v.tunnel for v in monitor.check(strict=True)] == [t1]
        _set(sims, acc, {t2: "Z" * 32})  # a key Vault never had
        httpx.post(f"{sims.cloudflare_base_url}/accounts/{acc}/magic/ipsec_tunnels/{t3}/psk_generate",
                   headers={"Authorization": f"Bearer {sims.cloudflare_api_token}"}).raise_for_status()
        found = monitor.check()
        assert [v.tunnel for v in found] == [t2]  # t3 drifted (set outside the rotator): not a violation yet
        assert "never in Vault" in found[0].detail and "Z" * 32 not in found[0].detail
        assert {v.tunnel for v in monitor.check(strict=True)} == {t1, t2, t3}
        monitor.observe(found)
        monitor.observe(found)
        assert monitor.figures.violations == 1  # one episode, however long it lasts


def test_the_gate_answers_a_login_page_after_the_simulator_applied_the_key():
    with GatedSimulators(accounts=1, tunnels=2) as sims:
        acc = next(iter(sims.tunnels_by_account))
        t1, t2 = sims.tunnels_by_account[acc]
        sims.cf_gate.arm("cf.psk_apply", "html")
        r = httpx.post(f"{sims.cloudflare_base_url}/accounts/{acc}/magic/ipsec_tunnels/psk",
                       json={"psks": [{"id": t1, "psk": "A" * 32}]},
                       headers={"Authorization": f"Bearer {sims.cloudflare_api_token}"})
        assert r.status_code == 200 and r.headers["content-type"] == "text/html" and b"<form" in r.content
        assert sims.cloudflare.psk_of(acc, t1) == "A" * 32  # it took effect all the same
        sims.cf_gate.arm("cf.psk_validate", "html")
        assert _set(sims, acc, {t2: "B" * 32})["successfully_applied_psks"][t2]["psk"] == "B" * 32  # other route
        assert sims.cf_gate.rewritten == 1
        wait_for(lambda: sims.cf_gate.inflight == 0, timeout=5, what="the requests to leave the gate")


class _Device:
    """The shape the monitor needs from a far-end device: a lock and the key held per tunnel."""

    def __init__(self):
        self.lock = threading.RLock()
        self.keys = {}

    def held(self, account, tunnel):
        return self.keys.get((account, tunnel))


def test_the_monitor_checks_the_far_end_device_too():
    device = _Device()
    with GatedSimulators(accounts=1, tunnels=2) as sims:
        acc = next(iter(sims.tunnels_by_account))
        t1, t2 = sims.tunnels_by_account[acc]
        for t in (t1, t2):
            _record(sims, acc, t, psk="K" * 32, pending_psk="N" * 32, state="pending")
        _set(sims, acc, {t1: "K" * 32, t2: "K" * 32})
        monitor = Monitor(sims, time.time(), lambda: 1, ends=[("device sim-device", device)])
        assert monitor.check() == []  # a device that holds no key yet has nothing to check
        device.keys[(acc, t1)] = "N" * 32  # delivered, not yet applied at Cloudflare: fine
        device.keys[(acc, t2)] = "O" * 32  # a key Vault does not have
        found = monitor.check()
        assert [v.tunnel for v in found] == [t2] and found[0].detail.startswith("device sim-device holds a key")


def test_the_output_scan_finds_a_key_inside_any_run_of_characters():
    key, token = "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6", "hvs.CAESIabcdefghijklmnopqrstuv"
    texts = ["nothing here", f'{{"detail": "psk={key}"}}', f"prefix{token}suffix and more"]
    assert find_secrets(texts, {key, token, "Z" * 32, "short"}) == {key, token}
    assert find_secrets(["A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p"], {key}) == set()


def test_the_gate_serves_the_simulated_device_and_counts_its_requests():
    device_mod = pytest.importorskip("rotator.sim.device")
    from rotator.adapters.devices.webhook import WebhookDevice
    from rotator.httpserver import ServerThread
    from rotator.rotation.ports import DeviceStatus, DeviceTunnel
    from rotator.secret import Secret

    device = device_mod.DeviceSim(name="sim-device")
    gate = Gate(device)
    server = ServerThread(gate).start()
    try:
        client = WebhookDevice("sim-device", server.url + device_mod.PATH, Secret(device.secret), timeout=5)
        acc, tid = "a" * 32, "b" * 32
        tunnel = DeviceTunnel(tid, "tun1", Secret("K" * 32), None)
        result = client.deliver(acc, "r1", [tunnel], deadline=time.monotonic() + 5)
        assert result[tid].status == DeviceStatus.OK and device.held(acc, tid) == "K" * 32
        wait_for(lambda: gate.inflight == 0, timeout=5, what="the request to leave the gate")  # after its answer
    finally:
        server.stop()
