"""What the daemon tells people: its metrics as Prometheus sees them, the alerts on them, and its status
API next to the CLI's (issue 20, items 7 and 8). Simulators over loopback, a simulated webhook device,
and a real Prometheus (Debian's binary) where the alerts are the question."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rotator.model import Outcome
from rotator.rotation.ports import DeviceStatus
from rotator.service.daemon import Daemon, build_daemon
from rotator.sim import Simulators
from rotator.sim.device import DeviceSim
from rotator.sim.device import start as start_device
from tests import helpers
from tests.devices.test_end_to_end import both_ends
from tests.helpers import wait_for
from tests.test_daemon import ADMIN, _finished, daemon_config, metric
from tests.test_ops import PROM, Prometheus, tool

AUTH = {"Authorization": f"Bearer {ADMIN}"}
# Labels whose values the daemon knows at start; the others (account, device, tunnel) are the config's.
ENUMERATED = {"result", "ok", "trigger", "action", "status", "endpoint"}


@dataclass
class Fleet:
    sims: Simulators
    daemon: Daemon
    device: DeviceSim
    account: str

    @property
    def url(self) -> str:
        assert self.daemon.admin_url is not None
        return self.daemon.admin_url

    def tunnel(self, i: int) -> str:
        return self.sims.tunnels_by_account[self.account][i]

    def run(self, **body: Any) -> dict[str, Any]:
        """An on-demand run through the admin API, waited for (bounded); its view."""
        r = httpx.post(self.url + "/v1/rotations", json={"account": self.account, **body}, headers=AUTH)
        assert r.status_code == 202, r.text
        wait_for(lambda: _finished(self.url, AUTH, r.json()["id"]), timeout=60, what="the run")
        view: dict[str, Any] = httpx.get(self.url + r.json()["href"], headers=AUTH).json()
        return view


@pytest.fixture
def fleet(sims, tmp_path) -> Iterator[Fleet]:
    """A fresh daemon leading one account of six tunnels, all on one webhook device, after its first run."""
    acc = next(iter(sims.tunnels_by_account))
    device = start_device(str(tmp_path), peer=sims.cloudflare.psk_of)
    d = build_daemon(daemon_config(sims, tmp_path, extra=device.config("site", timeout="3s")), tick_seconds=3600)
    d.start()
    try:
        wait_for(lambda: metric(httpx.get(d.admin_url + "/metrics").text, "psk_rotator_rotations_total",
                                account=acc, result="rotated") == 6, timeout=60, what="the first run")
        yield Fleet(sims, d, device.sim, acc)
    finally:
        d.stop()
        device.stop()
        helpers.SECRETS.update(device.sim.keys.values())


def _samples(exposition: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(exposition)
            for s in family.samples]


# -- item 7: every label set known at start is exported at 0 ------------------------------------------

def test_a_fresh_daemon_exports_every_known_label_set_at_zero(sims, tmp_path):
    """Before anything happened: a counter series that first appears at 1 gives increase() nothing to
    increase from, so the first failure after a restart would never alert."""
    d = build_daemon(daemon_config(sims, tmp_path, extra='[[devices]]\nname = "desk"\nkind = "manual"\n'
                                                         'tunnels = ["tun00001"]\n'), tick_seconds=3600)
    try:
        samples = {(n, tuple(sorted(labels.items()))): v for n, labels, v in
                   _samples(generate_latest(d.metrics.registry).decode())}
    finally:
        d.runtime.close()
    acc = next(iter(sims.tunnels_by_account))

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted(labels.items()))))

    for result in Outcome:
        assert value("psk_rotator_rotations_total", account=acc, result=str(result)) == 0, result
    for trigger in ("schedule", "api"):
        for ok in ("true", "false"):
            assert value("psk_rotator_runs_total", account=acc, trigger=trigger, ok=ok) == 0
    assert value("psk_rotator_drift_detected_total", account=acc) == 0
    for action in ("deliver", "verify", "rollback"):
        for status in DeviceStatus:
            assert value("psk_rotator_device_calls_total", device="desk", action=action, result=str(status)) == 0
    assert value("psk_rotator_cloudflare_requests_total", endpoint="psk_apply", status="429") == 0
    for gauge in ("psk_rotator_tunnels_pending", "psk_rotator_tunnels_waiting_ack", "psk_rotator_leader",
                  "psk_rotator_partner_down_tunnels"):
        assert value(gauge, account=acc) == 0, gauge


def test_the_alert_unit_tests_model_what_a_fresh_daemon_exposes(sims, tmp_path):
    """Every psk_rotator_ counter series config/prometheus/alerts_test.yml starts at 0 is one a fresh
    daemon exports at 0 (same label names; the same value for labels known at start). A series modelled
    '_' first is one the daemon does not export before it happens."""
    d = build_daemon(daemon_config(sims, tmp_path, extra='[[devices]]\nname = "branch"\nkind = "manual"\n'
                                                         'tunnels = ["tun00001"]\n'), tick_seconds=3600)
    try:
        exposed = [(n, labels) for n, labels, v in _samples(generate_latest(d.metrics.registry).decode())
                   if v == 0 and n.endswith("_total")]
    finally:
        d.runtime.close()
    doc = yaml.safe_load((PROM / "alerts_test.yml").read_text())
    checked = 0
    for case in doc["tests"]:
        for series in case["input_series"]:
            m = re.fullmatch(r"(\w+)\{(.*)\}", series["series"])
            assert m, series
            name, labels = m[1], dict(re.findall(r'(\w+)="([^"]*)"', m[2]))
            labels.pop("instance", None)
            if not (name.startswith("psk_rotator_") and name.endswith("_total")):
                continue
            first = str(series["values"]).split()[0]
            match = any(n == name and set(got) == set(labels)
                        and all(got[k] == v for k, v in labels.items() if k in ENUMERATED) for n, got in exposed)
            if first.startswith("0"):
                checked += 1
                assert match, f"{series['series']} starts at 0 in the alert tests; a fresh daemon does not export it"
            else:
                assert first.startswith("_"), series
    assert checked >= 10


def test_real_prometheus_sees_the_first_rollback_failure_and_drift_after_a_start(fleet, tmp_path):
    """A fresh daemon, scraped by a real Prometheus: the first failed run, the first rollback and the first
    drift after the start each fire their alert. The rules file is the shipped one with every `for:`
    shortened to 0s (the `for:` durations are a contract and stay as shipped; PskRotationFailing,
    PskRotationRolledBack, PskKeyChangedOutsideRotator and PskDeviceFailing have `for: 0m` anyway)."""
    tool("prometheus")
    rules = re.sub(r"(\n\s+for: )\S+", r"\g<1>0s", (PROM / "alerts.yml").read_text())
    prom = Prometheus(tmp_path, fleet.url.removeprefix("http://"), rules)
    acc = fleet.account
    try:
        # Prometheus holds the zeros from before anything failed (absent on a daemon that exports a label
        # set only when first used).
        for expr in (f'psk_rotator_rotations_total{{account="{acc}", result="rolled_back"}} == 0',
                     f'psk_rotator_runs_total{{account="{acc}", trigger="api", ok="false"}} == 0',
                     f'psk_rotator_drift_detected_total{{account="{acc}"}} == 0'):
            wait_for(lambda e=expr: prom.query(e), timeout=60, what=f"Prometheus scraping {expr}")
        assert not prom.alerts("PskRotationFailing") and not prom.alerts("PskRotationRolledBack")

        # The first failed run: Cloudflare refuses a tunnel at validation.
        fleet.sims.cloudflare.refuse_tunnels([fleet.tunnel(0)], stage="validate", reason="injected")
        view = fleet.run(tunnels=[fleet.tunnel(0)])
        assert [t["result"] for t in view["result"]["tunnels"]] == ["refused"]
        wait_for(lambda: prom.firing("PskRotationFailing", account=acc), timeout=60, what="PskRotationFailing")
        fleet.sims.cloudflare.clear_refusals()

        # The first rollback: the device cannot bring the tunnel up on the new key.
        fleet.device.fail_verify([fleet.tunnel(1)])
        view = fleet.run(tunnels=[fleet.tunnel(1)])
        assert [t["result"] for t in view["result"]["tunnels"]] == ["rolled_back"]
        wait_for(lambda: prom.firing("PskRotationRolledBack", account=acc), timeout=60,
                 what="PskRotationRolledBack")
        wait_for(lambda: prom.firing("PskDeviceFailing", device="site", action="verify"), timeout=60,
                 what="PskDeviceFailing")
        with fleet.device.lock:
            fleet.device.failing_verify.clear()

        # The first drift: a key set outside the rotator, found and healed by a reconcile.
        fleet.sims.cloudflare.change_psk_out_of_band(acc, fleet.tunnel(2))
        fleet.run(reconcile=True)
        wait_for(lambda: prom.firing("PskKeyChangedOutsideRotator", account=acc), timeout=60,
                 what="PskKeyChangedOutsideRotator")
    finally:
        prom.stop()
    both_ends(fleet.sims, acc, fleet.device)
    fleet.run(reconcile=True)
    both_ends(fleet.sims, acc, fleet.device, strict=True)


# -- item 8: one view of a tunnel, the CLI's and the daemon's --------------------------------------------

def test_the_status_api_shows_each_tunnel_as_the_cli_does(fleet):
    """`GET /v1/status` showed device, rotation_id and ipsec_id as null where `rotator status` showed
    them. After a clean run and a refused one, both say the same of every tunnel. (A rolled-back tunnel
    is left out until a rollback's apply records what Cloudflare answered: issue 20, item 6.)"""
    acc = fleet.account
    fleet.sims.cloudflare.refuse_tunnels([fleet.tunnel(1)], stage="validate", reason="injected")
    assert [t["result"] for t in fleet.run(tunnels=[fleet.tunnel(1)])["result"]["tunnels"]] == ["refused"]
    fleet.sims.cloudflare.clear_refusals()
    env = {**fleet.sims.env(), "ROTATOR_CONFIG": fleet.daemon.settings.source}
    proc = helpers.run_cli(["status", "--account", acc, "--output", "json"], env)
    assert proc.returncode == 0, proc.stderr
    cli_doc = json.loads(proc.stdout)
    cli = {t["tunnel_id"]: t for t in cli_doc["tunnels"]}
    api_doc = httpx.get(fleet.url + "/v1/status", headers=AUTH).json()["accounts"][acc]
    api = api_doc["tunnels"]
    assert set(api) == set(cli) == set(fleet.sims.tunnels_by_account[acc])
    for tid, seen in cli.items():
        assert seen["device"] == "site" and seen["rotation_id"], seen
        # The clock moved between the two looks; the daemon also remembers failures (its back-off), which
        # a one-shot command cannot know.
        skip = {"psk_age_seconds"} | ({"consecutive_failures", "next_due"} if tid == fleet.tunnel(1) else set())
        assert {k: v for k, v in api[tid].items() if k not in skip} == \
            {k: v for k, v in seen.items() if k not in skip}, tid
        assert abs(api[tid]["psk_age_seconds"] - seen["psk_age_seconds"]) <= 5
    assert api[fleet.tunnel(1)]["consecutive_failures"] == 1 and api[fleet.tunnel(1)]["failed"] is True
    assert api_doc["summary"] == cli_doc["summary"]
    both_ends(fleet.sims, acc, fleet.device, strict=True)
