"""The session-wide secret scan: every secret the suite made, looked for in every output it captured.

Secrets come from registration points installed for the whole run (tests/conftest.py calls ``install``):
every ``Secret`` the rotator constructs in this process, and, harvested after each test, every key and
token the simulators (Vault, Cloudflare, device) and the fakes hold or were sent, plus whatever tests add
to ``helpers.SECRETS`` (keys made in subprocesses or by hand).

Material comes from every test's captured stdout/stderr/log sections, whatever a test read back through
capsys/capfd, ``helpers.OUTPUTS`` (subprocess output, HTTP bodies), the exec device's hook argv and
environment, engine run reports (outcome reasons), admin API JSON responses (/v1/status, /v1/rotations)
and the simulated Vault's record fields other than keys (last_error and the other reason texts).

Adding a simulator or fake: every simulator (a ``rotator.sim.base.SimApp``) and every object passed to
``track`` is harvested after each test. An object with a ``scan_secrets()`` method returning an iterable of
strings is harvested by calling it, so a new simulator or fake needs no entry in ``HARVESTERS``: give it
``scan_secrets()`` (and, for a fake that is no ``SimApp``, call ``tests.secret_scan.track(self)`` in its
``__init__``). A simulator with neither fails the session: its keys would not be looked for.

Under pytest-xdist (``-n``) each worker collects and harvests on its own; at its session end it writes what
it collected (secrets, material, counts) to a file in a directory the controller made, and says so in its
``workeroutput``. The controller merges every worker's file, runs the one search over all of it (a secret
made on one worker is also looked for in every other worker's output), and fails the session on any leak
or on a worker that did not report.

The search is a sampled q-gram index, linear in the text: every secret of at least ``MIN_LEN`` characters
is indexed by its ``Q``-grams at offsets 0..STRIDE-1; any occurrence of such a secret covers a text
position that is a multiple of STRIDE at one of those offsets, so sampling the text every STRIDE
characters finds every occurrence; candidates are confirmed with a plain substring test.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tests import helpers

MIN_DISTINCT = 8  # distinct characters a value needs to count as a secret
MIN_LEN = 16  # shorter values (test ids, "x"*8) are not secrets worth scanning for and collide
Q = 8
STRIDE = MIN_LEN - Q + 1


@dataclass
class Chunk:
    test: str  # the test id that produced it ("<session>" outside any test)
    label: str
    text: str


@dataclass
class State:
    chunks: list[Chunk] = field(default_factory=list)
    secrets: set[str] = field(default_factory=set)  # registered by Secret() and the harvest
    fresh: list[Any] = field(default_factory=list)  # made during the running test: held until harvested
    objects: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet)  # harvested, still alive
    current: str = "<session>"
    outputs_seen: int = 0
    harvest_seconds: float = 0.0
    tests: int = 0
    tracked: int = 0
    unique: set[int] = field(default_factory=set)  # hashes of harvested texts already kept
    unharvested: set[str] = field(default_factory=set)  # tracked types with no harvester nor scan_secrets()


STATE = State()


def add_text(label: str, text: Any, unique: bool = False) -> None:
    """Material for the scan, attributed to the running test (``unique``: kept once, for state that is
    harvested again after every test while its simulator lives)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not text:
        return
    if unique:
        key = hash((label, text))
        if key in STATE.unique:
            return
        STATE.unique.add(key)
    STATE.chunks.append(Chunk(STATE.current, label, str(text)))



def add_secret(value: Any) -> None:
    # Placeholders such as "a" * 40 are no secrets: they would match inside any run of that letter (an
    # account id "aaaa…" printed by a test of bad ids). Every generated key or token has far more variety.
    if isinstance(value, str) and len(value) >= MIN_LEN and len(set(value)) >= MIN_DISTINCT:
        STATE.secrets.add(value)


def track(obj: Any) -> None:
    """A simulator or fake whose keys are harvested after the test that made it (and again after later
    tests and at session end while it lives)."""
    STATE.fresh.append(obj)
    STATE.tracked += 1


# -- harvesting: what each kind of simulator/fake generated or was sent -----------------------------


def _vault(sim: Any) -> None:
    with sim.lock:
        for tok in list(sim.tokens):
            add_secret(tok)
        for role in getattr(sim, "approle", {}).values():
            for sid in role.get("secret_ids", ()):
                add_secret(sid)
        for jwt in getattr(sim, "k8s_jwts", {}):
            add_secret(jwt)
        for ns, mounts in sim.namespaces.items():
            for mount in mounts.values():
                for path, key in mount.keys.items():
                    for number, data in key.data.items():
                        if not isinstance(data, dict):
                            continue
                        rest = {}
                        for name, value in data.items():
                            if "psk" in name or "secret" in name or "token" in name:
                                add_secret(value)
                            else:
                                rest[name] = value
                        add_text(f"vault record {ns}/{mount.path}/{path} v{number}", json.dumps(rest), unique=True)


def _cloudflare(sim: Any) -> None:
    with sim.lock:
        for tok in list(sim.tokens):
            add_secret(tok)
        for _email, key in list(sim.legacy):
            add_secret(key)
        for tunnels in sim.accounts.values():
            for t in tunnels.values():
                add_secret(t.psk)
        for h in sim.history:
            add_secret(h.psk)


def _device_sim(sim: Any) -> None:
    with sim.lock:
        add_secret(sim.secret)
        for key in list(sim.keys.values()):
            add_secret(key)


def _fake(fake: Any) -> None:
    for attr in ("keys", "initial"):
        for value in list(getattr(fake, attr, {}).values()):
            add_secret(value)
    for _tunnel, key in list(getattr(fake, "applied", ())):
        add_secret(key)
    for versions in list(getattr(fake, "versions", {}).values()):
        for rec in list(versions):
            for name in ("psk", "pending_psk", "previous_psk"):
                value = getattr(rec, name, None)
                add_secret(value.reveal() if hasattr(value, "reveal") else value)
            add_text("fake vault record", getattr(rec, "last_error", None) or "", unique=True)


HARVESTERS: dict[str, Callable[[Any], None]] = {
    "VaultSim": _vault, "CloudflareSim": _cloudflare, "DeviceSim": _device_sim,
    "FakeVault": _fake, "FakeCloudflare": _fake, "FakeDevice": _fake,
}


def _harvest_one(obj: Any) -> None:
    harvester = next((HARVESTERS[c.__name__] for c in type(obj).__mro__ if c.__name__ in HARVESTERS), None)
    scan_secrets = getattr(obj, "scan_secrets", None)
    if callable(scan_secrets):
        for value in scan_secrets():
            add_secret(value)
    elif harvester is None:
        STATE.unharvested.add(type(obj).__qualname__)
    if harvester is not None:
        harvester(obj)


def harvest() -> None:
    started = time.perf_counter()
    for obj in [*STATE.fresh, *STATE.objects]:
        _harvest_one(obj)
    STATE.objects.update(STATE.fresh)
    STATE.fresh.clear()
    fresh = helpers.OUTPUTS[STATE.outputs_seen:]
    STATE.outputs_seen = len(helpers.OUTPUTS)
    for text in fresh:
        add_text("helpers.OUTPUTS", text)
    STATE.harvest_seconds += time.perf_counter() - started


def end_test(nodeid: str, sections: Iterable[tuple[str, str]]) -> None:
    for title, content in sections:
        add_text(title, content)
    harvest()
    STATE.tests += 1
    STATE.current = "<session>"


# -- the search ---------------------------------------------------------------------------------------


@dataclass
class Result:
    secrets: int
    chunks: int
    bytes: int
    seconds: float
    leaks: list[tuple[str, str, str]]  # (test id, where, fingerprint of the secret)


def fingerprint(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:12]


def scan(secrets: Iterable[str], chunks: Iterable[Chunk]) -> Result:
    started = time.perf_counter()
    index: dict[str, list[str]] = {}
    wanted = {s for s in secrets if isinstance(s, str) and len(s) >= MIN_LEN}
    for s in wanted:
        for off in range(STRIDE):
            index.setdefault(s[off:off + Q], []).append(s)
    leaks: set[tuple[str, str, str]] = set()
    count = size = 0
    for chunk in chunks:
        text = chunk.text
        count += 1
        size += len(text)
        found: set[str] = set()
        for i in range(0, len(text) - Q + 1, STRIDE):
            hits = index.get(text[i:i + Q])
            if hits:
                found.update(s for s in hits if s not in found and s in text)
        leaks.update((chunk.test, chunk.label, fingerprint(s)) for s in found)
    return Result(len(wanted), count, size, time.perf_counter() - started, sorted(leaks))


def collect() -> None:
    """The last harvest of this process: everything it generated and captured is in STATE."""
    harvest()
    for value in helpers.SECRETS:
        add_secret(value)


def final() -> Result:
    collect()
    return scan(STATE.secrets, STATE.chunks)


# -- under pytest-xdist: each worker's material, merged by the controller -----------------------------


@dataclass
class Report:
    """What one process (a worker, or the whole run without xdist) collected."""

    worker: str
    secrets: list[str]
    chunks: list[Chunk]
    tests: int
    tracked: int
    harvest_seconds: float
    unharvested: list[str]
    ran: list[str]  # node ids of the tests it ran


def local_report(worker: str, ran: Iterable[str]) -> Report:
    return Report(worker, sorted(STATE.secrets), list(STATE.chunks), STATE.tests, STATE.tracked,
                  STATE.harvest_seconds, sorted(STATE.unharvested), sorted(ran))


def write_report(report: Report, directory: str) -> str:
    """Written with mode 0600 into the controller's private directory (it holds the run's test keys)."""
    path = os.path.join(directory, f"{report.worker}.json")
    doc = {**report.__dict__, "chunks": [[c.test, c.label, c.text] for c in report.chunks]}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(doc, fh)
    return path


def read_report(path: str) -> Report:
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    doc["chunks"] = [Chunk(*c) for c in doc["chunks"]]
    return Report(**doc)


def scan_reports(reports: Iterable[Report]) -> Result:
    """One search over every report: each secret is looked for in every process's material."""
    reports = list(reports)
    secrets = {s for r in reports for s in r.secrets}
    return scan(secrets, (c for r in reports for c in r.chunks))


# -- registration points, installed for the whole run -------------------------------------------------


@contextlib.contextmanager
def patched(owner: Any, name: str, make: Callable[[Any], Any]) -> Iterator[None]:
    original = owner.__dict__[name]
    setattr(owner, name, make(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def _init_tracker(original: Any) -> Any:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        track(self)
    return __init__


def _secret_init(original: Any) -> Any:
    def __init__(self: Any, value: str) -> None:
        original(self, value)
        add_secret(value)
    return __init__


def _readouterr(original: Any) -> Any:
    def readouterr(self: Any) -> Any:
        result = original(self)
        add_text("read by capsys/capfd", result.out)
        add_text("read by capsys/capfd", result.err)
        return result
    return readouterr


def _exec_call(original: Any) -> Any:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        add_text(f"exec device {self.name!r} hook argv and environment",
                 json.dumps({"argv": list(self.command), "env": dict(self.env)}))
        return original(self, *args, **kwargs)
    return call


def _engine_run(original: Any) -> Any:
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        report = original(self, *args, **kwargs)
        add_text("engine run report (outcome reasons)", json.dumps(report.as_dict(), default=str))
        return report
    return run


def _recording_json_response(original: Any) -> Any:
    class RecordingJSONResponse(original):  # type: ignore[misc, valid-type]
        def render(self, content: Any) -> bytes:
            body: bytes = super().render(content)
            add_text("admin API JSON response", body)
            return body
    return RecordingJSONResponse


@contextlib.contextmanager
def install() -> Iterator[None]:
    from _pytest.capture import CaptureFixture

    from rotator.adapters.devices import exec as exec_device
    from rotator.rotation import engine
    from rotator.secret import Secret
    from rotator.service import admin
    from rotator.sim.base import SimApp
    from tests import fakes

    with contextlib.ExitStack() as stack:
        # Every simulator is a SimApp: its __init__ tracks them all, those written later included.
        for cls in (SimApp, fakes.FakeVault, fakes.FakeCloudflare, fakes.FakeDevice):
            stack.enter_context(patched(cls, "__init__", _init_tracker))
        stack.enter_context(patched(Secret, "__init__", _secret_init))
        stack.enter_context(patched(CaptureFixture, "readouterr", _readouterr))
        stack.enter_context(patched(exec_device.ExecDevice, "call", _exec_call))
        stack.enter_context(patched(engine.Engine, "run", _engine_run))
        stack.enter_context(patched(admin, "JSONResponse", _recording_json_response))
        yield
