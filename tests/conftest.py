"""Shared fixtures: simulators over real loopback HTTP; the session-wide secret scan (tests/secret_scan.py).

The scan runs at the end of every session, whole suite or a single file: it fails the run, naming the
tests, if any secret the run generated appears in any output the run captured, and prints what it had to
look at in the terminal summary. Another session gets it from a conftest.py that imports these hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from rotator.sim import Simulators
from rotator.sim.base import ServerThread
from rotator.sim.cloudflare import CloudflareSim
from rotator.sim.vault import VaultSim
from tests import secret_scan


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


# -- the secret scan -----------------------------------------------------------------------------------

_SCAN: dict[str, object] = {}
# Drives every output path: a run that includes it must have material.
DRIVER = "tests/test_secret_scan.py::test_no_secret_in_any_captured_output"


def pytest_configure(config: pytest.Config) -> None:
    stack = contextlib.ExitStack()
    stack.enter_context(secret_scan.install())
    config.add_cleanup(stack.close)


def pytest_runtest_logstart(nodeid: str) -> None:
    secret_scan.STATE.current = nodeid


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "teardown":  # its sections hold setup, call and teardown output
        secret_scan.end_test(report.nodeid, report.sections)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    result = secret_scan.final()
    ran_driver = any(item.nodeid == DRIVER for item in session.items)
    problems = [f"secret in output: test {test} ({where}) shows a secret ({fp})" for test, where, fp in result.leaks]
    made_any = bool(secret_scan.STATE.secrets or secret_scan.STATE.tracked)
    if (ran_driver and (result.secrets < 10 or result.bytes < 1000)) or (made_any and not result.bytes):
        problems.append(f"secret scan had too little material ({result.secrets} secrets, {result.bytes} bytes):"
                        " the capture hooks are not collecting; check tests/conftest.py")
    _SCAN.update(result=result, problems=problems)
    if problems and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    result = _SCAN.get("result")
    if not isinstance(result, secret_scan.Result):
        return
    problems = _SCAN.get("problems") or []
    tr = terminalreporter
    tr.section("secret scan", red=bool(problems), green=not problems)
    tr.line(f"{result.secrets} secrets looked for in {result.bytes} characters of {result.chunks} outputs from "
            f"{secret_scan.STATE.tests} tests (harvest {secret_scan.STATE.harvest_seconds:.2f} s, "
            f"search {result.seconds:.2f} s)")
    for line in problems:  # type: ignore[attr-defined]
        tr.line("FAILED " + line, red=True)
    if not problems:
        tr.line("no secret in any captured output" if result.secrets else
                "no secret was generated in this run: nothing to look for")
