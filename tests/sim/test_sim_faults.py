"""The simulators' shared fault API: seeded chaos and bad control input, through real clients."""

from __future__ import annotations

import httpx
import pytest

from rotator.adapters.cloudflare import CloudflareClient, RetryPolicy
from rotator.sim.cloudflare import CloudflareSim

A = "023e105f4ecef8ad9ca31a8372d0c353"
FAULTS = [{"kind": "status", "status": 503}, {"kind": "garbage", "variant": "html"}]


def test_chaos_is_seeded_and_mixed(cf_sim):
    sim, base = cf_sim
    sim.add_account(A)
    token = sim.add_token()
    sim.chaos("cf.list", 0.4, FAULTS, seed=7)
    seen: list[str] = []
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as http:
        for _ in range(60):
            r = http.get(f"/accounts/{A}/magic/ipsec_tunnels")
            seen.append(f"{r.status_code}:{r.headers.get('content-type', '')[:9]}")
    again = CloudflareSim()
    again.add_account(A)
    again.chaos("cf.list", 0.4, FAULTS, seed=7)
    replay = [again.faults.take("cf.list") for _ in range(60)]
    expected = ["503:applicati" if f and f.kind == "status" else "200:text/html" if f else "200:applicati"
                for f in replay]
    assert seen == expected
    assert {"503:applicati", "200:text/html", "200:applicati"} <= set(seen)


def test_chaos_through_the_real_client_and_the_control_api(cf_sim):
    sim, base = cf_sim
    sim.add_account(A)
    token = sim.add_token()
    with httpx.Client(base_url=base.removesuffix(sim.base_path)) as raw:
        ok = raw.post("/_sim/control", json={"op": "chaos", "route": "cf.list", "probability": 0.5,
                                             "faults": [{"kind": "status", "status": 502}], "seed": 3})
        assert ok.status_code == 200
        bad = raw.post("/_sim/control", json={"op": "chaos", "route": "cf.list", "probability": 2,
                                              "faults": [{"kind": "status"}]})
        assert bad.status_code == 400
        bad = raw.post("/_sim/control", json={"op": "chaos", "route": "cf.list", "probability": 0.5,
                                              "faults": [{"kind": "garbage", "variant": "nonsense"}]})
        assert bad.status_code == 400
    with httpx.Client(timeout=5) as http:
        client = CloudflareClient(http, base_url=base, api_token=token,
                                  retry=RetryPolicy(attempts=30, wait_initial=0.01, wait_max=0.02, wait_jitter=0))
        for _ in range(5):
            assert client.list_tunnels(A) == []
    assert sim.request_counts()["cf.list"] > 5  # some calls met a 502 and were retried
    sim.clear_faults()
    assert sim.faults.chaos == {}


@pytest.mark.parametrize("op", [{"op": "trickle_next", "route": "cf.list", "interval": 0.1},
                                {"op": "garbage_next", "route": "cf.list", "variant": "types"}])
def test_fault_verbs_over_http(cf_sim, op):
    sim, base = cf_sim
    with httpx.Client(base_url=base.removesuffix(sim.base_path)) as raw:
        assert raw.post("/_sim/control", json=op).status_code == 200
    assert len(sim.faults.faults) == 1


def test_simulators_pass_the_edge_hook_and_health_source_on():
    from rotator.sim import Simulators

    seen: list[str] = []
    sims = Simulators(accounts=1, tunnels=1, edge_hook=lambda a, t, p: seen.append(t),
                      health_source=lambda a, n, s, u: [1.0])
    acc, tunnel = next(iter(sims.tunnels_by_account.items()))
    sims.cloudflare.change_psk_out_of_band(acc, tunnel[0])
    assert seen == tunnel and sims.cloudflare.health_source is not None


def test_a_listing_that_names_a_tunnel_twice_over_the_control_api(cf_sim):
    """The fault behind issue 20 item 1: the same id a second time, under another name, until cleared."""
    sim, base = cf_sim
    sim.add_account(A)
    token = sim.add_token()
    tid = sim.add_tunnel(A, name="site-a")
    with httpx.Client(base_url=base.removesuffix(sim.base_path)) as raw:
        assert raw.post("/_sim/control", json={"op": "list_twice", "account_id": A, "tunnel_id": tid,
                                               "name": "site-a-dup"}).status_code == 200
    with httpx.Client(timeout=5) as http:
        client = CloudflareClient(http, base_url=base, api_token=token)
        assert [(t.id, t.name) for t in client.list_tunnels(A)] == [(tid, "site-a"), (tid, "site-a-dup")]
        sim.clear_listed_twice()
        assert [(t.id, t.name) for t in client.list_tunnels(A)] == [(tid, "site-a")]
