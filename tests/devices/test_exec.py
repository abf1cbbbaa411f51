"""The exec device against real hook processes: the stdin contract, exit statuses, deadlines, bad hooks."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time

import pytest
import structlog

from rotator.adapters.devices.exec import ExecDevice
from rotator.rotation.ports import DeviceStatus
from tests.devices.conftest import ACCOUNT, assert_no_key, make_tunnels


def hook(tmp_path, body: str, name: str = "hook") -> str:
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\nimport json, os, sys, time\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def deadline(seconds: float = 30.0) -> float:
    return time.monotonic() + seconds


def all_text(results) -> str:
    return "\n".join(r.reason or "" for r in results.values())


def test_the_hook_gets_the_contract_json_on_stdin_and_nothing_secret_elsewhere(tmp_path, monkeypatch):
    seen = tmp_path / "seen.json"
    monkeypatch.setenv("VAULT_TOKEN", "hvs.should-never-reach-a-hook")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    path = hook(tmp_path, f"""
        doc = json.load(sys.stdin)
        json.dump({{"stdin": doc, "argv": sys.argv, "env": dict(os.environ)}}, open({str(seen)!r}, "w"))
    """)
    tunnels = make_tunnels(2)
    device = ExecDevice("branch", [path, "--site", "branch"], pass_env=["HTTPS_PROXY"])
    results = device.deliver(ACCOUNT, "run-1", tunnels, deadline=deadline())
    assert {tid: r.status for tid, r in results.items()} == {t.tunnel_id: DeviceStatus.OK for t in tunnels}
    got = json.loads(seen.read_text())
    assert got["stdin"] == {
        "version": 1, "action": "deliver", "device": "branch", "account_id": ACCOUNT, "rotation_id": "run-1",
        "tunnels": [{"tunnel_id": t.tunnel_id, "tunnel_name": t.tunnel_name, "psk": t.psk.reveal(),
                     "previous_psk": t.previous_psk.reveal(), "customer_endpoint": t.customer_endpoint,
                     "cloudflare_endpoint": t.cloudflare_endpoint} for t in tunnels]}
    assert got["argv"][1:] == ["--site", "branch"]
    assert "VAULT_TOKEN" not in got["env"]
    assert got["env"]["HTTPS_PROXY"] == "http://proxy.invalid:3128"
    assert set(got["env"]) <= {"PATH", "LANG", "HTTPS_PROXY", "LC_CTYPE", "PWD"}
    assert_no_key(json.dumps([got["argv"], got["env"]]), tunnels)


@pytest.mark.parametrize("action", ["verify", "rollback"])
def test_each_action_is_named_on_stdin(tmp_path, action):
    path = hook(tmp_path, """
        doc = json.load(sys.stdin)
        print(json.dumps({"results": {t["tunnel_id"]: {"ok": doc["action"] == sys.argv[1]} for t in doc["tunnels"]}}))
    """)
    tunnels = make_tunnels(2, previous=False)
    results = getattr(ExecDevice("d", [path, action]), action)(ACCOUNT, "r", tunnels, deadline=deadline())
    assert all(r.status is DeviceStatus.OK for r in results.values())


def test_results_override_the_exit_status_per_tunnel_and_missing_ones_take_it(tmp_path):
    path = hook(tmp_path, """
        doc = json.load(sys.stdin)
        t = doc["tunnels"]
        print(json.dumps({"results": {t[0]["tunnel_id"]: {"ok": False, "reason": "peer refused the key"},
                                      t[1]["tunnel_id"]: {"ok": True}}}))
        print("could not reach " + t[2]["tunnel_name"], file=sys.stderr)
        sys.exit(3)
    """)
    tunnels = make_tunnels(3)
    results = ExecDevice("d", [path]).deliver(ACCOUNT, "r", tunnels, deadline=deadline())
    a, b, c = (results[t.tunnel_id] for t in tunnels)
    assert (a.status, a.reason) == (DeviceStatus.FAILED, "peer refused the key")
    assert b.status is DeviceStatus.OK
    assert (c.status, c.reason) == (DeviceStatus.FAILED, "exit status 3: could not reach site-2")


def test_a_hook_that_prints_a_key_is_redacted_everywhere(tmp_path):
    path = hook(tmp_path, """
        doc = json.load(sys.stdin)
        t = doc["tunnels"]
        print(json.dumps({"results": {t[0]["tunnel_id"]: {"ok": False, "reason": "bad key " + t[0]["psk"]}}}))
        print("old was " + t[1]["previous_psk"] + " new is " + t[1]["psk"], file=sys.stderr)
        sys.exit(1)
    """)
    tunnels = make_tunnels(2)
    results = ExecDevice("d", [path]).deliver(ACCOUNT, "r", tunnels, deadline=deadline())
    assert results[tunnels[0].tunnel_id].reason == "bad key **redacted**"
    assert results[tunnels[1].tunnel_id].reason == "exit status 1: old was **redacted** new is **redacted**"
    assert_no_key(all_text(results), tunnels)


def test_garbage_on_stdout_leaves_every_tunnel_unknown_without_showing_it(tmp_path):
    path = hook(tmp_path, """
        doc = json.load(sys.stdin)
        print("Traceback (most recent call last): psk=" + doc["tunnels"][0]["psk"])
    """)
    tunnels = make_tunnels(2)
    with structlog.testing.capture_logs() as logs:
        results = ExecDevice("d", [path]).deliver(ACCOUNT, "r", tunnels, deadline=deadline())
    assert {r.status for r in results.values()} == {DeviceStatus.UNKNOWN}
    assert "unreadable answer on stdout (the answer is not JSON), exit status 0" in all_text(results)
    assert [e["event"] for e in logs] == ["device_hook_garbage"]
    assert_no_key(all_text(results) + repr(logs), tunnels)


@pytest.mark.parametrize("stdout, expect", [
    ('["ok"]', "the answer is a JSON list, not an object"),
    ('{"results": [1, 2]}', "'results' is not an object"),
    ("[" * 100_000 + "]" * 100_000, "the answer is not JSON"),  # nested deeper than the parser recurses
])
def test_wrong_json_shapes_are_garbage(tmp_path, stdout, expect):
    path = hook(tmp_path, f"sys.stdin.read(); print({stdout!r})")
    tunnels = make_tunnels(1)
    results = ExecDevice("d", [path]).verify(ACCOUNT, "r", tunnels, deadline=deadline())
    (r,) = results.values()
    assert r.status is DeviceStatus.UNKNOWN and expect in r.reason


def test_an_unreadable_entry_is_unknown_for_that_tunnel_only(tmp_path):
    path = hook(tmp_path, """
        t = json.load(sys.stdin)["tunnels"]
        print(json.dumps({"results": {t[0]["tunnel_id"]: {"ok": "yes"}}}))
    """)
    tunnels = make_tunnels(2)
    results = ExecDevice("d", [path]).deliver(ACCOUNT, "r", tunnels, deadline=deadline())
    assert results[tunnels[0].tunnel_id].status is DeviceStatus.UNKNOWN
    assert results[tunnels[1].tunnel_id].status is DeviceStatus.OK


def test_results_for_tunnels_not_asked_about_are_ignored_and_said(tmp_path):
    path = hook(tmp_path, """
        t = json.load(sys.stdin)["tunnels"]
        print(json.dumps({"results": {"f" * 32: {"ok": True}, "e" * 32: {"ok": False},
                                      t[0]["tunnel_id"]: {"ok": False, "reason": "no"}}}))
        sys.exit(0)
    """)
    tunnels = make_tunnels(2)
    with structlog.testing.capture_logs() as logs:
        results = ExecDevice("d", [path]).deliver(ACCOUNT, "r", tunnels, deadline=deadline())
    assert set(results) == {t.tunnel_id for t in tunnels}
    a, b = (results[t.tunnel_id] for t in tunnels)
    assert a.status is DeviceStatus.FAILED and a.reason.startswith("no; ignored results for 2 tunnel(s)")
    assert b.status is DeviceStatus.OK and "ignored results for 2 tunnel(s) not in the request" in b.reason
    assert logs[0]["event"] == "device_hook_strangers" and logs[0]["ignored"] == 2


def test_a_hanging_hook_is_killed_with_its_whole_process_group_and_the_outcome_is_unknown(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    path = hook(tmp_path, f"""
        import subprocess
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        open({str(pidfile)!r}, "w").write(str(child.pid))
        sys.stdin.read()
        time.sleep(300)
    """)
    tunnels = make_tunnels(2)
    started = time.monotonic()
    results = ExecDevice("d", [path], timeout=1.5).deliver(ACCOUNT, "r", tunnels, deadline=deadline())
    assert time.monotonic() - started < 1.5 + 10  # returned: the deadline was enforced (generous bound)
    assert {r.status for r in results.values()} == {DeviceStatus.UNKNOWN}
    assert "did not finish within 2s and was killed" in all_text(results)
    grandchild = int(pidfile.read_text())
    end = time.monotonic() + 10
    while time.monotonic() < end and _alive(grandchild):
        time.sleep(0.05)
    assert not _alive(grandchild), "the hook's child survived the kill"


def test_the_callers_deadline_wins_over_a_longer_timeout(tmp_path):
    path = hook(tmp_path, "sys.stdin.read(); time.sleep(300)")
    tunnels = make_tunnels(1)
    results = ExecDevice("d", [path], timeout=600).verify(ACCOUNT, "r", tunnels, deadline=deadline(1.0))
    assert next(iter(results.values())).status is DeviceStatus.UNKNOWN


def test_a_deadline_already_past_starts_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = hook(tmp_path, f"open({str(marker)!r}, 'w').write('x')")
    results = ExecDevice("d", [path]).deliver(ACCOUNT, "r", make_tunnels(1), deadline=time.monotonic() - 1)
    assert next(iter(results.values())).status is DeviceStatus.FAILED
    assert not marker.exists()


def test_a_hook_killed_by_a_signal_leaves_the_outcome_unknown(tmp_path):
    path = hook(tmp_path, "import signal; sys.stdin.read(); os.kill(os.getpid(), signal.SIGKILL)")
    results = ExecDevice("d", [path]).deliver(ACCOUNT, "r", make_tunnels(1), deadline=deadline())
    (r,) = results.values()
    assert r.status is DeviceStatus.UNKNOWN and "killed by signal 9" in r.reason


def test_a_hook_that_ignores_stdin_and_exits_is_judged_by_its_status(tmp_path):
    path = hook(tmp_path, "sys.exit(0)")
    results = ExecDevice("d", [path]).deliver(ACCOUNT, "r", make_tunnels(200), deadline=deadline())
    assert {r.status for r in results.values()} == {DeviceStatus.OK}


def test_a_hook_that_cannot_start_fails_without_a_traceback(tmp_path):
    results = ExecDevice("d", [str(tmp_path / "missing")]).deliver(ACCOUNT, "r", make_tunnels(1),
                                                                   deadline=deadline())
    (r,) = results.values()
    assert r.status is DeviceStatus.FAILED and r.reason.startswith("cannot run ")


def test_no_tunnels_no_process(tmp_path):
    marker = tmp_path / "ran"
    path = hook(tmp_path, f"open({str(marker)!r}, 'w').write('x')")
    assert ExecDevice("d", [path]).deliver(ACCOUNT, "r", [], deadline=deadline()) == {}
    assert not marker.exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0): look at its state
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_hook_that_floods_its_output_is_unknown_and_memory_stays_bounded(tmp_path):
    path = hook(tmp_path, """
        sys.stdin.read()
        chunk = "x" * 65536
        for _ in range(80):  # 5 MiB on each stream
            sys.stdout.write(chunk)
            sys.stderr.write(chunk)
        sys.stderr.write("\\nlast words\\n")
    """)
    tunnels = make_tunnels(1)
    (r,) = ExecDevice("d", [path]).deliver(ACCOUNT, "r", tunnels, deadline=deadline()).values()
    assert r.status is DeviceStatus.UNKNOWN and "more than 1048576 bytes on stdout, exit status 0" in r.reason


def test_stderr_keeps_its_last_line_after_a_long_log(tmp_path):
    path = hook(tmp_path, """
        sys.stdin.read()
        for i in range(100000):
            print("progress line", i, file=sys.stderr)
        print("giving up: router said no", file=sys.stderr)
        sys.exit(4)
    """)
    (r,) = ExecDevice("d", [path]).deliver(ACCOUNT, "r", make_tunnels(1), deadline=deadline()).values()
    assert (r.status, r.reason) == (DeviceStatus.FAILED, "exit status 4: giving up: router said no")


def test_a_large_batch_crosses_both_pipes_without_deadlock(tmp_path):
    path = hook(tmp_path, """
        doc = json.load(sys.stdin)
        print(json.dumps({"results": {t["tunnel_id"]: {"ok": True} for t in doc["tunnels"]},
                          "log": "x" * 300000}))
        print("y" * 300000, file=sys.stderr)
    """)
    tunnels = make_tunnels(1000)
    results = ExecDevice("d", [path]).deliver(ACCOUNT, "r", tunnels, deadline=deadline())
    assert len(results) == 1000 and all(r.ok for r in results.values())


def test_a_hooks_stderr_is_logged_redacted_when_it_exits_0_too(tmp_path):
    """Regression (issue 20 item 11): a hook that refused a tunnel in its results but exited 0 said why
    only on stderr, and that was dropped. It is logged, redacted against the batch's keys."""
    path = hook(tmp_path, """
        t = json.load(sys.stdin)["tunnels"]
        print("router " + t[0]["tunnel_name"] + " rejected key " + t[0]["psk"], file=sys.stderr)
        print("second line", file=sys.stderr)
        print(json.dumps({"results": {t[0]["tunnel_id"]: {"ok": False, "reason": "router said no"}}}))
    """)
    tunnels = make_tunnels(2)
    with structlog.testing.capture_logs() as logs:
        results = ExecDevice("d", [path]).deliver(ACCOUNT, "r", tunnels, deadline=deadline())
    assert results[tunnels[0].tunnel_id].status is DeviceStatus.FAILED
    assert results[tunnels[1].tunnel_id].status is DeviceStatus.OK
    [entry] = [e for e in logs if e["event"] == "device_hook_stderr"]
    assert entry["log_level"] == "warning" and entry["exit_status"] == 0 and entry["failed"] == 1
    assert entry["stderr"] == "router site-0 rejected key **redacted** | second line"
    assert_no_key(repr(logs), tunnels)
    quiet = hook(tmp_path, "sys.stdin.read(); print('all fine', file=sys.stderr)", name="quiet")
    with structlog.testing.capture_logs() as logs:
        results = ExecDevice("d", [quiet]).verify(ACCOUNT, "r", tunnels, deadline=deadline())
    assert {r.status for r in results.values()} == {DeviceStatus.OK}
    assert [(e["event"], e["log_level"], e["stderr"]) for e in logs] == [("device_hook_stderr", "info", "all fine")]
