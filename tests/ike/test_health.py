"""Cloudflare's tunnel health (GraphQL) fed by the lab's real edge: the Health adapter sees a tunnel
whose fresh authentication failed go down, and the others stay healthy."""

from __future__ import annotations

import math
import secrets
import time

import httpx
import pytest

from rotator.rotation.ports import HealthState
from tests import helpers
from tests.ike.conftest import lab_sims, link

health = pytest.importorskip("rotator.adapters.health", reason="the Health adapter has not landed")

pytestmark = pytest.mark.ike


def test_health_follows_the_edge_sa_state(lab_factory):
    lab = lab_factory(make_before_break=False)
    with lab_sims(2) as sims, httpx.Client() as http:
        if not hasattr(sims.cloudflare, "health_source"):
            pytest.skip("the simulator's health source has not landed")
        acc = next(iter(sims.tunnels_by_account))
        ok_tunnel, broken = link(sims, lab, acc)
        lab.up(timeout=10)
        sims.cloudflare.health_source = lab.health_source
        checker = health.CloudflareHealth(http, base_url=sims.cloudflare_base_url,
                                          api_token=sims.cloudflare_api_token)
        names = [lab.tunnel(t).name for t in (ok_tunnel, broken)]
        up_at = time.time()
        # the adapter asks in whole seconds: start the window after the second the tunnels came up in
        helpers.wait_for(lambda: time.time() >= math.floor(up_at) + 1, timeout=2, what="the next second")
        since = time.time()
        assert checker.tunnel_health(acc, names, since=since, deadline=time.monotonic() + 5) == \
            dict.fromkeys(names, HealthState.HEALTHY)
        wrong = secrets.token_urlsafe(24)
        helpers.SECRETS.add(wrong)
        lab.load_edge_psk(broken, wrong)  # a one-sided change, then the re-authentication that fails
        assert not lab.reauth(broken).ok
        helpers.wait_for(lambda: lab.health_source(acc, names[1], time.time(), time.time() + 1) == [0.0],
                         timeout=5, what="the edge to lose the SA")
        seen = checker.tunnel_health(acc, names, since=since, deadline=time.monotonic() + 5)
        assert seen[names[0]] is HealthState.HEALTHY
        assert seen[names[1]] in (HealthState.DEGRADED, HealthState.DOWN)  # it failed after `since`
        helpers.remember_secrets(sims)
