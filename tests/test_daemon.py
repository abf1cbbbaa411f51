"""The daemon against the simulators over loopback: schedules, admin API, metrics, logs, HA, shutdown."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import time

import httpx
import pytest
import structlog

from rotator import config
from rotator.service.daemon import build_daemon
from rotator.service.logging import Redactor, configure
from tests.helpers import OUTPUTS, assert_invariant, record, start_cli, wait_for, write_config

ADMIN = "a" * 32


def daemon_config(sims, tmp_path, extra="", lease_ttl="120s", on_drift="rotate"):
    accounts = "".join(f'[[accounts]]\nid = "{a}"\n' for a in sims.tunnels_by_account)
    text = (f'[admin]\nlisten = "127.0.0.1:0"\n[rotation]\nlease_ttl = "{lease_ttl}"\non_drift = "{on_drift}"\n'
            f'[policies.default]\nevery = "1h"\n{extra}{accounts}')
    return config.load(write_config(tmp_path, text), env={**sims.env(), "ROTATOR_ADMIN_TOKEN": ADMIN})


@pytest.fixture
def daemon(sims, tmp_path):
    d = build_daemon(daemon_config(sims, tmp_path), tick_seconds=3600)
    d.start()
    yield d
    if not d._stopping.is_set():
        d.stop()


def metric(text, name, **labels):
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


def test_first_tick_rotates_every_tunnel_and_metrics_show_it(sims, daemon):
    acc = next(iter(sims.tunnels_by_account))
    url = daemon.admin_url
    wait_for(lambda: metric(httpx.get(url + "/metrics").text, "psk_rotator_rotations_total",
                            account=acc, result="rotated") == 6, what="first rotation")
    text = httpx.get(url + "/metrics").text
    assert metric(text, "psk_rotator_leader", account=acc) == 1
    assert metric(text, "psk_rotator_last_success_timestamp_seconds", account=acc) > time.time() - 60
    assert metric(text, "psk_rotator_next_rotation_timestamp_seconds", account=acc) > time.time() + 3000
    assert metric(text, "psk_rotator_build_info") == 1
    assert_invariant(sims, acc, strict=True)


def test_admin_api_needs_the_bearer_token(daemon):
    url = daemon.admin_url
    assert httpx.get(url + "/healthz").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN}):
        assert httpx.get(url + "/v1/status", headers=headers).status_code == 401
        assert httpx.post(url + "/v1/rotations", json={"account": "x", "all": True}, headers=headers).status_code == 401


def test_on_demand_rotation_and_status_never_show_a_key(sims, daemon):
    acc = next(iter(sims.tunnels_by_account))
    url, auth = daemon.admin_url, {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.post(url + "/v1/rotations", json={"account": acc, "tunnels": ["tun00002"]}, headers=auth)
    assert r.status_code == 202
    run_id = r.json()["id"]
    wait_for(lambda: httpx.get(f"{url}/v1/rotations/{run_id}", headers=auth).json()["state"] == "done")
    view = httpx.get(f"{url}/v1/rotations/{run_id}", headers=auth).json()
    assert [t["result"] for t in view["result"]["tunnels"]] == ["rotated"]
    status = httpx.get(url + "/v1/status", headers=auth)
    assert status.json()["accounts"][acc]["leader"] is True
    bodies = status.text + json.dumps(view)
    OUTPUTS.append(bodies)
    for psk in sims.cloudflare.psks(acc).values():
        assert psk not in bodies
    assert httpx.post(url + "/v1/rotations", json={"account": acc}, headers=auth).status_code == 400
    assert httpx.post(url + "/v1/rotations", json={"account": "f" * 32, "all": True}, headers=auth).status_code == 400
    assert httpx.get(url + "/v1/rotations/nope", headers=auth).status_code == 404
    assert_invariant(sims, acc, strict=True)


def test_on_demand_runs_are_single_flight(sims, daemon):
    acc = next(iter(sims.tunnels_by_account))
    url, auth = daemon.admin_url, {"Authorization": f"Bearer {ADMIN}"}
    sims.cloudflare.set_latency(0.5, route="cf.psk_validate")
    first = httpx.post(url + "/v1/rotations", json={"account": acc, "all": True}, headers=auth).json()
    second = httpx.post(url + "/v1/rotations", json={"account": acc, "tunnels": ["tun00001"]}, headers=auth).json()
    assert second["id"] == first["id"] and second["deduplicated"] is True
    wait_for(lambda: httpx.get(f"{url}/v1/rotations/{first['id']}", headers=auth).json()["state"] == "done")
    third = httpx.post(url + "/v1/rotations", json={"account": acc, "all": True}, headers=auth).json()
    assert third["id"] != first["id"]
    wait_for(lambda: httpx.get(f"{url}/v1/rotations/{third['id']}", headers=auth).json()["state"] == "done")
    assert_invariant(sims, acc, strict=True)


def test_readyz_reports_vault_and_role(sims, daemon):
    r = httpx.get(daemon.admin_url + "/readyz")
    assert r.status_code == 200 and r.json()["role"] == "leader" and r.json()["vault"] == "ok"
    sims.vault.seal()
    r = httpx.get(daemon.admin_url + "/readyz")
    assert r.status_code == 503 and "sealed" in r.json()["vault"]
    sims.vault.unseal()


def test_metrics_pass_promtool(sims, daemon):
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: CI must install Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    acc = next(iter(sims.tunnels_by_account))
    url = daemon.admin_url
    wait_for(lambda: metric(httpx.get(url + "/metrics").text, "psk_rotator_rotations_total", account=acc,
                            result="rotated") == 6)
    text = httpx.get(url + "/metrics").text
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for psk in sims.cloudflare.psks(acc).values():
        assert psk not in text


def test_json_logs_have_one_canonical_line_per_run(sims, tmp_path):
    stream = io.StringIO()
    redactor = Redactor()
    redactor.add(sims.vault_token)
    configure(redactor, stream=stream, json=True)
    try:
        d = build_daemon(daemon_config(sims, tmp_path), tick_seconds=3600)
        d.start()
        wait_for(lambda: '"rotation_run"' in stream.getvalue())
        d.stop()
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    runs = [e for e in lines if e["event"] == "rotation_run"]
    assert len(runs) == 1 and runs[0]["rotated"] == 6 and runs[0]["ok"] is True
    assert {"account", "rotation_id", "trigger", "timestamp", "level"} <= set(runs[0])
    OUTPUTS.append(stream.getvalue())


def test_redaction_processor_masks_keys_and_registered_values():
    r = Redactor()
    r.add("hvs.verysecrettokenvalue")
    event = r(None, "info", {"event": "x", "psk": "abc", "detail": "token hvs.verysecrettokenvalue leaked",
                             "nested": {"api_token": "t", "ok": 1}})
    assert event["psk"] == "**redacted**" and "verysecret" not in event["detail"]
    assert event["nested"] == {"api_token": "**redacted**", "ok": 1}


def test_high_availability_standby_takes_over_when_the_leader_dies(sims, tmp_path):
    settings = daemon_config(sims, tmp_path, extra='[cloudflare]\ntimeout = "1s"\n', lease_ttl="2s")
    a = build_daemon(settings, tick_seconds=3600, holder="replica-a")
    a.start(serve_admin=False)
    b = build_daemon(settings, tick_seconds=3600, holder="replica-b")
    b.start(serve_admin=False)
    acc = next(iter(sims.tunnels_by_account))
    try:
        assert a.metrics.leader.labels(account=acc)._value.get() == 1
        assert b.metrics.leader.labels(account=acc)._value.get() == 0
        started = time.monotonic()
        a.stop(release=False)  # dies without releasing: the lease must expire
        wait_for(lambda: b.metrics.leader.labels(account=acc)._value.get() == 1, timeout=10, what="failover")
        took = time.monotonic() - started
        assert took <= 2 + 2 / 3 + 1.5, took
        assert a.metrics.rotations.labels(account=acc, result="rotated")._value.get() == 6
        b.tick()  # the new leader acts; the schedule lives in Vault, so nothing is due again yet
        assert b.metrics.runs.labels(account=acc, trigger="schedule", ok="true")._value.get() == 1
        assert b.metrics.rotations.labels(account=acc, result="rotated")._value.get() == 0
        assert all(v.next_due > time.time() + 3000 for v in b.views[acc].values())
        assert_invariant(sims, acc, strict=True)
    finally:
        b.stop()


def test_sigterm_stops_the_daemon_gracefully(sims, tmp_path):
    acc = next(iter(sims.tunnels_by_account))
    accounts = f'[[accounts]]\nid = "{acc}"\n'
    cfg = write_config(tmp_path, f'[admin]\nlisten = "127.0.0.1:0"\n[policies.default]\nevery = "1h"\n{accounts}')
    proc = start_cli(["--config", cfg, "run"], {**sims.env(), "ROTATOR_ADMIN_TOKEN": ADMIN})
    wait_for(lambda: sims.cloudflare.request_counts().get("cf.psk_apply", 0) >= 1, what="first rotation")
    wait_for(lambda: (sims.vault.read_data(f"cloudflare/magic-ipsec/_leases/{acc}") or {}).get("holder"))
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=40)
    OUTPUTS.extend([out, err])
    assert proc.returncode == 0 and "Traceback" not in err
    assert time.monotonic() - started < 35
    logs = [json.loads(line) for line in out.splitlines() if line.strip()]  # JSON lines on stdout
    assert {"daemon_started", "rotation_run", "daemon_stopped"} <= {e["event"] for e in logs}
    assert (sims.vault.read_data(f"cloudflare/magic-ipsec/_leases/{acc}") or {}).get("holder") == ""
    assert_invariant(sims, acc, strict=True)


# -- the run boundary, the queue and the request body (issue 9 item 6, issue 13 items 2 and 5) -------

def _finished(url, auth, run_id):
    return httpx.get(f"{url}/v1/rotations/{run_id}", headers=auth).json()["state"] in ("done", "failed")


def test_a_run_that_blows_up_ends_and_frees_the_account(sims, daemon):
    """A garbage Vault answer inside a run once left it 'running' forever, and every later request was
    deduplicated onto the wedged run."""
    acc = next(iter(sims.tunnels_by_account))
    url, auth = daemon.admin_url, {"Authorization": f"Bearer {ADMIN}"}
    wait_for(lambda: metric(httpx.get(url + "/metrics").text, "psk_rotator_runs_total", account=acc,
                            trigger="schedule") is not None, what="the first scheduled run")
    sims.vault.fail_next("kv.read", count=50, status=200, html=True)  # a login proxy answering for Vault
    first = httpx.post(url + "/v1/rotations", json={"account": acc, "all": True}, headers=auth).json()
    wait_for(lambda: _finished(url, auth, first["id"]), timeout=30, what="the broken run to end")
    sims.vault.clear_faults()
    second = httpx.post(url + "/v1/rotations", json={"account": acc, "all": True}, headers=auth).json()
    assert second["id"] != first["id"] and second["deduplicated"] is False
    wait_for(lambda: _finished(url, auth, second["id"]), timeout=30, what="the next run")
    view = httpx.get(f"{url}/v1/rotations/{second['id']}", headers=auth).json()
    assert view["state"] == "done" and view["result"]["counts"]["rotated"] == 6
    assert_invariant(sims, acc, strict=True)


def test_the_on_demand_queue_is_bounded(sims, tmp_path):
    acc = next(iter(sims.tunnels_by_account))
    d = build_daemon(config.load(write_config(tmp_path, _with_queue(sims, 1)),
                                 env={**sims.env(), "ROTATOR_ADMIN_TOKEN": ADMIN}), tick_seconds=3600)
    d.start()
    try:
        url, auth = d.admin_url, {"Authorization": f"Bearer {ADMIN}"}
        wait_for(lambda: metric(httpx.get(url + "/metrics").text, "psk_rotator_runs_total", account=acc,
                                trigger="schedule") is not None, what="the first scheduled run")
        sims.cloudflare.set_latency(3, route="cf.psk_validate")  # the first run stays at Cloudflare
        tunnels = sims.tunnels_by_account[acc]
        first = httpx.post(url + "/v1/rotations", json={"account": acc, "tunnels": [tunnels[0]]}, headers=auth)
        wait_for(lambda: httpx.get(url + first.json()["href"], headers=auth).json()["state"] == "running")
        answers = [httpx.post(url + "/v1/rotations", json={"account": acc, "tunnels": [t]}, headers=auth)
                   for t in tunnels[1:3]]
        # One runs, one waits, the next is refused with a hint when to come back.
        assert [r.status_code for r in answers] == [202, 429]
        assert int(answers[1].headers["Retry-After"]) > 0 and "waiting" in answers[1].json()["error"]
        sims.cloudflare.set_latency(0, route="cf.psk_validate")
        for r in (first, answers[0]):
            wait_for(lambda r=r: _finished(url, auth, r.json()["id"]), timeout=30, what="queued runs")
        assert httpx.post(url + "/v1/rotations", json={"account": acc, "tunnels": [tunnels[2]]},
                          headers=auth).status_code == 202
    finally:
        d.stop()
    assert_invariant(sims, acc)


def _with_queue(sims, queue):
    accounts = "".join(f'[[accounts]]\nid = "{a}"\n' for a in sims.tunnels_by_account)
    return f'[admin]\nlisten = "127.0.0.1:0"\nqueue = {queue}\n[policies.default]\nevery = "1h"\n{accounts}'


@pytest.mark.parametrize("body", [
    {"all": True, "dry_run": "false"}, {"all": True, "dry_run": 0}, {"all": "yes"},
    {"reconcile": "true"}, {"reconcile": True, "all": True}, {"tunnels": ["no-such-tunnel"]},
    {"rollback": True, "all": True}, {"rollback": True, "reconcile": True}, {"rollback": 1, "tunnels": ["x"]},
])
def test_bad_rotation_requests_are_refused_at_once(sims, daemon, body):
    acc = next(iter(sims.tunnels_by_account))
    url, auth = daemon.admin_url, {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.post(url + "/v1/rotations", json={"account": acc, **body}, headers=auth)
    assert r.status_code == 400, r.text
    assert r.json()["error"]
    assert not daemon.runs.get(r.json().get("id", "")), "nothing was queued"


def test_reconcile_through_the_admin_api(sims, daemon):
    acc = next(iter(sims.tunnels_by_account))
    url, auth = daemon.admin_url, {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.post(url + "/v1/rotations", json={"account": acc, "reconcile": True}, headers=auth)
    assert r.status_code == 202
    wait_for(lambda: _finished(url, auth, r.json()["id"]), timeout=30, what="reconcile")
    view = httpx.get(f"{url}/v1/rotations/{r.json()['id']}", headers=auth).json()
    assert view["kind"] == "reconcile" and view["state"] == "done"
    assert_invariant(sims, acc, strict=True)


def test_dry_runs_are_not_counted_as_rotations(sims, daemon):
    acc = next(iter(sims.tunnels_by_account))
    url, auth = daemon.admin_url, {"Authorization": f"Bearer {ADMIN}"}
    wait_for(lambda: metric(httpx.get(url + "/metrics").text, "psk_rotator_rotations_total", account=acc,
                            result="rotated") == 6, what="first rotation")
    r = httpx.post(url + "/v1/rotations", json={"account": acc, "all": True, "dry_run": True}, headers=auth)
    wait_for(lambda: _finished(url, auth, r.json()["id"]), timeout=30, what="the dry run")
    text = httpx.get(url + "/metrics").text
    assert metric(text, "psk_rotator_rotations_total", account=acc, result="would_rotate") in (None, 0.0)
    assert metric(text, "psk_rotator_rotations_total", account=acc, result="rotated") == 6
    tunnel = sims.tunnels_by_account[acc][0]
    assert metric(text, "psk_rotator_next_rotation_timestamp_seconds", account=acc, tunnel=tunnel,
                  tunnel_name="tun00001") is not None
    assert_invariant(sims, acc, strict=True)


# -- the CLI next to the daemon (issue 13 item 1) ------------------------------------------------------

def test_cli_hands_rotate_and_reconcile_to_the_leading_daemon(sims, daemon):
    from tests.helpers import run_cli

    acc = next(iter(sims.tunnels_by_account))
    url = daemon.admin_url
    wait_for(lambda: metric(httpx.get(url + "/metrics").text, "psk_rotator_rotations_total", account=acc,
                            result="rotated") == 6, what="first rotation")
    env = {**sims.env(), "ROTATOR_ADMIN_URL": url, "ROTATOR_ADMIN_TOKEN": ADMIN}
    tunnel = sims.tunnels_by_account[acc][0]
    proc = run_cli(["rotate", "--account", acc, "--tunnel", tunnel, "--verbose"], env)
    assert proc.returncode == 0, proc.stderr
    assert "handed to the daemon" in proc.stderr and "leased to" not in proc.stderr
    assert proc.stdout.startswith("Rotation ") and tunnel in proc.stdout and "Summary: 1 rotated" in proc.stdout
    assert metric(httpx.get(url + "/metrics").text, "psk_rotator_rotations_total", account=acc,
                  result="rotated") == 7  # the daemon did it
    proc = run_cli(["reconcile", "--account", acc, "--output", "json"], env)
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"] is True
    proc = run_cli(["rollback", "--account", acc, "--tunnel", tunnel], env)  # back to the key before the last
    assert proc.returncode == 0 and "handed to the daemon" in proc.stderr and proc.stdout.startswith("Rollback ")
    # Same exit code as a local run when a tunnel is not rotated.
    sims.cloudflare.refuse_tunnels([tunnel], stage="validate")
    proc = run_cli(["rotate", "--account", acc, "--tunnel", tunnel], env)
    assert proc.returncode == 1 and "refused" in proc.stdout
    # Without the daemon's lead (or with --local) the CLI runs itself, and meets the lease.
    proc = run_cli(["rotate", "--account", acc, "--tunnel", tunnel, "--local", "--no-wait"], env)
    assert proc.returncode == 1 and "handed" not in proc.stderr
    assert_invariant(sims, acc, strict=True)


# -- safe start-up (issue 13 item 2) ---------------------------------------------------------------

def test_a_taken_admin_port_is_one_line_and_leaves_no_lease(sims, tmp_path):
    import socket

    acc = next(iter(sims.tunnels_by_account))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = write_config(tmp_path, f'[admin]\nlisten = "127.0.0.1:{port}"\n[[accounts]]\nid = "{acc}"\n')
        proc = start_cli(["run", "--config", cfg], {**sims.env(), "ROTATOR_ADMIN_TOKEN": ADMIN})
        out, err = proc.communicate(timeout=60)
    OUTPUTS.extend([out, err])
    assert proc.returncode == 2, err
    assert err.strip() == (f"rotator: configuration error: cannot listen on 127.0.0.1:{port}: address in use "
                           "(set admin.listen to a free HOST:PORT or stop what holds it)")
    assert not (sims.vault.read_data(f"cloudflare/magic-ipsec/_leases/{acc}") or {}).get("holder")
    assert sims.cloudflare.request_counts() == {}


def test_starts_without_vault_and_becomes_ready_when_it_answers(sims, tmp_path):
    acc = next(iter(sims.tunnels_by_account))
    sims.vault.seal()
    d = build_daemon(daemon_config(sims, tmp_path), tick_seconds=1)
    d.start()
    try:
        url = d.admin_url
        assert httpx.get(url + "/healthz").status_code == 200
        r = httpx.get(url + "/readyz")
        assert r.status_code == 503 and "sealed" in r.json()["vault"]
        assert not sims.vault.keys_under(f"cloudflare/magic-ipsec/{acc}/")
        sims.vault.unseal()
        wait_for(lambda: httpx.get(url + "/readyz").status_code == 200, timeout=20, what="ready after unseal")
        assert httpx.get(url + "/readyz").json()["role"] == "leader"
        wait_for(lambda: metric(httpx.get(url + "/metrics").text, "psk_rotator_rotations_total", account=acc,
                                result="rotated") == 6, timeout=20, what="the first rotation")
    finally:
        d.stop()
    assert_invariant(sims, acc, strict=True)


def test_unreachable_vault_at_start_is_not_a_crash(sims, tmp_path):
    acc = next(iter(sims.tunnels_by_account))
    cfg = write_config(tmp_path, f'[admin]\nlisten = "[::1]:0"\n[vault]\ntimeout = 2\n[[accounts]]\nid = "{acc}"\n')
    env = {**sims.env(), "ROTATOR_ADMIN_TOKEN": ADMIN, "VAULT_ADDR": "http://127.0.0.1:9"}
    proc = start_cli(["run", "--config", cfg], env)
    try:
        lines: list[str] = []

        def started():
            lines.append(proc.stdout.readline())
            return '"daemon_started"' in lines[-1]

        wait_for(started, timeout=30, what="daemon_started")
        url = json.loads(lines[-1])["admin"]
        assert url.startswith("http://[::1]:")
        assert httpx.get(url + "/healthz").status_code == 200
        r = httpx.get(url + "/readyz")
        assert r.status_code == 503 and "Vault" in r.json()["vault"]
        assert proc.poll() is None  # still running, retrying with backoff
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=40)
        OUTPUTS.extend(["".join(lines), out, err])
    assert proc.returncode == 0 and "Traceback" not in err + out


def test_a_failed_run_is_logged_at_level_error(sims, tmp_path):
    acc = next(iter(sims.tunnels_by_account))
    stream = io.StringIO()
    configure(Redactor(), stream=stream, json=True)
    try:
        d = build_daemon(daemon_config(sims, tmp_path, extra="[cloudflare]\nretry_attempts = 1\n"), tick_seconds=3600)
        # The start-up check of Cloudflare takes the first failure, the first scheduled run the second.
        sims.cloudflare.fail_next("cf.list", count=2, status=500)
        d.start()
        wait_for(lambda: '"rotation_run"' in stream.getvalue(), timeout=60, what="the failed run's log line")
        d.stop()
    finally:
        structlog.reset_defaults()
    runs = [json.loads(line) for line in stream.getvalue().splitlines() if '"rotation_run"' in line]
    OUTPUTS.append(stream.getvalue())
    assert runs[0]["level"] == "error" and runs[0]["ok"] is False and "500" in runs[0]["error"]
    assert_invariant(sims, acc)


@pytest.mark.parametrize("on_drift", ["rotate", "report"])
def test_a_key_changed_outside_the_rotator_is_counted_shown_and_healed(sims, tmp_path, on_drift):
    acc = next(iter(sims.tunnels_by_account))
    tunnel = sims.tunnels_by_account[acc][1]
    d = build_daemon(daemon_config(sims, tmp_path, on_drift=on_drift), tick_seconds=3600)
    d.start()
    try:
        url, auth = d.admin_url, {"Authorization": f"Bearer {ADMIN}"}
        wait_for(lambda: metric(httpx.get(url + "/metrics").text, "psk_rotator_rotations_total", account=acc,
                                result="rotated") == 6, what="first rotation")
        sims.cloudflare.change_psk_out_of_band(acc, tunnel)  # the dashboard, Terraform or psk_generate
        r = httpx.post(url + "/v1/rotations", json={"account": acc, "reconcile": True}, headers=auth)
        wait_for(lambda: _finished(url, auth, r.json()["id"]), timeout=30, what="the reconcile")
        text = httpx.get(url + "/metrics").text
        assert metric(text, "psk_rotator_drift_detected_total", account=acc) == 1
        status = httpx.get(url + "/v1/status", headers=auth).json()["accounts"][acc]
        if on_drift == "rotate":
            assert sims.cloudflare.psk_of(acc, tunnel) == record(sims, acc, tunnel)["psk"]  # healed from Vault
        else:
            assert status["tunnels"][tunnel]["drifted"] is True and status["summary"]["drifted"] == 1
            assert metric(text, "psk_rotator_tunnel_drifted", account=acc, tunnel=tunnel, tunnel_name="tun00002") == 1
    finally:
        d.stop()
    if on_drift == "rotate":
        assert_invariant(sims, acc, strict=True)


def test_a_manual_device_waits_for_its_ack_and_the_metrics_say_so(sims, tmp_path):
    from tests.helpers import run_cli

    acc = next(iter(sims.tunnels_by_account))
    tunnel, second = sims.tunnels_by_account[acc][:2]
    device = '[[devices]]\nname = "unifi"\nkind = "manual"\ntunnels = ["tun00001", "tun00002"]\n'
    d = build_daemon(daemon_config(sims, tmp_path, extra=device), tick_seconds=3600)
    d.start()
    try:
        url = d.admin_url
        wait_for(lambda: metric(httpx.get(url + "/metrics").text, "psk_rotator_rotations_total", account=acc,
                                result="rotated") == 4, what="the first run")
        text = httpx.get(url + "/metrics").text
        assert metric(text, "psk_rotator_tunnels_waiting_ack", account=acc) == 2
        assert metric(text, "psk_rotator_device_calls_total", device="unifi", action="deliver", result="waiting") == 2
        assert record(sims, acc, tunnel)["state"] == "pending"
        rotation = record(sims, acc, second)["rotation_id"]
        seen = httpx.get(url + "/v1/status", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        row = seen["accounts"][acc]["tunnels"][second]  # what it waits for and the command, as `rotator status`
        assert row["ack_command"] == f"rotator ack --account {acc} --tunnel {second} --rotation {rotation} --holds new"
        assert "new key of rotation" in row["waits_for"]
        # The admin API's ack (issue 20 item 2): one that does not say what the device holds, or names
        # another rotation, is refused with the state and the exact command; nothing is recorded.
        auth = {"Authorization": f"Bearer {ADMIN}"}
        for body, needle in (({"account": acc, "tunnels": ["tun00002"]}, f"--rotation {rotation} --holds new"),
                             ({"account": acc, "tunnels": [second], "holds": "new", "rotation_id": "x"}, "moved on"),
                             ({"account": acc, "tunnels": [second], "holds": "previous"}, "nothing to go back")):
            answer = httpx.post(url + "/v1/acks", json=body, headers=auth)
            assert answer.status_code == 409 and needle in answer.json()["tunnels"][second], answer.text
        assert httpx.post(url + "/v1/acks", json={"account": acc, "tunnels": "tun00002"}, headers=auth).status_code == 400
        assert httpx.post(url + "/v1/acks", json={"account": acc, "tunnels": ["nonesuch"], "holds": "new"},
                          headers=auth).status_code == 400
        assert "acked_rotation_id" not in record(sims, acc, second)
        answer = httpx.post(url + "/v1/acks", json={"account": acc, "tunnels": ["tun00002"], "holds": "new",
                                                   "rotation_id": rotation}, headers=auth)
        assert answer.status_code == 202 and answer.json()["acknowledged"] == [second], answer.text
        run = answer.json()["href"]
        wait_for(lambda: httpx.get(url + run, headers=auth).json()["state"] == "done", what="the reconcile")
        env = {**sims.env(), "ROTATOR_ADMIN_URL": url, "ROTATOR_ADMIN_TOKEN": ADMIN, "ROTATOR_CONFIG": d.settings.source}
        proc = run_cli(["ack", "--account", acc, "--tunnel", "tun00001", "--holds", "new"], env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "handed to the daemon" in proc.stderr and proc.stdout.startswith("Reconcile ")
        text = httpx.get(url + "/metrics").text
        assert metric(text, "psk_rotator_tunnels_waiting_ack", account=acc) == 0
        assert metric(text, "psk_rotator_rotations_total", account=acc, result="rotated") == 6
    finally:
        d.stop()
    assert_invariant(sims, acc, strict=True)


def test_a_due_run_through_the_api_and_the_cli_rotates_only_what_is_due(sims, daemon):
    """Issue 20 item 12: `rotate --due` handed to the leading daemon (POST /v1/rotations {"due": true})."""
    from tests.helpers import run_cli

    acc = next(iter(sims.tunnels_by_account))
    url, auth = daemon.admin_url, {"Authorization": f"Bearer {ADMIN}"}
    wait_for(lambda: metric(httpx.get(url + "/metrics").text, "psk_rotator_rotations_total", account=acc,
                            result="rotated") == 6, what="the first run")
    r = httpx.post(url + "/v1/rotations", json={"account": acc, "due": True}, headers=auth)
    assert r.status_code == 202, r.text
    wait_for(lambda: httpx.get(url + r.json()["href"], headers=auth).json()["state"] == "done")
    view = httpx.get(url + r.json()["href"], headers=auth).json()
    assert view["kind"] == "due" and view["result"]["tunnels"] == []  # nothing is due an hour early
    assert httpx.post(url + "/v1/rotations", json={"account": acc, "due": True, "all": True},
                      headers=auth).status_code == 400
    drifted = sims.tunnels_by_account[acc][3]
    sims.cloudflare.change_psk_out_of_band(acc, drifted)
    env = {**sims.env(), "ROTATOR_ADMIN_URL": url, "ROTATOR_ADMIN_TOKEN": ADMIN, "ROTATOR_CONFIG": daemon.settings.source}
    proc = run_cli(["rotate", "--account", acc, "--due", "--output", "json"], env)
    assert proc.returncode == 0 and "handed to the daemon" in proc.stderr, proc.stdout + proc.stderr
    assert [(t["tunnel_id"], t["result"]) for t in json.loads(proc.stdout)["tunnels"]] == [(drifted, "rotated")]
    assert_invariant(sims, acc, strict=True)
