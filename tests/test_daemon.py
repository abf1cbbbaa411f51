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
from tests.helpers import OUTPUTS, assert_invariant, start_cli, wait_for, write_config

ADMIN = "a" * 32


def daemon_config(sims, tmp_path, extra="", lease_ttl="60s"):
    accounts = "".join(f'[[accounts]]\nid = "{a}"\n' for a in sims.tunnels_by_account)
    text = (f'[admin]\nlisten = "127.0.0.1:0"\n[rotation]\nlease_ttl = "{lease_ttl}"\n'
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
        assert all(st.next_due > time.time() + 3000 for st in b.tunnels[acc].values())
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
