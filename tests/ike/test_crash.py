"""(c) A rotator SIGKILLed between deliver and apply, and between apply and verify: after a reconcile,
Vault, the edge (Cloudflare) and the site agree, and every tunnel is up and re-authenticates."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from rotator.rotation.engine import RunRequest
from tests import helpers
from tests.ike.conftest import attach_all, lab_sims

strongswan = pytest.importorskip("rotator.adapters.devices.strongswan", reason="the strongswan device has not landed")

pytestmark = pytest.mark.ike
CHILD = Path(__file__).with_name("crash_child.py")
HOLDER = "ike-crash-test"  # the reconcile below is the same rotator, restarted


@pytest.mark.parametrize("point", ["delivered", "applied"])
def test_c_sigkill_then_reconcile_leaves_all_three_agreeing(lab, tmp_path, point):
    if "device_for" not in {f.name for f in dataclasses.fields(RunRequest)}:
        pytest.skip("the engine's device steps have not landed")
    with lab_sims(3) as sims:
        if not hasattr(sims.cloudflare, "set_edge_hook"):
            pytest.skip("the Cloudflare simulator's edge hook has not landed")
        acc = next(iter(sims.tunnels_by_account))
        tids = attach_all(sims, lab, acc)
        lab.up(timeout=10)
        dev = strongswan.StrongSwanDevice("lab-site", lab.site.vici_socket, owners=["{tunnel_id}.site.lab"],
                                          timeout=5.0, concurrency=16)
        rt = helpers.runtime(sims, tmp_path=tmp_path, holder=HOLDER)
        try:  # a first rotation: every tunnel managed, its key in Vault
            assert rt.engine.run(RunRequest(acc, device_for=lambda tunnel: dev)).ok
        finally:
            rt.close()
        before = dict(sims.cloudflare.psks(acc))
        helpers.kill_at_crash_point([sys.executable, str(CHILD), acc, lab.site.vici_socket, point, HOLDER],
                                    sims.env(), point)
        helpers.remember_secrets(sims)
        for t in tids:  # in flight: the new key is pending in Vault, and the invariant holds for Cloudflare
            data = helpers.record(sims, acc, t)
            assert data["state"] == "pending" and data["pending_psk"]
            held = sims.cloudflare.psk_of(acc, t)
            assert held == (data["pending_psk"] if point == "applied" else before[t])
            assert lab.sa_states("edge").get(t) == "ESTABLISHED"  # nobody re-authenticated: still up
        helpers.assert_invariant(sims, acc)
        rt = helpers.runtime(sims, tmp_path=tmp_path, holder=HOLDER)
        try:
            report = rt.engine.run(RunRequest(acc, reconcile_only=True, device_for=lambda tunnel: dev))
        finally:
            rt.close()
        helpers.remember_secrets(sims)
        assert report.ok, (report.error, [(o.tunnel_id, o.result, o.reason) for o in report.outcomes])
        assert helpers.assert_invariant(sims, acc, strict=True) == len(tids)
        for t in tids:
            psk = helpers.record(sims, acc, t)["psk"]
            assert psk != before[t] and lab.key_loaded("edge", t) == psk
            assert lab.reauth(t).ok  # the site holds it too
        assert lab.sa_states("edge") == dict.fromkeys(tids, "ESTABLISHED")
