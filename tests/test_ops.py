"""Operations artefacts with the real tools: promtool, Prometheus, hadolint, the container's install steps."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import OUTPUTS, start_cli, wait_for

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "config" / "prometheus"


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: CI must install it (.ci/run)")
        pytest.skip(f"{name} not installed")
    return path


def test_alert_rules_pass_their_promtool_unit_tests():
    proc = subprocess.run([tool("promtool"), "test", "rules", str(PROM / "alerts_test.yml")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_unit_test_and_a_runbook_section():
    rules = re.findall(r"alert: (\w+)", (PROM / "alerts.yml").read_text())
    tested = set(re.findall(r"alertname: (\w+)", (PROM / "alerts_test.yml").read_text()))
    assert len(rules) == 13 and set(rules) <= tested
    readme = (ROOT / "README.md").read_text().lower()
    for anchor in set(re.findall(r"#(runbook-[a-z-]+)", (PROM / "alerts.yml").read_text())):
        assert "### " + anchor.replace("-", " ") in readme.replace("-", " ").replace(":", ""), anchor


def test_prometheus_config_is_valid():
    proc = subprocess.run([tool("promtool"), "check", "config", str(PROM / "prometheus.yml")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_queries_only_exported_metrics():
    from prometheus_client import CollectorRegistry

    from rotator.service.metrics import Metrics

    registry = CollectorRegistry()
    Metrics(registry)
    exported = {m.name for m in registry.collect()}
    exported |= {n + "_total" for n in exported} | {n + "_bucket" for n in exported}
    dash = json.loads((ROOT / "config" / "grafana" / "psk-rotator-dashboard.json").read_text())
    used = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"psk_rotator_[a-z_]+", target["expr"]))
    assert used and used <= exported, used - exported


def test_dockerfile_is_hadolint_clean():
    proc = subprocess.run([tool("hadolint"), "--failure-threshold", "warning", str(ROOT / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.long
@pytest.mark.timeout(300)  # 22 packages from the local index: CPU-bound, longer when the machine is busy
def test_container_install_steps_work_in_a_venv(tmp_path):
    """The Dockerfile's build stage, without a Docker engine: a venv, the lock installed with
    --require-hashes (every hash must match what the index serves), the project with --no-deps, the
    entrypoint."""
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["rotator"]' in text and 'CMD ["run"]' in text and "USER 10001" in text
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    # Without a pip of its own (ensurepip costs seconds of CPU): this suite's pip installs into it.
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    # --no-compile: byte-compiling every installed module is most of the CPU and proves nothing here.
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
           "--disable-pip-version-check", "--no-compile"]
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    for args in (["--require-hashes", "-r", str(ROOT / "requirements.lock")], ["--no-deps", str(ROOT)]):
        proc = subprocess.run([*pip, *args], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
    out = subprocess.run([str(venv / "bin" / "rotator"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "rotate" in out.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A real Prometheus (Debian's binary) on a free loopback port, its own storage under ``workdir``,
    scraping ``target`` (HOST:PORT) every second with ``rules`` (the text of a rules file)."""

    def __init__(self, workdir: Path, target: str, rules: str) -> None:
        (workdir / "alerts.yml").write_text(rules)
        (workdir / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - alerts.yml\n"
            f"scrape_configs:\n  - job_name: psk-rotator\n    static_configs:\n      - targets: ['{target}']\n")
        port = _free_port()
        self.api = f"http://127.0.0.1:{port}/api/v1"
        self.process = subprocess.Popen([tool("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
                                         f"--storage.tsdb.path={workdir / 'data'}",
                                         f"--web.listen-address=127.0.0.1:{port}"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def query(self, expr: str) -> list:
        try:
            return httpx.get(f"{self.api}/query", params={"query": expr}, timeout=5).json()["data"]["result"]
        except (httpx.HTTPError, ValueError, KeyError):
            return []

    def alerts(self, name: str) -> list:
        try:
            alerts = httpx.get(f"{self.api}/alerts", timeout=5).json()["data"]["alerts"]
        except (httpx.HTTPError, ValueError, KeyError):
            return []
        return [a for a in alerts if a["labels"]["alertname"] == name]

    def firing(self, name: str, **labels: str) -> bool:
        return any(a["state"] == "firing" and all(a["labels"].get(k) == v for k, v in labels.items())
                   for a in self.alerts(name))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)


@pytest.mark.long
def test_real_prometheus_scrapes_the_demo_and_alerts_fire(tmp_path):
    tool("prometheus")
    demo = start_cli(["demo", "--listen", "127.0.0.1:0"], {})
    prom = None
    try:
        ready = json.loads(demo.stdout.readline())
        admin = ready["admin_url"]
        prom = Prometheus(tmp_path, admin.removeprefix("http://"), (PROM / "alerts.yml").read_text())
        query = prom.query
        wait_for(lambda: query('up{job="psk-rotator"} == 1'), timeout=60, what="Prometheus scraping the demo")
        wait_for(lambda: query('sum(psk_rotator_rotations_total{result="rotated"}) > 0'), timeout=60,
                 what="rotation metrics in Prometheus")
        # Inject a fault: Cloudflare refuses every tunnel of one account at validation.
        sim_root = ready["simulators"]["cloudflare"].removesuffix("/client/v4")
        state = httpx.get(sim_root + "/_sim/state").json()["result"]
        acc = ready["accounts"][0]
        httpx.post(sim_root + "/_sim/control", json={"op": "refuse_tunnels", "tunnel_ids": list(state["accounts"][acc]),
                                                     "stage": "validate", "reason": "injected by the test"})

        wait_for(lambda: prom.firing("PskRotationFailing", account=acc), timeout=90, what="PskRotationFailing firing")
        httpx.post(ready["simulators"]["vault"] + "/_sim/control", json={"op": "seal"})
        wait_for(lambda: any(a["state"] in ("pending", "firing") for a in prom.alerts("PskRotatorVaultUnreachable")),
                 timeout=90, what="PskRotatorVaultUnreachable pending")
    finally:
        if prom is not None:
            prom.stop()
        demo.terminate()
        out, err = demo.communicate(timeout=40)
        OUTPUTS.extend([out, err])
    assert demo.returncode == 0, err[-2000:]


# -- one view of a tunnel, and device metrics ------------------------------------------------------

def test_assess_is_the_one_rule_for_state_drift_and_due():
    from rotator.model import Record, TunnelInfo
    from rotator.schedule import Policy
    from rotator.secret import Secret
    from rotator.service.inventory import assess, summary

    policy = Policy("default", every=3600.0)
    now = 1_800_000_000.0
    t = TunnelInfo("a" * 32, "site-1", last_generated_on="2027-01-15T08:00:00Z")
    unmanaged = assess(policy, t, Record("b" * 32, t.id), now)
    assert unmanaged.state == "unmanaged" and unmanaged.next_due == now  # not in Vault yet: due now
    ours = Record("b" * 32, t.id, 3, psk=Secret("k" * 32), rotated_at="2027-01-15T07:59:58Z",
                  cf_generated_on="2027-01-15T07:59:59Z")
    drifted = assess(policy, t, ours, now)
    assert drifted.state == "active" and drifted.drifted and drifted.matches("drifted") and drifted.attention
    ours.cf_generated_on = "2027-01-15T08:00:00Z"
    view = assess(policy, t, ours, now)
    assert view.state == "active" and not view.drifted and view.next_due is not None
    ours.pending_psk, ours.state, ours.last_error = Secret("n" * 32), "pending", "apply outcome unknown"
    view = assess(policy, t, ours, now)
    assert view.matches("pending") and view.matches("failed") and view.attention
    never = Policy("never", cron="0 0 31 2 *")
    assert assess(never, t, ours, now).next_due is None  # a schedule that never fires is never due
    assert assess(policy, t, ValueError("garbage from Vault"), now).state == "error"
    counts = summary([view, unmanaged])
    assert counts["tunnels"] == 2 and counts["pending"] == 1 and counts["unmanaged"] == 1


def test_device_calls_are_counted_and_timed_per_tunnel():
    from prometheus_client import CollectorRegistry

    from rotator.adapters.devices._common import DeviceBase
    from rotator.rotation.ports import DeviceResult, DeviceStatus, DeviceTunnel
    from rotator.secret import Secret
    from rotator.service.metrics import MeasuredDevice, Metrics

    class Device(DeviceBase):
        name, kind = "branch", "exec"

        def deliver(self, account_id, rotation_id, tunnels, *, deadline):
            return {tunnels[0].tunnel_id: DeviceResult(DeviceStatus.OK),
                    tunnels[1].tunnel_id: DeviceResult(DeviceStatus.FAILED, "refused")}

        verify = rollback = deliver

    registry = CollectorRegistry()
    device = MeasuredDevice(Device(), Metrics(registry))
    tunnels = [DeviceTunnel(f"{i}" * 32, f"t{i}", Secret("k" * 32), None) for i in range(3)]
    results = device.deliver("a" * 32, "r1", tunnels, deadline=0.0)
    assert len(results) == 2 and device.name == "branch"

    def sample(result):
        return registry.get_sample_value("psk_rotator_device_calls_total",
                                         {"device": "branch", "action": "deliver", "result": result})

    assert (sample("ok"), sample("failed"), sample("unknown")) == (1.0, 1.0, 1.0)  # a tunnel not answered: unknown
    assert registry.get_sample_value("psk_rotator_device_call_duration_seconds_count",
                                     {"device": "branch", "action": "deliver"}) == 1.0


def test_the_metrics_wrapper_keeps_what_the_engine_reads_from_a_device():
    """Wiring wraps every device to count its calls; the engine still sees the device's own timeout,
    verify setting and ack timeout (a wrapper that hid them turned a 10 s device into a 60 s one, and
    a 30 s lease then refused every delivery)."""
    from prometheus_client import CollectorRegistry

    from rotator.adapters.devices.manual import ManualDevice
    from rotator.service.metrics import MeasuredDevice, Metrics

    wrapped = MeasuredDevice(ManualDevice("desk", ack_timeout=120.0, timeout=10.0), Metrics(CollectorRegistry()))
    assert (wrapped.name, wrapped.kind) == ("desk", "manual")
    assert (wrapped.timeout, wrapped.verifies, wrapped.ack_timeout) == (10.0, False, 120.0)


# -- CI hygiene --------------------------------------------------------------------------------------

def test_ci_stops_only_the_debian_prometheus_service(tmp_path):
    """.ci/run stops the Prometheus Debian's package started (its unit, init script or pid file) and no
    other: a Prometheus of someone else's, named the same, survives (`pkill -x prometheus` ended it)."""
    script = ROOT / ".ci" / "stop-system-prometheus"
    for path in (ROOT / ".ci" / "run", script):
        commands = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
        assert not any(re.search(r"\b(pkill|killall)\b", ln) for ln in commands), f"{path.name} stops by name"
    assert str(script.relative_to(ROOT)) in (ROOT / ".ci" / "run").read_text()
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name in ("systemctl", "service"):  # no init system here: the pid file is what is left
        (stubs / name).write_text("#!/bin/sh\nexit 1\n")
        (stubs / name).chmod(0o755)
    binary = tmp_path / "prometheus"  # two processes named prometheus: the service's and someone else's
    shutil.copy(shutil.which("sleep") or "/bin/sleep", binary)
    theirs = subprocess.Popen([str(binary), "300"])
    service = subprocess.Popen([str(binary), "300"])
    try:
        pidfile = tmp_path / "prometheus.pid"
        pidfile.write_text(f"{service.pid}\n")
        env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "PROMETHEUS_PIDFILE": str(pidfile),
               "PROMETHEUS_BIN": str(binary)}
        proc = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert service.wait(timeout=30) is not None  # the service's process is gone
        assert theirs.poll() is None  # the other one still runs
        again = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr  # nothing left to stop: still fine
        assert theirs.poll() is None
    finally:
        for p in (theirs, service):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
