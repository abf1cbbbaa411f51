"""End to end through the engine with the ``strongswan`` device against real charons: the Cloudflare
simulator's apply loads the key into the lab's edge (its edge hook), the device delivers to and
verifies on the lab's site, and a traffic probe runs through every tunnel the whole time.

(a) 20 tunnels rotate; each re-authenticates on its new key; the probe's gaps and loss are measured.
(b) The site refuses one key (the one refusal the lab fakes) and one tunnel's edge holds a wrong key: both roll back, and no tunnel's
    traffic stops for longer than the re-authentication attempt.
Every test ends with the invariant: Vault, the edge and the site agree (a fresh authentication works).
"""

from __future__ import annotations

import dataclasses
import json
import secrets

import pytest

from rotator.adapters.devices._common import DeviceWrapper
from rotator.rotation.engine import RunRequest
from rotator.rotation.ports import DeviceResult, DeviceStatus
from rotator.sim.ike import summary
from tests import helpers
from tests.ike.conftest import attach_all, lab_sims

strongswan = pytest.importorskip("rotator.adapters.devices.strongswan", reason="the strongswan device has not landed")

pytestmark = pytest.mark.ike
# charon's vici socket has a listen backlog of about 10; the device retries a connect refused with
# EAGAIN until its deadline, so its default concurrency works against a real charon
VICI_CONCURRENCY = 16  # the strongswan device's default
MAX_GAP = 1.0  # seconds: the bound on any interruption of a tunnel's traffic
MOMENT = 0.25  # seconds around a tunnel's own IKE events that count as its re-authentication moment


def losses_outside_reauth(lab, mark: int, results) -> dict[str, int]:
    """Per tunnel, packets lost outside its re-authentication moment: farther than MOMENT from
    every IKE event the site reported for that tunnel since ``mark``."""
    moments: dict[str, list[float]] = {}
    for e in lab.events_since(mark):
        if e.side == "site":
            moments.setdefault(e.name, []).append(e.at)
    return {r.name: n for r in results
            if (n := sum(not any(abs(at - m) <= MOMENT for m in moments.get(r.name, [])) for at in r.lost_at))}


def requirements(sims) -> None:
    if "device_for" not in {f.name for f in dataclasses.fields(RunRequest)}:
        pytest.skip("the engine's device steps have not landed")
    if not hasattr(sims.cloudflare, "set_edge_hook"):
        pytest.skip("the Cloudflare simulator's edge hook has not landed")


def site_device(lab, socket_path: str | None = None, name: str = "lab-site", timeout: float = 5.0):
    return strongswan.StrongSwanDevice(name, socket_path or lab.site.vici_socket, owners=["{tunnel_id}.site.lab"],
                                       timeout=timeout, concurrency=VICI_CONCURRENCY)


def assert_ends_agree(sims, lab, acc: str, tids: list[str]) -> None:
    """The extended invariant, strictly: Cloudflare and the edge hold the record's psk, and a fresh
    authentication from the site succeeds, so the site holds it too."""
    assert helpers.assert_invariant(sims, acc, strict=True) == len(tids)
    for t in tids:
        psk = helpers.record(sims, acc, t)["psk"]
        assert lab.key_loaded("edge", t) == psk, f"{t}: the edge does not hold the record's psk"
        attempt = lab.reauth(t)
        assert attempt.ok, f"{t}: {attempt.detail}"


class RefusingSite(DeviceWrapper):
    """The real site, except that it refuses one tunnel's new key (as a router rejecting a config
    would); everything else, rollback and verification included, goes to the real charon."""

    def __init__(self, device, refused: str) -> None:
        super().__init__(device)
        self.refused = refused

    def deliver(self, account_id, rotation_id, tunnels, *, deadline):
        out = {t.tunnel_id: DeviceResult(DeviceStatus.FAILED, "the site refused the key")
               for t in tunnels if t.tunnel_id == self.refused}
        rest = [t for t in tunnels if t.tunnel_id != self.refused]
        return {**out, **(self.device.deliver(account_id, rotation_id, rest, deadline=deadline) if rest else {})}


@pytest.fixture
def rig(lab, tmp_path):
    """20 lab tunnels behind the simulators, up, with the edge hook set and a runtime."""
    with lab_sims(20) as sims:
        requirements(sims)
        acc = next(iter(sims.tunnels_by_account))
        tids = attach_all(sims, lab, acc)
        established = lab.up(timeout=20)
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
    mark = lab.event_mark()
    with lab.probe_all(interval=0.02) as probe:
        helpers.wait_for(lambda: probe.answered_all(5), timeout=10, what="traffic before the rotation")
        report = rt.engine.run(RunRequest(acc, device_for=lambda tunnel: dev))
        floor = probe.answered_min() + 5
        helpers.wait_for(lambda: probe.answered_all(floor), timeout=10, what="traffic after the rotation")
    results = probe.stop()
    helpers.remember_secrets(sims)
    assert report.ok, (report.error, [(o.tunnel_id, o.result, o.reason) for o in report.outcomes
                                      if o.result != "rotated"])
    assert report.counts()["rotated"] == 20
    for t in tids:  # every tunnel authenticated afresh (a new IKE SA) during the run
        assert lab.ike_ids(t) - before[t], f"{t}: no fresh IKE SA"
    total = summary(results)
    print(json.dumps({"e2e_a": {"tunnels": 20, "establish_max_s": round(max(established.values()), 4),
                                "rotation_s": round(report.finished_at - report.started_at, 3),
                                "steps_s": {k: round(v, 3) for k, v in report.step_seconds.items()},
                                "probe": total}}))
    assert total["longest_gap"] < MAX_GAP
    assert losses_outside_reauth(lab, mark, results) == {}
    assert_ends_agree(sims, lab, acc, tids)


def test_b_refused_delivery_and_wrong_edge_key_roll_back_without_interrupting_traffic(rig):
    sims, lab, rt, acc, tids, _ = rig
    # the device sees a refused re-authentication only when its time is up: keep that short
    dev = site_device(lab, timeout=2.0)
    assert rt.engine.run(RunRequest(acc, device_for=lambda tunnel: dev)).ok  # every tunnel managed, with a previous key
    refused, wrong = tids[0], tids[1]
    site = RefusingSite(dev, refused)
    applied_once: set[str] = set()

    def edge_hook(account_id: str, tunnel_id: str, psk: str) -> None:
        if tunnel_id == wrong and tunnel_id not in applied_once:  # the first apply lands as another key
            applied_once.add(tunnel_id)
            psk = secrets.token_urlsafe(24)
            helpers.SECRETS.add(psk)
        lab.edge_hook(account_id, tunnel_id, psk)

    sims.cloudflare.set_edge_hook(edge_hook)
    keys_before = {t: helpers.record(sims, acc, t)["psk"] for t in tids}
    mark = lab.event_mark()
    with lab.probe_all(interval=0.02) as probe:
        helpers.wait_for(lambda: probe.answered_all(5), timeout=10, what="traffic before the rotation")
        report = rt.engine.run(RunRequest(acc, device_for=lambda tunnel: site))
        floor = probe.answered_min() + 5
        helpers.wait_for(lambda: probe.answered_all(floor), timeout=10, what="traffic after the rotation")
    results = probe.stop()
    helpers.remember_secrets(sims)
    outcomes = {o.tunnel_id: o for o in report.outcomes}
    assert outcomes[refused].result not in ("rotated", "unknown"), outcomes[refused]
    assert outcomes[wrong].result == "rolled_back", outcomes[wrong]
    assert all(outcomes[t].result == "rotated" for t in tids[2:])
    for t in (refused, wrong):  # both back on the key they had
        assert helpers.record(sims, acc, t)["psk"] == keys_before[t]
    total = summary(results)
    print(json.dumps({"e2e_b": {"outcomes": {"refused": [outcomes[refused].result, outcomes[refused].reason],
                                             "wrong": [outcomes[wrong].result, outcomes[wrong].reason]},
                                "rotation_s": round(report.finished_at - report.started_at, 3),
                                "steps_s": {k: round(v, 3) for k, v in report.step_seconds.items()},
                                "probe": total,
                                "wrong_edge_tunnel": {k: v for k, v in dataclasses.asdict(
                                    next(r for r in results if r.name == lab.tunnel(wrong).name)).items()
                                    if k in ("sent", "answered", "longest_gap")}}}))
    assert total["longest_gap"] < MAX_GAP
    assert losses_outside_reauth(lab, mark, results) == {}
    by_name = {r.name: r for r in results}
    assert by_name[lab.tunnel(refused).name].lost == 0  # never re-authenticated: nothing to lose
    assert_ends_agree(sims, lab, acc, tids)
