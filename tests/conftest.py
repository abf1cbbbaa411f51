"""Shared fixtures: simulators over real loopback HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rotator.sim import Simulators
from rotator.sim.base import ServerThread
from rotator.sim.cloudflare import CloudflareSim
from rotator.sim.vault import VaultSim


@pytest.fixture
def vault_sim() -> Iterator[tuple[VaultSim, str]]:
    sim = VaultSim()
    server = ServerThread(sim).start()
    try:
        yield sim, server.url
    finally:
        server.stop()


@pytest.fixture
def cf_sim() -> Iterator[tuple[CloudflareSim, str]]:
    sim = CloudflareSim()
    server = ServerThread(sim).start()
    try:
        yield sim, server.url + sim.base_path
    finally:
        server.stop()


@pytest.fixture
def sims() -> Iterator[Simulators]:
    from tests import helpers

    with Simulators(accounts=1, tunnels=6) as s:
        yield s
        helpers.remember_secrets(s)


@pytest.fixture(autouse=True)
def _collect_output(capsys):
    """Feed everything a test printed to the end-of-suite secret scan."""
    from tests import helpers

    yield
    out, err = capsys.readouterr()
    helpers.OUTPUTS.extend([out, err])
