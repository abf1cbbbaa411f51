"""The fault campaign in the normal suite: a short, seeded run that must find no violation.

ROTATOR_CAMPAIGN_SEED replays a schedule; ROTATOR_CAMPAIGN_SECONDS and ROTATOR_CAMPAIGN_FAULTS change
the budget and the fault classes (see tests/campaign/harness.py). ``make campaign`` is the long mode.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

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

pytestmark = pytest.mark.campaign


@pytest.mark.timeout(240)
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


def test_the_gate_contradicts_an_answer_after_the_simulator_applied_the_key():
    with GatedSimulators(accounts=1, tunnels=2) as sims:
        acc = next(iter(sims.tunnels_by_account))
        t1, t2 = sims.tunnels_by_account[acc]
        sims.cf_gate.arm("cf.psk_apply", "echo_other", seed=3)
        echoed = _set(sims, acc, {t1: "A" * 32, t2: "B" * 32})["successfully_applied_psks"]
        assert sims.cloudflare.psks(acc) == {t1: "A" * 32, t2: "B" * 32}
        assert sorted(e["psk"] == k for e, k in ((echoed[t1], "A" * 32), (echoed[t2], "B" * 32))) == [False, True]
        sims.cf_gate.arm("cf.psk_apply", "both_maps")
        result = _set(sims, acc, {t1: "C" * 32})
        assert t1 in result["successfully_applied_psks"] and t1 in result["unapplied_psks"]
        assert sims.cloudflare.psk_of(acc, t1) == "C" * 32
        assert _set(sims, acc, {t1: "D" * 32}, validate=True)["successfully_applied_psks"][t1]["psk"] == "D" * 32
        assert sims.cf_gate.inflight == 0 and sims.cf_gate.rewritten == 2


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
