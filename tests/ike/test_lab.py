"""The lab itself: tunnels come up, traffic crosses them, a wrong key fails re-authentication, and
nothing is left behind on any exit path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rotator.sim.ike import lab as lab_mod
from rotator.sim.ike import netns, summary
from rotator.sim.ike.charon import alive
from rotator.sim.ike.lab import probe, sweep_stale, unavailable
from tests import helpers
from tests.ike.conftest import require_lab

pytestmark = pytest.mark.ike


def keys(n: int) -> dict[str, str]:
    import secrets

    out = {secrets.token_hex(16): secrets.token_urlsafe(24) for _ in range(n)}
    helpers.SECRETS.update(out.values())
    return out


def test_five_tunnels_come_up_and_carry_traffic(lab):
    psks = keys(5)
    lab.add_tunnels([(t, f"smoke-{i}") for i, t in enumerate(psks)], psks)
    established = lab.up(timeout=10)
    assert set(established) == set(psks)
    assert lab.sa_states("edge") == dict.fromkeys(psks, "ESTABLISHED")
    assert lab.sa_states("site") == dict.fromkeys(psks, "ESTABLISHED")
    with probe(lab, interval=0.02) as p:
        helpers.wait_for(lambda: p.answered_all(10), timeout=10, what="10 echoes per tunnel")
    results = p.stop()
    total = summary(results)
    assert total["tunnels"] == 5 and total["sent"] >= 50
    assert all(r.answered >= 10 for r in results)
    assert lab.tunnel_states() == {f"smoke-{i}": 1.0 for i in range(5)}
    print(json.dumps({"ike_establish_s": {"max": max(established.values()), "min": min(established.values())},
                      "probe": total}))


def test_reauth_succeeds_on_the_same_key_and_fails_on_a_wrong_one(lab):
    psks = keys(2)
    good, bad = list(psks)
    lab.add_tunnels([(good, "good"), (bad, "bad")], psks)
    lab.up(timeout=10)
    ok = lab.reauth(good)
    assert ok.ok, ok.detail
    lab.load_edge_psk(bad, keys(1).popitem()[1])  # the edge now holds a key the site does not
    failed = lab.reauth(bad)
    assert not failed.ok and "AUTHENTICATION_FAILED" in failed.detail
    # make-before-break: the old SA survives the failed attempt, traffic still crosses
    assert lab.sa_states("edge")[bad] == "ESTABLISHED"


def test_unavailable_names_the_missing_prerequisite(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in (unavailable() or "")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(lab_mod, "CHARON", "/nonexistent/charon")
    assert "apt-get install strongswan-charon" in (unavailable() or "")


def test_a_killed_owner_leaves_nothing_after_the_next_sweep(tmp_path):
    require_lab()
    code = ("import json, time; from rotator.sim.ike import Lab\n"
            "lab = Lab().start(); print(json.dumps({'ns': [lab.edge_ns, lab.site_ns], "
            "'pids': [lab.edge.pid, lab.site.pid]}), flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        state = json.loads(line)
        assert all(netns.exists(ns) for ns in state["ns"])
        proc.send_signal(signal.SIGKILL)  # no atexit, no context manager: only the sweep can clean up
        proc.wait(timeout=10)
        assert all(alive(pid) for pid in state["pids"])
        removed = sweep_stale()
        assert set(state["ns"]) <= set(removed)
        assert not any(netns.exists(ns) for ns in state["ns"])
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in state["pids"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not any(alive(pid) for pid in state["pids"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        sweep_stale()


def test_stop_removes_namespaces_and_daemons(lab_factory):
    lab = lab_factory()
    pids = [lab.edge.pid, lab.site.pid]
    names = [lab.edge_ns, lab.site_ns]
    lab.stop()
    assert not any(netns.exists(ns) for ns in names)
    assert not any(alive(pid) for pid in pids)
    assert not os.path.exists(lab.workdir)


def test_health_source_follows_the_edge_child_sa(lab_factory):
    lab = lab_factory(make_before_break=False)
    psks = keys(2)
    (a, b) = list(psks)
    lab.add_tunnels([(a, "h-a"), (b, "h-b")], psks)
    t0 = time.time()
    lab.up(timeout=10)
    assert lab.health_source("acc", "h-a", t0 - 60, t0) == [0.0]  # before it came up
    assert lab.health_source("acc", "h-a", time.time(), time.time() + 60) == [1.0]
    lab.load_edge_psk(b, keys(1).popitem()[1])
    t1 = time.time()
    assert not lab.reauth(b).ok  # break-before-make: the old SA is gone, the new one refused
    helpers.wait_for(lambda: lab.health_source("acc", "h-b", time.time(), time.time() + 1) == [0.0], timeout=5,
                     what="h-b down")
    assert lab.health_source("acc", "h-b", t1, time.time() + 1)[0] == 1.0
    assert lab.health_source("acc", "h-a", t1, time.time() + 1) == [1.0]
    assert lab.health_source("acc", "unknown", t0, time.time()) == []
