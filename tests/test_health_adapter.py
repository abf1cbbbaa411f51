"""Tunnel health over the simulator's GraphQL endpoint, through the Health adapter."""

from __future__ import annotations

import time

import httpx
import pytest

from rotator.adapters.health import CloudflareHealth
from rotator.errors import CloudflareError
from rotator.rotation.ports import HealthState

A = "023e105f4ecef8ad9ca31a8372d0c353"


@pytest.fixture
def env(cf_sim):
    sim, base = cf_sim
    sim.add_account(A)
    tunnels = [sim.add_tunnel(A, name=f"site-{i}") for i in range(4)]
    token = sim.add_token()
    http = httpx.Client(timeout=5)
    yield sim, CloudflareHealth(http, base_url=base, api_token=token), tunnels, base
    http.close()


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def test_judged_on_what_happened_after_since(env):
    sim, health, tunnels, _ = env
    now = time.time()
    sim.set_health(A, tunnels[0], [(now - 600, 0), (now - 5, 1), (now - 1, 1)])   # down before, fine since
    sim.set_health(A, tunnels[1], [(now - 5, 1), (now - 1, 0)])                   # failed after the apply
    sim.set_health(A, tunnels[2], [(now - 5, 0), (now - 3, 0)])                   # down throughout
    states = health.tunnel_health(A, ["site-0", "site-1", "site-2", "site-3"], since=now - 10, deadline=soon())
    assert states == {"site-0": HealthState.HEALTHY, "site-1": HealthState.DEGRADED,
                      "site-2": HealthState.DOWN, "site-3": HealthState.NO_DATA}
    assert health.tunnel_health(A, [], since=now, deadline=soon()) == {}


def test_a_pluggable_source_feeds_it(env):
    sim, health, _, _ = env
    asked: list[tuple[str, str]] = []

    def source(account, name, since, until):
        asked.append((account, name))
        return [0.0] if name == "site-1" else [1.0]

    sim.health_source = source
    states = health.tunnel_health(A, ["site-0", "site-1"], since=time.time() - 60, deadline=soon())
    assert states == {"site-0": HealthState.HEALTHY, "site-1": HealthState.DOWN}
    assert sorted(asked) == [(A, "site-0"), (A, "site-1")]


def test_timeline_through_the_control_api(env):
    sim, health, tunnels, base = env
    now = time.time()
    with httpx.Client(base_url=base.removesuffix(sim.base_path)) as raw:
        resp = raw.post("/_sim/control", json={"op": "set_health", "account_id": A, "tunnel_id": tunnels[3],
                                               "samples": [[now - 2, 0.5]]})
        assert resp.status_code == 200
        assert raw.post("/_sim/control", json={"op": "set_health", "account_id": A, "tunnel_id": tunnels[3],
                                               "samples": [[now, 0.7]]}).status_code == 400
    assert health.tunnel_health(A, ["site-3"], since=now - 10, deadline=soon()) == {"site-3": HealthState.DEGRADED}


@pytest.mark.parametrize("variant", ["html", "not_json", "deep", "types"])
def test_garbage_is_a_cloudflare_error(env, variant):
    sim, health, _, _ = env
    sim.garbage_next("cf.graphql", variant=variant)
    with pytest.raises(CloudflareError) as exc:
        health.tunnel_health(A, ["site-0"], since=time.time() - 60, deadline=soon())
    assert "\n" not in str(exc.value)


def test_graphql_errors_and_foreign_accounts(env):
    sim, _, _, base = env
    other = sim.add_account()
    narrow = sim.add_token(accounts={other})
    with httpx.Client() as http:
        health = CloudflareHealth(http, base_url=base, api_token=narrow)
        with pytest.raises(CloudflareError, match="not authorized"):
            health.tunnel_health(A, ["site-0"], since=time.time() - 60, deadline=soon())


def test_a_trickling_answer_ends_at_the_deadline(env):
    sim, health, tunnels, _ = env
    sim.set_health(A, tunnels[0], [(time.time() - 1, 1)])
    sim.trickle_next("cf.graphql", interval=0.05, count=5)
    start = time.monotonic()
    with pytest.raises(CloudflareError):
        health.tunnel_health(A, ["site-0"], since=time.time() - 60, deadline=start + 1.0)
    assert time.monotonic() - start < 1.5


def test_retries_a_server_error_within_the_deadline(env):
    sim, health, tunnels, _ = env
    sim.set_health(A, tunnels[0], [(time.time() - 1, 1)])
    sim.fail_next("cf.graphql", status=502, html=True)
    assert health.tunnel_health(A, ["site-0"], since=time.time() - 60, deadline=soon()) == \
        {"site-0": HealthState.HEALTHY}
    assert sim.request_counts()["cf.graphql"] == 2


def test_error_texts_never_quote_the_credential(cf_sim):
    sim, base = cf_sim
    sim.add_account(A)
    token = "H" * 40
    sim.add_token(token)
    sim.fail_next("cf.graphql", status=400, message=f"token {token} lacks Analytics Read")
    with httpx.Client() as http, pytest.raises(CloudflareError) as exc:
        CloudflareHealth(http, base_url=base, api_token=token).tunnel_health(
            A, ["x"], since=time.time() - 60, deadline=soon())
    assert token not in str(exc.value) and token not in repr(exc.value) and "lacks Analytics Read" in str(exc.value)
