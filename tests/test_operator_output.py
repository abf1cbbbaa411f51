"""What an operator sees (issue 20 item 11), through the CLI as a subprocess against the simulators:
grouped reasons at scale, totals per device, a next step, nothing cut off in a pipe, and status
telling a key that waits for an operator from a failure. Every test ends with the invariant."""

from __future__ import annotations

import json
import re

import pytest

from rotator.sim import Simulators
from rotator.sim.device import start as start_device
from tests import helpers
from tests.devices.test_end_to_end import both_ends
from tests.helpers import assert_invariant, run_cli, run_on_a_terminal, write_config


@pytest.fixture
def large():
    with Simulators(accounts=1, tunnels=2000) as s:
        yield s
        helpers.remember_secrets(s)


@pytest.mark.long
@pytest.mark.timeout(600)  # 2,000 tunnels through every step against the simulators: about a minute here
def test_2000_tunnels_with_99_refused_on_one_device_read_as_one_line_and_a_next_step(large, tmp_path):
    """Regression: 99 identical rows (cut to the terminal width even in a pipe), no per-device totals,
    no next step. Now: one line with the count, totals per device, the command to run next, and the
    whole reason in a pipe."""
    sims = large
    acc = next(iter(sims.tunnels_by_account))
    ids = sims.tunnels_by_account[acc]
    device = start_device(str(tmp_path), peer=sims.cloudflare.psk_of)
    try:
        # Two devices behind one simulated webhook: tun00001..tun00999 and tun01000..tun02000.
        cfg = write_config(tmp_path, "[cloudflare]\nbatch_size = 100\n" + device.config("branch", ("tun00*",))
                           + device.config("datacenter", ("tun01*", "tun02*")))
        refused = ids[100:199]  # tun00101 .. tun00199, all on "branch"
        device.sim.refuse(refused)
        narrow = {**sims.env(), "COLUMNS": "60"}  # a narrow terminal's width, but the output goes to a pipe
        proc = run_cli(["--config", cfg, "rotate", "--account", acc, "--all"], narrow, timeout=600)
        (tmp_path / "stdout.txt").write_text(proc.stdout)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stdout.splitlines()
        grouped = [ln for ln in lines if ln.startswith("99 tunnels")]
        assert len(grouped) == 1, proc.stdout
        assert "tun00101 … tun00199" in grouped[0] and "refused" in grouped[0] and "branch" in grouped[0]
        assert "sim-device refused the key" in grouped[0] and "…" not in grouped[0].split("refused", 1)[1]
        assert not any(re.match(r"tun00(1[0-9][0-9])\s", ln) for ln in lines)  # no row per refused tunnel
        assert "Device branch: 900 rotated, 99 refused" in lines
        assert "Device datacenter: 1001 rotated" in lines
        assert any(ln.startswith("Summary: 1901 rotated, 99 refused") for ln in lines)
        nexts = [ln for ln in lines if ln.startswith("Next: ")]
        assert len(nexts) == 1 and "99 tunnel(s) kept their current key on both ends" in nexts[0]
        assert "on device branch" in nexts[0] and f"rotator rotate --account {acc} --tunnel {refused[0]}" in nexts[0]
        # --verbose in a pipe: every tunnel, every reason whole.
        device.sim.clear()
        verbose = run_cli(["--config", cfg, "rotate", "--account", acc, "--tunnel", refused[0], "--tunnel",
                           refused[1], "--verbose"], sims.env(), timeout=600)
        assert verbose.returncode == 0 and "Summary: 2 rotated" in verbose.stdout
        status = run_cli(["--config", cfg, "status", "--account", acc, "--state", "failed"], narrow, timeout=600)
        assert status.returncode == 0
        rows = [ln for ln in status.stdout.splitlines() if ln.startswith("tun00")]
        assert len(rows) == 97 and all(ln.endswith("device refused the key: sim-device refused the key")
                                       for ln in rows), status.stdout  # nothing cut in a pipe
    finally:
        device.stop()
        helpers.SECRETS.update(device.sim.keys.values())
    assert both_ends(sims, acc, device.sim, strict=True) == 1903  # 97 refused tunnels were never keyed by us


def test_config_check_prints_every_effective_setting(sims, tmp_path):
    """Regression: cloudflare.retry_timeout, the Vault auth details, a policy's back-off and PSK alphabet
    were not printed. Every field of every settings section appears (secrets masked)."""
    import dataclasses

    from rotator import config

    acc = next(iter(sims.tunnels_by_account))
    text = f'[policies.default]\nevery = "20d"\n[[accounts]]\nid = "{acc}"\n'
    env = {**sims.env(), "ROTATOR_ADMIN_TOKEN": "t" * 32}
    proc = run_cli(["--config", write_config(tmp_path, text), "config", "check"], env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    settings = config.load(write_config(tmp_path, text), env=env)
    renamed = {"token": "api_token", "key": "api_key"}  # cloudflare's, named as their variables
    for section in ("vault", "cloudflare", "rotation", "admin"):
        for f in dataclasses.fields(getattr(settings, section)):
            name = renamed.get(f.name, f.name) if section == "cloudflare" else f.name
            assert name in out[section], f"config check does not print {section}.{f.name}"
    auth = {f"auth_{f.name}" for f in dataclasses.fields(settings.vault.auth)} - {"auth_method"}
    assert auth <= set(out["vault"])
    policy = out["policies"]["default"]
    for f in dataclasses.fields(settings.policies["default"]):
        if f.name not in ("name", "psk"):
            assert f.name in policy, f"config check does not print policies.default.{f.name}"
    assert {"psk_length", "psk_alphabet", "psk_forbidden_first"} <= set(policy)
    assert out["admin"]["token"] == "<set>" and "t" * 32 not in proc.stdout
    assert_invariant(sims, acc, strict=True)


def test_durations_in_messages_are_written_as_in_the_config(sims, tmp_path):
    """Regression: '... (2.592e+06s) is shorter than twice devices[0].timeout (1.728e+06s)'."""
    text = ('[rotation]\nlease_ttl = "30d"\n[[devices]]\nname = "unifi"\nkind = "manual"\n'
            'tunnels = ["tun00001"]\ntimeout = "20d"\n')
    proc = run_cli(["--config", write_config(tmp_path, text), "config", "check"], sims.env())
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "(30d)" in proc.stderr and "(20d)" in proc.stderr and "at least 40d" in proc.stderr
    assert "e+" not in proc.stderr
    assert_invariant(sims, next(iter(sims.tunnels_by_account)), strict=True)


def test_status_counts_a_key_waiting_for_an_ack_as_waiting_not_failed(sims, tmp_path):
    """Regression: a manual device's key waiting for its acknowledgement counted as failed in status."""
    acc = next(iter(sims.tunnels_by_account))
    assert run_cli(["rotate", "--account", acc, "--all"], sims.env()).returncode == 0  # every key in Vault first
    cfg = write_config(tmp_path, '[[devices]]\nname = "unifi"\nkind = "manual"\ntunnels = ["tun00001"]\n')
    proc = run_cli(["--config", cfg, "rotate", "--account", acc, "--all"], sims.env())
    assert proc.returncode == 1 and "waiting" in proc.stdout
    nexts = [ln for ln in proc.stdout.splitlines() if ln.startswith("Next: ")]
    assert len(nexts) == 1 and f"rotator status --account {acc} --state waiting" in nexts[0]
    assert re.search(rf"rotator ack --account {acc} --tunnel \w+ --rotation \S+ --holds new", proc.stdout)
    status = run_cli(["--config", cfg, "status", "--account", acc, "--output", "json"], sims.env())
    summary = json.loads(status.stdout)["summary"]
    assert (summary["waiting"], summary["failed"], summary["pending"]) == (1, 0, 1)
    [row] = [t for t in json.loads(status.stdout)["tunnels"] if t["name"] == "tun00001"]
    assert row["waiting"] is True and row["failed"] is False
    text = run_cli(["--config", cfg, "status", "--account", acc, "--state", "waiting"], sims.env())
    assert text.returncode == 0 and "tun00001" in text.stdout
    [line] = [ln for ln in text.stdout.splitlines() if ln.startswith("Summary: ")]
    assert "1 waiting" in line and "failed" not in line
    assert_invariant(sims, acc)  # one key in flight, as asked


def test_progress_goes_to_stderr_in_json_mode_and_a_reconcile_counts_what_it_reconciles(sims, tmp_path):
    """Regression: no progress at all with --output json; a reconcile of 2 pending keys counted to 6/6."""
    acc = next(iter(sims.tunnels_by_account))
    cfg = write_config(tmp_path, "[cloudflare]\nretry_attempts = 1\n")
    assert run_cli(["--config", cfg, "rotate", "--account", acc, "--all"], sims.env()).returncode == 0
    code, out, tty = run_on_a_terminal(["--config", cfg, "rotate", "--account", acc, "--all", "--output", "json"],
                                    sims.env())
    assert code == 0 and json.loads(out)["counts"]["rotated"] == 6  # stdout is the JSON alone
    assert "listing tunnels" in tty and "6/6 tunnels" in tty
    sims.cloudflare.fail_next("cf.psk_apply", count=1, status=500)  # no answer: the keys stay pending
    proc = run_cli(["--config", cfg, "rotate", "--account", acc, "--tunnel", "tun00001", "--tunnel", "tun00002"],
                   sims.env())
    assert proc.returncode == 1 and "rotator reconcile --account" in proc.stdout, proc.stdout + proc.stderr
    assert_invariant(sims, acc)
    code, out, tty = run_on_a_terminal(["--config", cfg, "reconcile", "--account", acc], sims.env())
    assert code == 0, out
    assert "2/2 tunnels" in tty and "/6 tunnels" not in tty
    assert_invariant(sims, acc, strict=True)


def test_the_admin_root_lists_its_routes(sims, tmp_path):
    """Regression: GET / was a bare 404. It lists every route the app serves, none left out."""
    import httpx

    from rotator import config
    from rotator.service.daemon import build_daemon

    acc = next(iter(sims.tunnels_by_account))
    text = f'[admin]\nlisten = "127.0.0.1:0"\n[policies.default]\nevery = "1h"\n[[accounts]]\nid = "{acc}"\n'
    d = build_daemon(config.load(write_config(tmp_path, text), env={**sims.env(), "ROTATOR_ADMIN_TOKEN": "r" * 32}),
                     tick_seconds=3600)
    d.start()
    try:
        answer = httpx.get(d.admin_url + "/")
        assert answer.status_code == 200
        listed = {(r["method"], r["path"]) for r in answer.json()["routes"]}
        served = {(m, route.path) for route in d._server.server.config.app.routes for m in route.methods - {"HEAD"}}
        assert listed == served
        assert all(r["token"] == r["path"].startswith("/v1/") for r in answer.json()["routes"])
        d.tick()
    finally:
        d.stop()
    assert_invariant(sims, acc, strict=True)


def test_the_dashboard_counts_what_the_alerts_count_and_shows_devices_drift_and_acks():
    """Regression: the failure panel left out ``failed`` and ``rolled_back``, which the alerts count, and
    there was no panel for far-end devices, drift or keys waiting for an ack."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    dash = json.loads((root / "config" / "grafana" / "psk-rotator-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]

    def counted(text: str) -> set[str]:
        found: set[str] = set()
        for matcher in re.findall(r'psk_rotator_rotations_total\{result(=~?)"([^"]+)"\}', text):
            found |= set(matcher[1].split("|"))
        return found

    alerts = (root / "config" / "prometheus" / "alerts.yml").read_text()
    assert {"failed", "rolled_back"} <= counted(alerts) <= counted("\n".join(exprs))
    for metric in ("psk_rotator_device_calls_total", "psk_rotator_device_call_duration_seconds_bucket",
                   "psk_rotator_tunnel_drifted", "psk_rotator_drift_detected_total", "psk_rotator_tunnels_waiting_ack",
                   'psk_rotator_runs_total{ok="false"}'):
        assert any(metric in e for e in exprs), f"no dashboard panel shows {metric}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    boxes = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in dash["panels"]]
    assert len(boxes) == len(set(boxes))  # no panel on top of another
