"""The secret scan (tests/secret_scan.py, run by tests/conftest.py at the end of every session).

The first test drives a rotation through every output path (text, JSON, status, dry run, a failing run,
config check) so the scan has material even when this file runs alone; the self-tests prove the session
check catches a planted leak and names the test; the exec hook test records what a real hook process got.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rotator.adapters.devices.exec import ExecDevice
from rotator.rotation.ports import DeviceStatus
from rotator.secret import Secret
from rotator.sim import Simulators
from tests import helpers, secret_scan
from tests.devices.conftest import ACCOUNT, make_tunnels
from tests.devices.test_exec import hook
from tests.helpers import assert_invariant

REPO = Path(__file__).resolve().parents[1]

PLANTED = textwrap.dedent("""
    import logging
    import sys

    from rotator.secret import Secret
    from rotator.sim.base import SimApp
    from rotator.sim.vault import VaultSim
    from tests import helpers


    def test_clean():
        sim = VaultSim()
        print("made a vault with", len(sim.tokens), "token")


    def test_prints_a_simulator_token():
        print("token:", VaultSim().root_token, file=sys.stderr)


    def test_logs_a_key():
        key = Secret("k3y-Planted-Secret-" + "Q" * 16)
        logging.getLogger("rotator").warning("staged %s", key.reveal())


    def test_subprocess_output_shows_a_handmade_key():
        helpers.SECRETS.add("handmade-" + "Z" * 30)
        helpers.OUTPUTS.append("child said handmade-" + "Z" * 30)


    def test_silent():
        VaultSim()  # makes secrets, prints nothing: no failure of its own


    class GatewaySim(SimApp):  # a simulator written after the scan: harvested through scan_secrets()
        def __init__(self):
            super().__init__()
            self.key = "gw-Planted-Key-" + "W" * 20

        def scan_secrets(self):
            return [self.key]


    def test_a_new_simulator_shows_its_key():
        print("gateway key", GatewaySim().key)


    class OpaqueSim(SimApp):  # neither scan_secrets() nor a harvester: the session cannot look for its keys
        pass


    def test_makes_a_simulator_the_scan_cannot_harvest():
        OpaqueSim()
""")

CRASH = textwrap.dedent("""
    import os


    def test_dies():
        os._exit(3)
""")

HOOKS = ("import tests.conftest as _shared\n"
         "globals().update({k: v for k, v in vars(_shared).items() if k.startswith('pytest_')})\n")


def run_planted(tmp_path: Path, *select: str, workers: int = 0, source: str = PLANTED, extra: tuple[str, ...] = ()) -> str:
    """Run the planted tests in a child pytest (``workers``: under ``-n``) with the suite's scan hooks;
    returns its output, ending with its exit status."""
    test_file = tmp_path / "test_planted.py"
    test_file.write_text(source)
    (tmp_path / "conftest.py").write_text(HOOKS)
    xdist = ["-n", str(workers)] if workers else ["-p", "no:xdist"]
    targets = [f"{test_file}::{name}" for name in select] or [str(test_file)]
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *xdist, "--rootdir", str(tmp_path),
            "-c", os.devnull, *extra, *targets]
    # A child session of several interpreters: CPU-bound, slow on a busy machine (bounded all the same).
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=280,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    return f"{proc.stdout}{proc.stderr}\nexit status {proc.returncode}"


def leaked_tests(out: str) -> set[str]:
    leaks = [line for line in out.splitlines() if line.startswith("FAILED secret in output")]
    return {line.split("test ", 1)[1].split(" ", 1)[0].rsplit("::", 1)[1] for line in leaks}


LEAKING = {"test_prints_a_simulator_token", "test_logs_a_key", "test_subprocess_output_shows_a_handmade_key",
           "test_a_new_simulator_shows_its_key"}


@pytest.mark.long
@pytest.mark.timeout(300)
def test_the_session_check_fails_a_run_whose_output_shows_a_secret_and_names_the_tests(tmp_path):
    out = run_planted(tmp_path)
    assert "7 passed" in out, out  # every test passed: the failure is the scan's
    assert out.endswith("exit status 1"), out
    assert leaked_tests(out) == LEAKING, out
    assert "secret scan cannot harvest OpaqueSim" in out and "scan_secrets()" in out, out
    assert "Q" * 28 not in out and "Z" * 30 not in out and "W" * 20 not in out  # fingerprints, never the key


@pytest.mark.long
@pytest.mark.timeout(300)
def test_under_xdist_a_leak_in_any_worker_fails_the_session(tmp_path):
    out = run_planted(tmp_path, workers=2)
    assert "7 passed" in out, out
    assert out.endswith("exit status 1"), out
    assert leaked_tests(out) == LEAKING, out
    summary = re.search(r"(\d+) secrets looked for in (\d+) characters of \d+ outputs from (\d+) tests on 2 workers",
                        out)
    assert summary is not None, out
    assert int(summary[1]) >= 4 and int(summary[3]) == 7, out  # every worker's secrets and tests were merged
    assert "Q" * 28 not in out and "Z" * 30 not in out and "W" * 20 not in out


@pytest.mark.long
@pytest.mark.timeout(300)
def test_under_xdist_a_silent_test_and_an_idle_worker_pass(tmp_path):
    """One test that makes secrets and prints nothing, two workers: one runs it, one runs nothing."""
    out = run_planted(tmp_path, "test_silent", workers=2)
    assert out.endswith("exit status 0"), out
    assert re.search(r"[1-9]\d* secrets looked for in 0 characters of 0 outputs from 1 tests on 2 workers", out), out


@pytest.mark.long
@pytest.mark.timeout(300)
def test_under_xdist_a_worker_that_never_reports_fails_the_session(tmp_path):
    out = run_planted(tmp_path, workers=1, source=CRASH, extra=("--max-worker-restart=0",))
    assert not out.endswith("exit status 0"), out
    assert re.search(r"FAILED secret scan: worker gw\d never reported what it captured", out), out


def test_a_clean_run_passes_and_says_what_it_scanned(tmp_path):
    out = run_planted(tmp_path, "test_clean")
    assert out.endswith("exit status 0"), out
    summary = re.search(r"(\d+) secrets looked for in (\d+) characters", out)
    assert summary is not None, out
    assert int(summary[1]) >= 1 and int(summary[2]) > 0, out
    assert "no secret in any captured output" in out


def test_an_exec_hook_never_gets_the_key_in_argv_or_environment(tmp_path, monkeypatch):
    """What a real hook process received goes to the scan; the keys it was sent are registered secrets."""
    seen = tmp_path / "seen.json"
    monkeypatch.setenv("VAULT_TOKEN", "hvs." + "T" * 24)
    helpers.SECRETS.add("hvs." + "T" * 24)
    path = hook(tmp_path, f"""
        doc = json.load(sys.stdin)
        json.dump({{"argv": sys.argv, "env": dict(os.environ)}}, open({str(seen)!r}, "w"))
        print(json.dumps({{"results": {{t["tunnel_id"]: {{"ok": True}} for t in doc["tunnels"]}}}}))
    """)
    tunnels = make_tunnels(2)
    results = ExecDevice("branch", [path, "--site", "branch"], pass_env=["HTTPS_PROXY"]).deliver(
        ACCOUNT, "run-1", tunnels, deadline=time.monotonic() + 30)
    assert all(r.status is DeviceStatus.OK for r in results.values())
    got = seen.read_text()
    helpers.OUTPUTS.append(got)
    assert '"--site"' in got and len(got) > 50
    keys = {k.reveal() for t in tunnels for k in (t.psk, t.previous_psk) if k is not None}
    assert keys <= secret_scan.STATE.secrets  # registered by the Secret hook, so the session check looks for them
    assert not any(k in got for k in keys)


@pytest.mark.long
@pytest.mark.timeout(300)
def test_no_secret_in_any_captured_output(tmp_path):
    with Simulators(accounts=1, tunnels=4) as sims:
        acc = next(iter(sims.tunnels_by_account))
        env = sims.env()
        for args in (["rotate", "--account", acc, "--all"], ["rotate", "--account", acc, "--all", "--output", "json"],
                     ["rotate", "--account", acc, "--all", "--dry-run"], ["status", "--account", acc],
                     ["status", "--account", acc, "--output", "json"], ["config", "check"]):
            assert helpers.run_cli(args, env).returncode == 0
        sims.cloudflare.refuse_tunnels([sims.tunnels_by_account[acc][0]], stage="apply")
        sims.cloudflare.fail_next("cf.psk_validate", status=503)
        assert helpers.run_cli(["rotate", "--account", acc, "--all"], env).returncode == 1
        helpers.run_cli(["rotate", "--account", acc, "--all"], {**env, "CLOUDFLARE_API_TOKEN": "z" * 40})
        sims.vault.seal()
        helpers.run_cli(["rotate", "--account", acc, "--all"], env)
        sims.vault.unseal()
        # Errors from Vault (or a proxy in front of it) that quote the request's token.
        sims.vault.echo_token_next("kv.read", status=403, count=50)
        helpers.run_cli(["status", "--account", acc, "--output", "json"], env)
        helpers.run_cli(["rotate", "--account", acc, "--all"], env)
        sims.vault.clear_faults()
        # Vault records really hold the keys the scan looks for.
        for t in sims.tunnels_by_account[acc]:
            data = sims.vault.read_data(f"cloudflare/magic-ipsec/{acc}/{t}")
            helpers.SECRETS.update(v for k, v in data.items() if k.endswith("psk"))
        helpers.remember_secrets(sims)
    # The scan itself runs at session end; here: it has what it needs to look at.
    assert len(helpers.OUTPUTS) >= 16


def test_a_vault_error_quoting_the_token_never_reaches_output():
    """Issue 20, item 3: a 403 or 500 whose message quotes the token printed it in `status --output json`
    and on stderr of `rotate`. The scan (session end) looks for the token in this output too."""
    with Simulators(accounts=1, tunnels=3) as sims:
        acc = next(iter(sims.tunnels_by_account))
        env = sims.env()
        assert helpers.run_cli(["rotate", "--account", acc, "--all"], env).returncode == 0
        shown = []
        for route, status in (("kv.read", 403), ("kv.read", 500), ("kv.write", 500)):
            sims.vault.echo_token_next(route, status=status, count=50)
            for args in (["status", "--account", acc, "--output", "json"], ["rotate", "--account", acc, "--all"]):
                proc = helpers.run_cli(args, env)
                if route == "kv.read" and args[0] == "rotate":
                    assert proc.returncode == 1, proc.stdout + proc.stderr
                shown.append(proc.stdout + proc.stderr)
            sims.vault.clear_faults()
        helpers.remember_secrets(sims)
        assert all(sims.vault_token not in text for text in shown)
        assert sum("**redacted**" in text for text in shown) >= 4, shown  # Vault's text is quoted, redacted
        assert_invariant(sims, acc)
        assert helpers.run_cli(["reconcile", "--account", acc], env).returncode == 0
        assert_invariant(sims, acc, strict=True)


def test_secret_type_never_shows_itself():
    s = Secret("supersecretvalue-1234567890")
    assert "supersecret" not in repr(s) and "supersecret" not in str(s) and "supersecret" not in f"{s}"
    assert "supersecret" not in json.dumps({"k": str(s)})
