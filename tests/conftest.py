"""Shared fixtures: simulators over real loopback HTTP; the session-wide secret scan (tests/secret_scan.py).

The scan runs at the end of every session, whole suite or a single file: it fails the run, naming the
tests, if any secret the run generated appears in any output the run captured, and prints what it had to
look at in the terminal summary. Another session gets it from a conftest.py that imports these hooks.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any

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


# -- order under xdist ---------------------------------------------------------------------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long tests (marked ``long``, and the IKE lab's) first: under ``-n`` xdist hands out tests in
    this order, so no worker starts a minute-long test while the others have run out of work. A stable
    sort: every other test keeps its place."""
    items.sort(key=lambda item: not (item.get_closest_marker("long") or item.get_closest_marker("ike")))


# -- the secret scan -----------------------------------------------------------------------------------
# Without xdist this process collects and scans. Under ``-n`` (pytest-xdist) each worker collects and
# writes its report to a private directory the controller made (secret_scan.write_report); the
# controller merges every worker's report, scans once and fails the session on any leak or on a worker
# that never reported (tests/secret_scan.py, docstring).

_SCAN: dict[str, object] = {}
# Drives every output path: a run that includes it must have material.
DRIVER = "tests/test_secret_scan.py::test_no_secret_in_any_captured_output"
DIR_KEY = "secret_scan_dir"


def _is_controller(config: pytest.Config) -> bool:
    """The xdist controller (``-n`` N > 0): it runs no test; its workers collect."""
    return not _is_worker(config) and getattr(config.option, "dist", "no") != "no"


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    stack = contextlib.ExitStack()
    config.add_cleanup(stack.close)
    _SCAN.clear()
    _SCAN.update(ran=set(), started={}, reported={}, controller=_is_controller(config))
    if _SCAN["controller"]:
        _SCAN["dir"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="secret-scan-"))
        return
    stack.enter_context(secret_scan.install())


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist, on the controller: tell each worker where to write its report."""
    node.workerinput[DIR_KEY] = _SCAN["dir"]
    _SCAN["started"][node.gateway.id] = node  # type: ignore[index]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """xdist, on the controller: a worker ended; what it said about its report."""
    output = getattr(node, "workeroutput", None) or {}
    if DIR_KEY in output:
        _SCAN["reported"][node.gateway.id] = output[DIR_KEY]  # type: ignore[index]


def pytest_runtest_logstart(nodeid: str) -> None:
    secret_scan.STATE.current = nodeid


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # On the controller these are the workers' reports again: the workers have collected them already.
    if report.when == "teardown" and not _SCAN.get("controller"):  # its sections hold setup, call and teardown
        secret_scan.end_test(report.nodeid, report.sections)
        _SCAN["ran"].add(report.nodeid)  # type: ignore[attr-defined]


def _material_problems(reports: list[secret_scan.Report]) -> list[str]:
    problems = []
    for r in reports:
        for name in r.unharvested:
            problems.append(f"secret scan cannot harvest {name} ({r.worker}): give it a scan_secrets() method"
                            " returning its keys and tokens (tests/secret_scan.py, docstring)")
        if DRIVER in r.ran:  # the process that ran the driver must have seen its material
            own = secret_scan.scan(r.secrets, r.chunks)
            if own.secrets < 10 or own.bytes < 1000:
                problems.append(f"secret scan had too little material ({own.secrets} secrets, {own.bytes} bytes"
                                f" on {r.worker}): the capture hooks are not collecting; check tests/conftest.py")
    return problems


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    problems: list[str] = []
    if _is_worker(config):
        worker = config.workerinput["workerid"]  # type: ignore[attr-defined]
        secret_scan.collect()
        report = secret_scan.local_report(worker, _SCAN["ran"])  # type: ignore[arg-type]
        secret_scan.write_report(report, config.workerinput[DIR_KEY])  # type: ignore[attr-defined]
        config.workeroutput[DIR_KEY] = config.workerinput[DIR_KEY]  # type: ignore[attr-defined]
        return
    if _is_controller(config):
        reports = []
        for worker in sorted(_SCAN["started"]):  # type: ignore[call-overload]
            path = os.path.join(str(_SCAN["dir"]), f"{worker}.json")
            if worker not in _SCAN["reported"] or not os.path.exists(path):  # type: ignore[operator]
                problems.append(f"secret scan: worker {worker} never reported what it captured (it crashed or was"
                                " cut off), so its output was not scanned; rerun, or run without -n to see why")
                continue
            reports.append(secret_scan.read_report(path))
    else:
        secret_scan.collect()
        reports = [secret_scan.local_report("this process", _SCAN["ran"])]  # type: ignore[arg-type]
    result = secret_scan.scan_reports(reports)
    problems += [f"secret in output: test {test} ({where}) shows a secret ({fp})" for test, where, fp in result.leaks]
    problems += _material_problems(reports)
    _SCAN.update(result=result, problems=problems, reports=reports)
    if problems and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    result = _SCAN.get("result")
    if not isinstance(result, secret_scan.Result):
        return
    problems = _SCAN.get("problems") or []
    reports: list[secret_scan.Report] = _SCAN.get("reports") or []  # type: ignore[assignment]
    tr = terminalreporter
    tr.section("secret scan", red=bool(problems), green=not problems)
    workers = f" on {len(reports)} workers" if _SCAN.get("controller") else ""
    tr.line(f"{result.secrets} secrets looked for in {result.bytes} characters of {result.chunks} outputs from "
            f"{sum(r.tests for r in reports)} tests{workers} (harvest "
            f"{sum(r.harvest_seconds for r in reports):.2f} s, search {result.seconds:.2f} s)")
    for line in problems:  # type: ignore[attr-defined]
        tr.line("FAILED " + line, red=True)
    if not problems:
        tr.line("no secret in any captured output" if result.secrets else
                "no secret was generated in this run: nothing to look for")
