"""End to end through the engine with the ``strongswan`` device against real charons: the Cloudflare
simulator's apply loads the key into the lab's edge (its edge hook), the device delivers to and
verifies on the lab's site, and a traffic probe runs through every tunnel the whole time.

(a) 20 tunnels rotate; each re-authenticates on its new key; the probe's gaps and loss are measured.
(b) The site refuses one key and one tunnel's edge holds a wrong key: both roll back, and no tunnel's
    traffic stops for longer than the re-authentication attempt.
Every test ends with the invariant: Vault, the edge and the site agree (a fresh authentication works).
"""

from __future__ import annotations

import dataclasses
import json
import secrets

import pytest

from rotator.rotation.engine import RunRequest
from rotator.sim.ike import summary
from tests import helpers
from tests.ike.conftest import lab_sims, link

strongswan = pytest.importorskip("rotator.adapters.devices.strongswan", reason="the strongswan device has not landed")

pytestmark = pytest.mark.ike
MAX_GAP = 1.0  # seconds: the bound on any interruption of a tunnel's traffic


def requirements(sims) -> None:
    if "device_for" not in {f.name for f in dataclasses.fields(RunRequest)}:
        pytest.skip("the engine's device steps have not landed")
    if not hasattr(sims.cloudflare, "set_edge_hook"):
        pytest.skip("the Cloudflare simulator's edge hook has not landed")


def site_device(lab, socket_path: str | None = None, name: str = "lab-site"):
    return strongswan.StrongSwanDevice(name, socket_path or lab.site.vici_socket, owners=["{tunnel_id}.site.lab"],
                                       timeout=5.0, poll_interval=0.02)


def assert_ends_agree(sims, lab, acc: str, tids: list[str]) -> None:
    """The extended invariant, strictly: Cloudflare and the edge hold the record's psk, and a fresh
    authentication from the site succeeds, so the site holds it too."""
    assert helpers.assert_invariant(sims, acc, strict=True) == len(tids)
    for t in tids:
        psk = helpers.record(sims, acc, t)["psk"]
        assert lab.key_loaded("edge", t) == psk, f"{t}: the edge does not hold the record's psk"
        attempt = lab.reauth(t)
        assert attempt.ok, f"{t}: {attempt.detail}"


@pytest.fixture
def rig(lab, tmp_path):
    """20 lab tunnels behind the simulators, up, with the edge hook set and a runtime."""
    with lab_sims(20) as sims:
        requirements(sims)
        acc = next(iter(sims.tunnels_by_account))
        tids = link(sims, lab, acc)
        established = lab.up(timeout=20)
        sims.cloudflare.set_edge_hook(lab.edge_hook)
        rt = helpers.runtime(sims, tmp_path=tmp_path)
        try:
            yield sims, lab, rt, acc, tids, established
        finally:
            rt.close()
            helpers.remember_secrets(sims)


def test_a_twenty_tunnels_rotate_and_reauthenticate_with_traffic_flowing(rig):
    sims, lab, rt, acc, tids, established = rig
    dev = site_device(lab)
    before = {t: lab.ike_ids(t) for t in tids}
    with lab.probe_all(interval=0.02) as probe:
        helpers.wait_for(lambda: probe.answered_all(5), timeout=10, what="traffic before the rotation")
        report = rt.engine.run(RunRequest(acc, device_for=lambda tunnel: dev))
        helpers.wait_for(lambda: probe.answered_all(probe.answered_min() + 5), timeout=10,
                         what="traffic after the rotation")
    results = probe.stop()
    helpers.remember_secrets(sims)
    assert report.ok, [(o.tunnel_id, o.result, o.reason) for o in report.outcomes]
    assert report.counts()["rotated"] == 20
    for t in tids:  # every tunnel authenticated afresh (a new IKE SA) during the run
        assert lab.ike_ids(t) - before[t], f"{t}: no fresh IKE SA"
    total = summary(results)
    print(json.dumps({"e2e_a": {"tunnels": 20, "establish_max_s": round(max(established.values()), 4),
                                "rotation_s": round(report.finished_at - report.started_at, 3),
                                "steps_s": {k: round(v, 3) for k, v in report.step_seconds.items()},
                                "probe": total}}))
    assert total["longest_gap"] < MAX_GAP
    assert total["lost"] == 0
    assert_ends_agree(sims, lab, acc, tids)


def test_b_refused_delivery_and_wrong_edge_key_roll_back_without_interrupting_traffic(rig):
    sims, lab, rt, acc, tids, _ = rig
    dev = site_device(lab)
    assert rt.engine.run(RunRequest(acc, device_for=lambda tunnel: dev)).ok  # every tunnel managed, with a previous key
    refused, wrong = tids[0], tids[1]
    # the site refuses the refused tunnel's key: its device cannot be reached
    unreachable = site_device(lab, socket_path=lab.workdir + "/no-such.vici", name="lab-site-down")
    applied_once: set[str] = set()

    def edge_hook(account_id: str, tunnel_id: str, psk: str) -> None:
        if tunnel_id == wrong and tunnel_id not in applied_once:  # the first apply lands as another key
            applied_once.add(tunnel_id)
            psk = secrets.token_urlsafe(24)
            helpers.SECRETS.add(psk)
        lab.edge_hook(account_id, tunnel_id, psk)

    sims.cloudflare.set_edge_hook(edge_hook)
    keys_before = {t: helpers.record(sims, acc, t)["psk"] for t in tids}
    with lab.probe_all(interval=0.02) as probe:
        helpers.wait_for(lambda: probe.answered_all(5), timeout=10, what="traffic before the rotation")
        report = rt.engine.run(RunRequest(acc, device_for=lambda tunnel: unreachable if tunnel.id == refused else dev))
        helpers.wait_for(lambda: probe.answered_all(probe.answered_min() + 5), timeout=10,
                         what="traffic after the rotation")
    results = probe.stop()
    helpers.remember_secrets(sims)
    outcomes = {o.tunnel_id: o for o in report.outcomes}
    assert outcomes[refused].result not in ("rotated", "unknown"), outcomes[refused]
    assert outcomes[wrong].result == "rolled_back", outcomes[wrong]
    assert all(outcomes[t].result == "rotated" for t in tids[2:])
    for t in (refused, wrong):  # both back on the key they had
        assert helpers.record(sims, acc, t)["psk"] == keys_before[t]
    total = summary(results)
    print(json.dumps({"e2e_b": {"outcomes": {"refused": outcomes[refused].result, "wrong": outcomes[wrong].result},
                                "probe": total,
                                "probe_wrong_edge": dataclasses.asdict(
                                    next(r for r in results if r.name == lab.tunnel(wrong).name))}}, default=str))
    assert total["longest_gap"] < MAX_GAP
    assert_ends_agree(sims, lab, acc, tids)
