"""Fixtures of the IKE lab: real charons in network namespaces (rotator/sim/ike).

Without root or strongSwan the tests skip with the reason, except in CI (CI=true), where a missing
prerequisite fails. Every lab is torn down when its test ends, passed or failed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from rotator.sim import Simulators
from rotator.sim.ike import Lab, attach, unavailable
from tests import helpers


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ike: needs the real IKE lab (root, strongSwan); part of make test and CI")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``-n --dist loadgroup`` every test that starts a lab (this folder, and the others marked
    ``ike``) runs on one worker, one after another: the labs' charons and namespaces never compete."""
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here + os.sep) or item.get_closest_marker("ike"):
            item.add_marker(pytest.mark.xdist_group("ike"))


def require_lab() -> None:
    reason = unavailable()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the IKE lab: {reason}")
        pytest.skip(reason)


@pytest.fixture
def lab_factory() -> Iterator[Callable[..., Lab]]:
    """Start labs (``lab_factory(make_before_break=False)``); all are stopped after the test."""
    require_lab()
    labs: list[Lab] = []

    def make(**kw: object) -> Lab:
        lab = Lab(**kw)  # type: ignore[arg-type]
        labs.append(lab)
        return lab.start()

    try:
        yield make
    finally:
        for lab in labs:
            lab.stop()


@pytest.fixture
def lab(lab_factory: Callable[..., Lab]) -> Lab:
    return lab_factory()


def lab_sims(tunnels: int) -> Simulators:
    """Simulators (not started) with one account of ``tunnels`` tunnels named ``lab-<i>``."""
    sims = Simulators(accounts=1, tunnels=0)
    acc = next(iter(sims.tunnels_by_account))
    sims.tunnels_by_account[acc] = [sims.cloudflare.add_tunnel(acc, name=f"lab-{i}") for i in range(tunnels)]
    return sims


def link(sims: Simulators, lab: Lab, account: str) -> list[str]:
    """Every tunnel of ``account`` (made by ``lab_sims``) into the lab, each side holding the key
    Cloudflare holds now. Returns the tunnel ids in order."""
    tids = list(sims.tunnels_by_account[account])
    keys = {t: sims.cloudflare.psk_of(account, t) or "" for t in tids}
    helpers.SECRETS.update(k for k in keys.values() if k)
    lab.add_tunnels([(t, f"lab-{i}") for i, t in enumerate(tids)], keys)
    return tids


def attach_all(sims: Simulators, lab: Lab, account: str) -> list[str]:
    """``link``, and the simulator's edge made real (edge hook, health from the edge's SAs)."""
    tids = list(sims.tunnels_by_account[account])
    helpers.SECRETS.update(k for k in sims.cloudflare.psks(account).values() if k)
    attach(lab, sims.cloudflare, account, [(t, f"lab-{i}") for i, t in enumerate(tids)])
    return tids
