"""Leases (docs/design.md section 4, issue 9 items 3, 4, 8), through the simulators over loopback.

A lease is never handed over while a call it covers may still land; every call's deadline ends
before the lease does; a crashed holder on this host is taken over at once. Every test ends by
asserting the invariant of docs/design.md section 2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from rotator import config
from rotator.errors import ConfigError
from rotator.rotation.engine import SKIPPED, RunRequest
from rotator.rotation.lease import HolderId, LeaseLost, LeaseManager, Liveness, LocalProcesses, check_lease_ttl
from rotator.service import daemon as daemon_mod
from rotator.service.daemon import build_daemon
from tests.helpers import OUTPUTS, assert_invariant, run_cli, runtime, start_cli, wait_for, write_config

ADMIN = "a" * 32
LEASES = "cloudflare/magic-ipsec/_leases"


def account(sims):
    return next(iter(sims.tunnels_by_account))


def lease_of(sims, acc):
    return sims.vault.read_data(f"{LEASES}/{acc}") or {}


def applies_settled(sims):
    """Every apply request the Cloudflare simulator received has been handled (landed or refused)."""
    return len(sims.cloudflare.requests_of("cf.psk_apply")) == sims.cloudflare.request_counts().get("cf.psk_apply", 0)


# -- 9.3: a shutdown during a slow apply ----------------------------------------------------------

def test_shutdown_during_a_slow_apply_never_hands_the_account_over(sims, tmp_path, monkeypatch):
    """Regression: stop() used to wait 30 s, then release the lease while the apply was in flight;
    another rotator rotated, and the late apply left Cloudflare on a key Vault only had as previous_psk."""
    acc = account(sims)
    monkeypatch.setattr(daemon_mod, "SHUTDOWN_GRACE", 0.2)  # the grace runs out long before the apply answers
    text = (f'[admin]\nlisten = "127.0.0.1:0"\n[rotation]\nlease_ttl = "10s"\n[cloudflare]\ntimeout = "4s"\n'
            f'[policies.default]\nevery = "1h"\n[[accounts]]\nid = "{acc}"\n')
    settings = config.load(write_config(tmp_path, text), env={**sims.env(), "ROTATOR_ADMIN_TOKEN": ADMIN})
    sims.cloudflare.set_latency(2.5, route="cf.psk_apply")
    d = build_daemon(settings, tick_seconds=3600)
    d.start(serve_admin=False)  # the first tick rotates every tunnel: its apply is slow
    wait_for(lambda: sims.cloudflare.request_counts().get("cf.psk_apply", 0) >= 1, what="the daemon's apply")
    sims.cloudflare.set_latency(0, route="cf.psk_apply")  # only the daemon's apply is slow
    stopper = threading.Thread(target=d.stop)
    stopper.start()  # as SIGTERM does
    other = runtime(sims, "[cloudflare]\ntimeout = 4\n", tmp_path, holder="replica-b")
    reports = []

    def other_rotates_twice():
        reports.append(other.engine.run(RunRequest(acc)))
        return sum(r.ok for r in reports) >= 2

    try:
        # The other rotator tries all along; it may only get the account once no call of the daemon can land.
        wait_for(other_rotates_twice, timeout=40, what="the other rotator to rotate twice")
        stopper.join(timeout=40)
        wait_for(lambda: applies_settled(sims), what="every apply to land")
    finally:
        other.close()
        if stopper.is_alive():
            stopper.join(timeout=40)
    assert not stopper.is_alive()
    assert_invariant(sims, acc)  # the daemon's late apply must not have overwritten the other's key
    assert_invariant(sims, acc, strict=True)


def test_a_lease_with_a_call_in_flight_is_kept(sims, tmp_path):
    """release() while a covered call is in flight keeps the lease; it is released once the call answered."""
    acc = account(sims)
    rt = runtime(sims, "", tmp_path)
    try:
        leases = rt.leases
        leases.acquire(acc)
        with leases.covering(acc, 5.0):
            assert leases.release(acc) is False
            assert lease_of(sims, acc)["holder"] == leases.holder
            assert float(lease_of(sims, acc)["busy_until"]) > time.time()
        assert leases.release(acc) is True
        assert lease_of(sims, acc)["holder"] == "" and "busy_until" not in lease_of(sims, acc)
    finally:
        rt.close()
    assert_invariant(sims, acc, strict=True)


# -- 9.4: every call's deadline ends before the lease does ----------------------------------------

@pytest.mark.parametrize(("text", "ok"), [
    ('[rotation]\nlease_ttl = "2s"\n', False),  # with the default 30 s Cloudflare timeout
    ('[rotation]\nlease_ttl = "59s"\n', False),
    ('[rotation]\nlease_ttl = "60s"\n', True),
    ('[rotation]\nlease_ttl = "2s"\n[cloudflare]\ntimeout = "1s"\n', True),
    ('[rotation]\nlease_ttl = "10s"\n[cloudflare]\ntimeout = "6s"\n', False),
])
def test_a_lease_shorter_than_twice_the_call_deadline_is_a_config_error(sims, tmp_path, text, ok):
    path = write_config(tmp_path, text)
    if ok:
        config.load(path, env=sims.env())
    else:
        with pytest.raises(ConfigError) as exc:
            config.load(path, env=sims.env())
        assert "rotation.lease_ttl" in str(exc.value) and "cloudflare.timeout" in str(exc.value)
        proc = run_cli(["--config", path, "config", "check"], sims.env())
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "rotation.lease_ttl" in lines[0] and "cloudflare.timeout" in lines[0]
    assert_invariant(sims, account(sims), strict=True)


def test_the_longest_call_deadline_is_the_one_named(sims):
    """Device timeouts join the check (rotator.rotation.lease.check_lease_ttl takes every call deadline)."""
    check_lease_ttl(120, {"cloudflare.timeout": 30, "devices[0].timeout": 60})
    with pytest.raises(ConfigError) as exc:
        check_lease_ttl(100, {"cloudflare.timeout": 30, "devices[0].timeout": 60, "devices[1].timeout": 5})
    assert "rotation.lease_ttl (100s)" in str(exc.value) and "devices[0].timeout (60s)" in str(exc.value)
    assert "at least 120s" in str(exc.value)
    assert_invariant(sims, account(sims), strict=True)


def test_a_covered_call_ends_before_the_lease_and_is_kept_alive(sims, tmp_path):
    """The deadline handed to a call leaves its whole timeout before the lease (just renewed) ends,
    and a keepalive renews the lease while the call is in flight."""
    acc = account(sims)
    rt = runtime(sims, "", tmp_path)
    try:
        leases = LeaseManager(rt.store, "elsewhere:1:x.0.aa", ttl=3.0)
        leases.acquire(acc)
        version = sims.vault.version_of(f"{LEASES}/{acc}")
        with leases.covering(acc, 1.5) as deadline:
            written = lease_of(sims, acc)
            assert deadline + 1.5 <= float(written["expires_at"])  # the call's last attempt ends in time
            assert float(written["busy_until"]) >= deadline + 1.5
            # The "call" runs: the keepalive renews the lease meanwhile (every third of the TTL).
            wait_for(lambda: sims.vault.version_of(f"{LEASES}/{acc}") >= version + 2, timeout=5,
                     what="a keepalive renewal")
        assert "busy_until" not in lease_of(sims, acc)  # answered: nothing of it can land later
        assert leases.holds(acc)
        leases.release(acc)
    finally:
        rt.close()
    assert_invariant(sims, acc, strict=True)


def test_a_lease_too_short_for_the_call_sends_nothing(sims, tmp_path):
    """Regression: the apply guard used to shrink to half the TTL, so a 30 s call started with 5 s of
    lease left. Now a call whose deadline does not fit in the lease is never sent."""
    acc = account(sims)
    rt = runtime(sims, "", tmp_path)
    try:
        assert rt.engine.run(RunRequest(acc)).ok
        rt.leases.ttl = 10.0  # as a lease_ttl of 10 s with a 30 s timeout was once accepted
        before = sims.cloudflare.request_counts().get("cf.psk_apply", 0)
        report = rt.engine.run(RunRequest(acc))
        assert {o.result for o in report.outcomes} == {SKIPPED}
        assert all("too short" in (o.reason or "") for o in report.outcomes)
        assert sims.cloudflare.request_counts().get("cf.psk_apply", 0) == before
        assert_invariant(sims, acc)  # the staged keys wait in Vault for reconcile
        with pytest.raises(LeaseLost):
            rt.leases.acquire(acc)
            with rt.leases.covering(acc, 30.0):
                pass
        rt.leases.ttl = 120.0
        assert rt.engine.run(RunRequest(acc, reconcile_only=True)).ok
    finally:
        rt.close()
    assert_invariant(sims, acc, strict=True)


# -- 9.8: holder ids, crashed holders, waiting, unlock --------------------------------------------

def test_holder_ids_name_host_pid_and_a_start_nonce(sims, tmp_path):
    procs = LocalProcesses()
    rt = runtime(sims, "", tmp_path)
    try:
        me = HolderId.parse(rt.leases.holder)
        assert me is not None and me.pid == os.getpid() and me.host == procs.host and me.scope and me.start
        assert procs.probe(rt.leases.holder) is Liveness.ALIVE
        assert procs.probe(str(HolderId(me.host, me.pid, me.scope, str(int(me.start) + 1), "ab"))) is Liveness.GONE
        child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        try:
            start = LocalProcesses()._start_of(child.pid)
            assert start is not None
            alive = str(HolderId(me.host, child.pid, me.scope, start, "cd"))
            assert procs.probe(alive) is Liveness.ALIVE
            # The same pid with another start time: the pid was reused by a younger process.
            assert procs.probe(str(HolderId(me.host, child.pid, me.scope, str(int(start) - 1), "cd"))) is Liveness.GONE
        finally:
            child.communicate(b"", timeout=10)
        assert procs.probe(alive) is Liveness.GONE
        assert procs.probe(str(HolderId("elsewhere", child.pid, me.scope, start, "cd"))) is Liveness.UNKNOWN
        assert procs.probe(str(HolderId(me.host, child.pid, "0badc0de", start, "cd"))) is Liveness.UNKNOWN
        for garbage in ("", "replica-a", "host-123-abcd", "h:x:y", "h:1:a.b", "a:b:c:d"):
            assert procs.probe(garbage) is Liveness.UNKNOWN
    finally:
        rt.close()
    assert_invariant(sims, account(sims), strict=True)


def _killed_run(sims, tmp_path, route, latency, extra=""):
    """A CLI rotation SIGKILLed while its call on ``route`` is at Cloudflare; returns the config path."""
    acc = account(sims)
    cfg = write_config(tmp_path, f"[cloudflare]\ntimeout = 2\nretry_attempts = 1\n{extra}")  # lease: 120 s
    assert run_cli(["--config", cfg, "rotate", "--account", acc, "--all"], sims.env()).returncode == 0
    base = sims.cloudflare.request_counts().get(route, 0)
    sims.cloudflare.set_latency(latency, route=route)
    proc = start_cli(["--config", cfg, "rotate", "--account", acc, "--all"], sims.env())
    try:
        wait_for(lambda: sims.cloudflare.request_counts().get(route, 0) > base, what=f"the run's {route}")
    finally:
        proc.send_signal(signal.SIGKILL)
        OUTPUTS.extend(proc.communicate(timeout=10))
    sims.cloudflare.clear_faults()
    assert lease_of(sims, acc)["holder"]  # the dead run's lease is still there, for 120 s
    assert_invariant(sims, acc)
    return cfg


def test_a_killed_run_is_taken_over_at_once(sims, tmp_path):
    """Regression: after a SIGKILLed run, reconcile failed for the whole TTL ("leased to ...")."""
    acc = account(sims)
    cfg = _killed_run(sims, tmp_path, "cf.psk_validate", 5)
    dead = lease_of(sims, acc)["holder"]
    proc = run_cli(["--config", cfg, "reconcile", "--account", acc, "--no-wait", "--output", "json"], sims.env())
    assert proc.returncode == 0, proc.stderr
    assert "leased" not in proc.stderr
    report = json.loads(proc.stdout)
    assert report["counts"]["rotated"] >= 1 and all(t["reconciled"] for t in report["tunnels"])
    assert lease_of(sims, acc)["holder"] == ""  # released by the reconcile that took it over
    assert dead not in lease_of(sims, acc).values()
    assert_invariant(sims, acc, strict=True)


def test_a_run_killed_during_apply_is_taken_over_at_once_but_fresh_keys_wait(sims, tmp_path):
    """The dead run's apply may still land until the lease's busy_until. The successor takes the lease
    at once and re-sends the pending keys (a late landing cannot contradict them), but sends no fresh
    key before busy_until: a late apply could otherwise overwrite a newer key."""
    acc = account(sims)
    cfg = _killed_run(sims, tmp_path, "cf.psk_apply", 1.0)
    busy_until = float(lease_of(sims, acc)["busy_until"])
    assert busy_until > time.time()
    proc = run_cli(["--config", cfg, "reconcile", "--account", acc, "--no-wait"], sims.env())
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert_invariant(sims, acc, strict=True)
    wait_for(lambda: applies_settled(sims), what="every apply to be handled")
    handled = sims.cloudflare.request_counts()["cf.psk_apply"]
    proc = run_cli(["--config", cfg, "rotate", "--account", acc, "--all", "--no-wait"], sims.env())
    assert proc.returncode == 0, proc.stderr
    if time.time() < busy_until - 1:  # (on a loaded machine the window may be over already)
        assert "may still land" in proc.stderr
    later = sims.cloudflare.requests_of("cf.psk_apply")[handled:]
    assert later and all(t >= busy_until for t, _, _ in later)
    assert_invariant(sims, acc, strict=True)


def _foreign_holder(sims, tmp_path, acc, ttl):
    rt = runtime(sims, "", tmp_path)
    leases = LeaseManager(rt.store, "elsewhere:4242:x.0.beef", ttl=ttl)
    leases.acquire(acc)
    return rt, leases


def test_a_live_foreign_holder_is_waited_for_or_not(sims, tmp_path):
    acc = account(sims)
    rt, leases = _foreign_holder(sims, tmp_path, acc, ttl=60.0)
    try:
        proc = run_cli(["reconcile", "--account", acc, "--no-wait"], sims.env())
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "elsewhere:4242" in lines[0] and "another host" in lines[0]
        # Without --no-wait: one line saying who and how long, then the wait; the holder finishes.
        run = start_cli(["rotate", "--account", acc, "--all"], sims.env())
        err: list[str] = []
        reader = threading.Thread(target=lambda: err.extend(run.stderr))
        reader.start()
        try:
            wait_for(lambda: any("waiting up to" in line for line in err), timeout=60, what="the notice")
            assert sims.cloudflare.request_counts().get("cf.psk_apply", 0) == 0
            leases.release(acc)
            assert run.wait(timeout=60) == 0, err
            out = run.stdout.read()
        finally:
            if run.poll() is None:
                run.kill()
            reader.join(timeout=10)
            OUTPUTS.extend(err)
        notice = [line for line in err if "waiting up to" in line]
        assert len(notice) == 1 and "elsewhere:4242" in notice[0] and "--no-wait" in notice[0]
        assert "Summary:" in out
    finally:
        rt.close()
    assert_invariant(sims, acc, strict=True)


def test_a_holder_that_keeps_renewing_is_not_waited_for_forever(sims, tmp_path):
    acc = account(sims)
    rt, leases = _foreign_holder(sims, tmp_path, acc, ttl=5.0)  # renewed every 0.2 s: never lapses
    stop = threading.Event()

    def renew():
        for _ in range(200):  # bounded: at most 40 s
            if stop.wait(0.2):
                return
            leases.acquire(acc)

    renewer = threading.Thread(target=renew)
    renewer.start()
    try:
        proc = run_cli(["rotate", "--account", acc, "--all"], sims.env(), timeout=60)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "renewed its lease" in proc.stderr.strip().splitlines()[-1]
        assert sims.cloudflare.request_counts().get("cf.psk_apply", 0) == 0
    finally:
        stop.set()
        renewer.join(timeout=10)
        rt.close()
    assert_invariant(sims, acc, strict=True)


def test_unlock_clears_a_dead_holder_and_keeps_it_in_the_history(sims, tmp_path):
    acc = account(sims)
    cfg = _killed_run(sims, tmp_path, "cf.psk_validate", 5)
    dead = lease_of(sims, acc)["holder"]
    version = sims.vault.version_of(f"{LEASES}/{acc}")
    proc = run_cli(["--config", cfg, "unlock", "--account", acc], sims.env())
    assert proc.returncode == 0, proc.stderr
    assert dead in proc.stdout and "process is gone" in proc.stdout
    cleared = lease_of(sims, acc)
    assert cleared["holder"] == "" and cleared["previous_holder"] == dead
    assert HolderId.parse(cleared["released_by"]) is not None
    assert sims.vault.version_of(f"{LEASES}/{acc}") == version + 1  # the dead holder stays in version N
    again = run_cli(["--config", cfg, "unlock", "--account", acc], sims.env())
    assert again.returncode == 0 and "nothing to unlock" in again.stdout
    assert run_cli(["--config", cfg, "reconcile", "--account", acc, "--no-wait"], sims.env()).returncode == 0
    assert_invariant(sims, acc, strict=True)


def test_unlock_refuses_a_live_holder(sims, tmp_path):
    acc = account(sims)
    rt, leases = _foreign_holder(sims, tmp_path, acc, ttl=60.0)
    try:
        proc = run_cli(["unlock", "--account", acc], sims.env())
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
        assert "another host" in proc.stderr and lease_of(sims, acc)["holder"] == leases.holder
        leases.release(acc)
        # A live process of this host: a run stalled at validation.
        sims.cloudflare.set_latency(5, route="cf.psk_validate")
        run = start_cli(["rotate", "--account", acc, "--all"], sims.env())
        try:
            wait_for(lambda: sims.cloudflare.request_counts().get("cf.psk_validate", 0) >= 1, what="the run")
            proc = run_cli(["unlock", "--account", acc], sims.env())
            assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
            assert "live process on this host" in proc.stderr and str(run.pid) in proc.stderr
        finally:
            sims.cloudflare.clear_faults()
            OUTPUTS.extend(run.communicate(timeout=60))
        assert run.returncode == 0
    finally:
        rt.close()
    assert_invariant(sims, acc, strict=True)


@pytest.mark.parametrize("bad", ["x", "023E105F4ECEF8AD9CA31A8372D0C353", "../" + "0" * 30, "0" * 33])
def test_unlock_validates_the_account_id(sims, bad):
    proc = run_cli(["unlock", "--account", bad], sims.env())
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "account id" in proc.stderr
    assert_invariant(sims, account(sims), strict=True)


def test_an_apply_without_an_answer_holds_back_the_next_one_until_it_cannot_land(sims, tmp_path):
    """An apply whose answer never came may still land until busy_until: the lease is released with it,
    and no apply (ours included) is sent before it. A definite refusal holds nothing back."""
    acc = account(sims)
    rt = runtime(sims, "[cloudflare]\ntimeout = 1\nretry_attempts = 1\n", tmp_path)
    try:
        assert rt.engine.run(RunRequest(acc)).ok
        sims.cloudflare.fail_next("cf.psk_apply", count=1, status=400)
        refused = rt.engine.run(RunRequest(acc))
        assert not refused.ok and "busy_until" not in lease_of(sims, acc)
        sims.cloudflare.late_next("cf.psk_apply", delay=1.5)
        report = rt.engine.run(RunRequest(acc))
        assert {o.result for o in report.outcomes} == {"unknown"}
        released = lease_of(sims, acc)
        assert released["holder"] == "" and float(released["busy_until"]) > time.time()
        assert_invariant(sims, acc)
        assert rt.engine.run(RunRequest(acc, reconcile_only=True)).ok  # re-sending pending keys: at once
        wait_for(lambda: applies_settled(sims), what="every apply to be handled")
        handled = sims.cloudflare.request_counts()["cf.psk_apply"]
        assert rt.engine.run(RunRequest(acc)).ok  # fresh keys: only once the lost apply cannot land
        later = sims.cloudflare.requests_of("cf.psk_apply")[handled:]
        assert later and all(t >= float(released["busy_until"]) for t, _, _ in later)
    finally:
        rt.close()
    assert_invariant(sims, acc, strict=True)


def test_a_daemon_killed_on_this_host_is_succeeded_at_once(sims, tmp_path):
    """A restarted daemon (same host, same pid namespace) leads at once instead of standing by for the TTL."""
    acc = account(sims)
    text = (f'[admin]\nlisten = "127.0.0.1:0"\n[rotation]\nlease_ttl = "60s"\n'
            f'[policies.default]\nevery = "1h"\n[[accounts]]\nid = "{acc}"\n')
    path = write_config(tmp_path, text)
    env = {**sims.env(), "ROTATOR_ADMIN_TOKEN": ADMIN}
    proc = start_cli(["--config", path, "run"], env)
    try:
        wait_for(lambda: sims.cloudflare.request_counts().get("cf.psk_apply", 0) >= 1, what="the first rotation")
        wait_for(lambda: HolderId.parse(lease_of(sims, acc).get("holder", "")) is not None, what="the lease")
    finally:
        proc.send_signal(signal.SIGKILL)
        OUTPUTS.extend(proc.communicate(timeout=10))
    dead = lease_of(sims, acc)["holder"]
    assert HolderId.parse(dead).pid == proc.pid and float(lease_of(sims, acc)["expires_at"]) > time.time() + 30
    wait_for(lambda: applies_settled(sims), what="the dead daemon's apply to be handled")
    successor = build_daemon(config.load(path, env=env), tick_seconds=3600)
    successor.start(serve_admin=False)
    try:
        assert successor.metrics.leader.labels(account=acc)._value.get() == 1
        assert lease_of(sims, acc)["holder"] == successor.runtime.leases.holder
        successor.tick()  # settles whatever the dead daemon left pending (the scheduled tick may too)
    finally:
        successor.stop()
    assert lease_of(sims, acc)["holder"] == ""
    assert_invariant(sims, acc, strict=True)


# -- issue 20 item 5: the CLI next to a leading daemon, without ROTATOR_ADMIN_URL --------------------

def _daemon_text(acc, extra=""):
    return (f'[admin]\nlisten = "127.0.0.1:0"\n{extra}[rotation]\nlease_ttl = "120s"\n'
            f'[policies.default]\nevery = "1h"\n[[accounts]]\nid = "{acc}"\n')


def test_the_cli_hands_its_request_to_the_daemon_named_in_the_lease(sims, tmp_path):
    """Regression: with the daemon's own config and no ROTATOR_ADMIN_URL, a reconcile waited for a lease
    the daemon renews forever. The daemon records its admin URL in its lease; the CLI hands over to it,
    and checks tunnel names before anything else."""
    acc = account(sims)
    path = write_config(tmp_path, _daemon_text(acc))
    env = {**sims.env(), "ROTATOR_ADMIN_TOKEN": ADMIN}
    env.pop("ROTATOR_ADMIN_URL", None)
    proc = start_cli(["--config", path, "run"], env)
    try:
        wait_for(lambda: lease_of(sims, acc).get("admin_url", "").startswith("http://127.0.0.1:"),
                 what="the daemon's lease with its admin URL")
        wait_for(lambda: sims.cloudflare.request_counts().get("cf.psk_apply", 0) >= 1, what="the first rotation")
        lease = lease_of(sims, acc)
        assert HolderId.parse(lease["holder"]).pid == proc.pid
        reconcile = run_cli(["--config", path, "reconcile", "--account", acc], env, timeout=60)
        assert reconcile.returncode == 0, reconcile.stderr
        assert f"handed to the daemon at {lease['admin_url']}" in reconcile.stderr
        assert "leased to" not in reconcile.stderr and "waiting" not in reconcile.stderr
        assert reconcile.stdout.startswith("Reconcile ")
        nonesuch = run_cli(["--config", path, "rotate", "--account", acc, "--tunnel", "nonesuch"], env, timeout=60)
        assert nonesuch.returncode == 2 and "no tunnel 'nonesuch'" in nonesuch.stderr
        assert len(nonesuch.stderr.strip().splitlines()) == 1 and "waiting" not in nonesuch.stderr
        before = sims.cloudflare.request_counts().get("cf.psk_apply", 0)
        one = run_cli(["--config", path, "rotate", "--account", acc, "--tunnel", "tun00002", "--output", "json"],
                      env, timeout=60)
        assert one.returncode == 0, one.stderr
        assert [t["result"] for t in json.loads(one.stdout)["tunnels"]] == ["rotated"]
        assert sims.cloudflare.request_counts()["cf.psk_apply"] == before + 1  # the daemon applied it
        assert lease_of(sims, acc)["holder"] == lease["holder"]  # the daemon kept the lead throughout
    finally:
        proc.send_signal(signal.SIGTERM)
        OUTPUTS.extend(proc.communicate(timeout=60))
    assert proc.returncode == 0
    assert_invariant(sims, acc, strict=True)


def test_a_leading_daemon_that_cannot_be_reached_is_one_line_not_a_wait(sims, tmp_path):
    """A daemon whose recorded admin URL does not answer from here: one line naming the holder,
    ROTATOR_ADMIN_URL and --local/--no-wait, at once; without an admin token, one line naming it.
    No hint tells the operator to stop the daemon."""
    import socket

    acc = account(sims)
    with socket.socket() as closed:  # a loopback port nobody listens on
        closed.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    settings = config.load(write_config(tmp_path, _daemon_text(acc, f'advertise_url = "{dead_url}"\n')),
                           env={**sims.env(), "ROTATOR_ADMIN_TOKEN": ADMIN})
    d = build_daemon(settings, tick_seconds=3600)
    d.start()
    try:
        wait_for(lambda: lease_of(sims, acc).get("admin_url") == dead_url, what="the daemon's lease")
        holder = lease_of(sims, acc)["holder"]
        d.tick()  # settled: nothing of the daemon in flight
        env = {**sims.env(), "ROTATOR_ADMIN_TOKEN": ADMIN}
        for args in (["rotate", "--account", acc, "--all"], ["reconcile", "--account", acc, "--no-wait"]):
            proc = run_cli(args, env, timeout=60)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
            assert holder in lines[0] and dead_url in lines[0] and "ROTATOR_ADMIN_URL" in lines[0]
            assert "--local" in lines[0] and "--no-wait" in lines[0] and "stop" not in lines[0]
        untokened = {k: v for k, v in sims.env().items() if k != "ROTATOR_ADMIN_TOKEN"}
        proc = run_cli(["rotate", "--account", acc, "--all"], untokened, timeout=60)
        assert proc.returncode == 2 and "ROTATOR_ADMIN_TOKEN" in proc.stderr and holder in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        local = run_cli(["rotate", "--account", acc, "--all", "--local", "--no-wait"], env, timeout=60)
        assert local.returncode == 1 and "leased to" in local.stderr and "stop" not in local.stderr
        assert "ROTATOR_ADMIN_URL" in local.stderr
    finally:
        d.stop()
    assert_invariant(sims, acc, strict=True)


# -- issue 20 item 10: liveness under the systemd unit's ProcSubset=pid -------------------------------

RESTRICTED = ("mount -t proc -o subset=pid,hidepid=invisible proc /proc && test ! -e /proc/sys && "
              "test ! -e /proc/stat && exec \"$@\"")


def restricted(argv):
    """``argv`` in a new mount namespace whose /proc is what the shipped unit leaves (ProcSubset=pid,
    ProtectProc=invisible): process directories only. Skips when this machine does not allow it."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed: cannot build the unit's /proc")
    probe = subprocess.run([unshare, "-m", "--propagation", "private", "sh", "-c", RESTRICTED, "sh", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a subset=pid /proc in a new mount namespace here (needs root and Linux 5.8+): "
                    f"{probe.stderr.strip()[:200]}")
    return [unshare, "-m", "--propagation", "private", "sh", "-c", RESTRICTED, "sh", *argv]


PROBE = """
import json, os, subprocess, sys
from rotator.rotation.lease import HolderId, LocalProcesses
procs = LocalProcesses()
me = HolderId.parse(procs.new_holder())
child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
start = procs._start_of(child.pid)
alive = str(HolderId(me.host, child.pid, me.scope, start, "cd"))
before = procs.probe(alive).name
child.communicate(b"", timeout=10)
print(json.dumps({"scope": procs.scope, "start": procs.start, "alive": before, "gone": procs.probe(alive).name,
                  "parent": procs.probe(sys.argv[1]).name, "proc_sys": os.path.exists("/proc/sys")}))
"""


def test_liveness_works_with_only_the_process_directories_of_proc(sims, tmp_path):
    """Regression: with ProcSubset=pid there is no /proc/sys/kernel/random/boot_id, the scope read as
    empty, and every holder counted as "another host": a crashed run was waited out, unlock refused.
    The scope comes from the pid namespace and the boot time (clock_gettime), the same with either /proc."""
    outside = LocalProcesses()
    mine = outside.new_holder()
    proc = subprocess.run(restricted([sys.executable, "-c", PROBE, mine]), capture_output=True, text=True,
                          timeout=60, cwd=os.getcwd())
    OUTPUTS.extend([proc.stdout, proc.stderr])
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["proc_sys"] is False  # it really ran without /proc/sys
    assert seen["scope"] and seen["scope"] == outside.scope and seen["start"]
    assert (seen["alive"], seen["gone"], seen["parent"]) == ("ALIVE", "GONE", "ALIVE")
    assert_invariant(sims, account(sims), strict=True)


def test_under_the_units_proc_a_crashed_run_is_taken_over_and_unlock_clears_it(sims, tmp_path):
    """A run SIGKILLed on this host: under the unit's /proc, unlock clears its lease at once and the
    next run takes the account over at once (no wait for lease_ttl)."""
    acc = account(sims)
    cfg = _killed_run(sims, tmp_path, "cf.psk_validate", 5)
    dead = lease_of(sims, acc)["holder"]
    env = {**os.environ, **sims.env()}
    unlock = subprocess.run(restricted([sys.executable, "-m", "rotator", "--config", cfg, "unlock", "--account", acc]),
                            capture_output=True, text=True, timeout=60, env=env)
    OUTPUTS.extend([unlock.stdout, unlock.stderr])
    assert unlock.returncode == 0, unlock.stderr
    assert dead in unlock.stdout and "process is gone" in unlock.stdout and lease_of(sims, acc)["holder"] == ""
    _killed_run(sims, tmp_path, "cf.psk_validate", 5)
    again = subprocess.run(restricted([sys.executable, "-m", "rotator", "--config", cfg, "reconcile", "--account",
                                       acc, "--no-wait"]), capture_output=True, text=True, timeout=60, env=env)
    OUTPUTS.extend([again.stdout, again.stderr])
    assert again.returncode == 0, again.stderr
    assert "leased to" not in again.stderr and "waiting" not in again.stderr
    assert_invariant(sims, acc, strict=True)


def test_the_boot_time_in_a_holder_id_tolerates_a_second_and_nothing_more():
    """Two readings of the boot time may straddle a second; a wall-clock step beyond that makes the
    holder uncheckable (waited for), never "gone". No key is involved: nothing for the invariant."""
    from pathlib import Path

    procs = LocalProcesses()
    tag, _, boot = procs.scope.partition("-")
    assert tag and boot.isdigit() and abs(int(boot) - int(Path("/proc/stat").read_text().split("btime ")[1].split()[0])) <= 1
    me = HolderId.parse(procs.new_holder())
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        start = procs._start_of(child.pid)
        for shift, alive in ((0, Liveness.ALIVE), (1, Liveness.ALIVE), (-1, Liveness.ALIVE), (2, Liveness.UNKNOWN),
                             (-3600, Liveness.UNKNOWN)):
            scope = f"{tag}-{int(boot) + shift}"
            assert procs.probe(str(HolderId(me.host, child.pid, scope, start, "cd"))) is alive, shift
        assert procs.probe(str(HolderId(me.host, child.pid, "0badc0de-" + boot, start, "cd"))) is Liveness.UNKNOWN
        assert procs.probe(str(HolderId(me.host, child.pid, tag, start, "cd"))) is Liveness.UNKNOWN  # an older version's
    finally:
        child.communicate(b"", timeout=10)
    dead = str(HolderId(me.host, child.pid, f"{tag}-{int(boot) + 1}", start, "cd"))
    assert procs.probe(dead) is Liveness.GONE


def test_a_daemon_on_another_host_that_advertises_loopback_is_one_line(sims, tmp_path):
    """A daemon elsewhere whose lease names a loopback admin URL (admin.listen left at 127.0.0.1): from
    here that URL is some other process. One line naming the holder and admin.advertise_url, nothing sent."""
    acc = account(sims)
    rt, leases = _foreign_holder(sims, tmp_path, acc, ttl=60.0)
    leases.advertise("http://127.0.0.1:9477")
    leases.acquire(acc)
    try:
        assert lease_of(sims, acc)["admin_url"] == "http://127.0.0.1:9477"
        proc = run_cli(["rotate", "--account", acc, "--all"], {**sims.env(), "ROTATOR_ADMIN_TOKEN": ADMIN})
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert "elsewhere:4242" in lines[0] and "another host" in lines[0] and "advertise_url" in lines[0]
        assert "--local" in lines[0] and "stop" not in lines[0]
        assert sims.cloudflare.request_counts().get("cf.psk_validate", 0) == 0
    finally:
        leases.release(acc)
        rt.close()
    assert_invariant(sims, acc, strict=True)


def test_an_unknown_tunnel_is_named_before_any_wait_for_a_lease(sims, tmp_path):
    """Regression: 'rotate --tunnel nonesuch' next to a live holder waited out its lease (84 s) and then
    failed on the lease, never saying the tunnel does not exist."""
    acc = account(sims)
    rt, leases = _foreign_holder(sims, tmp_path, acc, ttl=60.0)  # another one-shot run: no admin URL
    try:
        for command in (["rotate", "--account", acc, "--tunnel", "tun00001", "--tunnel", "nonesuch"],
                        ["rollback", "--account", acc, "--tunnel", "nonesuch"]):
            proc = run_cli(command, sims.env(), timeout=60)
            assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
            assert "no tunnel 'nonesuch'" in proc.stderr and "leased" not in proc.stderr
        assert lease_of(sims, acc)["holder"] == leases.holder
    finally:
        leases.release(acc)
        rt.close()
    assert_invariant(sims, acc, strict=True)
