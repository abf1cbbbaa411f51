"""`rotator demo` as the README's first command: it starts, rotates, its printed instructions work, and
the keys reach the far end: the simulated device holds the record's psk, as Cloudflare does."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
from typing import Any

import httpx
import pytest

from rotator.sim.ike import unavailable
from tests.helpers import OUTPUTS, PREFIX, SECRETS, start_cli, wait_for
from tests.ike.conftest import require_lab


def _fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _read_instructions(proc: subprocess.Popen[str]) -> tuple[dict[str, Any], str]:
    """The ready line, then the text up to 'Ctrl-C stops it.' (bounded: the demo prints ~20 lines)."""
    ready = json.loads(proc.stdout.readline())
    lines: list[str] = []
    for _ in range(60):
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("Ctrl-C"):
            break
    return ready, "\n".join(lines)


def _stop(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """Ctrl-C, as a user stops the demo; killed if it does not end within ``timeout``."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        return out, err + f"\nthe demo did not stop within {timeout} s of Ctrl-C"


def _ends(ready: dict[str, Any], device_state_url: str) -> dict[str, dict[str, tuple[str | None, ...]]]:
    """Per account and tunnel: (record psk fingerprint, pending?, record device, Cloudflare's, the device's)."""
    vault = ready["simulators"]["vault"]
    cf_root = ready["simulators"]["cloudflare"].removesuffix("/client/v4")
    cloudflare = httpx.get(cf_root + "/_sim/state").json()["result"]["accounts"]
    device = httpx.get(device_state_url).json()["result"]["tunnels"]
    out: dict[str, dict[str, tuple[str | None, ...]]] = {}
    for acc in ready["accounts"]:
        out[acc] = {}
        for tid, tunnel in cloudflare[acc].items():
            rec = httpx.post(vault + "/_sim/control", json={"op": "read_data", "path": f"{PREFIX}/{acc}/{tid}"}) \
                .json()["result"] or {}
            SECRETS.update(k for k in (rec.get("psk"), rec.get("pending_psk"), tunnel["psk"]) if k)
            out[acc][tid] = (rec.get("psk") and _fingerprint(rec["psk"]), "pending" if rec.get("pending_psk") else None,
                             rec.get("device"), tunnel["psk"] and _fingerprint(tunnel["psk"]),
                             device.get(f"{acc}/{tid}"))
    return out


@pytest.mark.long
def test_demo_rotates_both_ends_and_its_instructions_work() -> None:
    proc = start_cli(["demo", "--listen", "127.0.0.1:0"], {})
    text, ready = "", {}
    try:
        ready, text = _read_instructions(proc)
        metrics = ready["metrics_url"]
        far_end = ready["far_end"]
        device_acc = far_end["account"]
        aws_acc = ready["aws"]["account"]
        (plain_acc,) = [a for a in ready["accounts"] if a not in (device_acc, aws_acc)]

        # The printed "Device : curl -s URL" is where a newcomer watches the far end's keys.
        device_url = shlex.split(text.split("Device    :", 1)[1].split("(", 1)[0])[-1]
        assert device_url == far_end["state_url"] and httpx.get(device_url).status_code == 200

        def rotated() -> float:
            text = httpx.get(metrics).text
            return sum(float(v) for v in re.findall(r'psk_rotator_rotations_total\{[^}]*result="rotated"\} (\S+)', text))

        wait_for(lambda: rotated() >= 8, timeout=30, what="the demo's first rotations")
        assert ("rotator demo --ike" in text) == (unavailable() is None), "the hint shows only where the lab can run"

        def settled() -> dict[str, dict[str, tuple[str | None, ...]]] | None:
            """Both ends of every tunnel of the device's account hold the record's psk (nothing pending);
            the other account's tunnels hold it at Cloudflare and the device knows nothing of them."""
            ends = _ends(ready, device_url)
            with_device = all(rec and not pending and dev_name == far_end["device"] and rec == cf == dev
                              for rec, pending, dev_name, cf, dev in ends[device_acc].values())
            without = all(rec and not pending and dev_name is None and rec == cf and dev is None
                          for rec, pending, dev_name, cf, dev in ends[plain_acc].values())
            # the AWS account: both ends (Cloudflare and the AWS tunnel by its outside address) on the psk
            aws_state = httpx.get(ready["aws"]["state_url"]).json()["result"]["connections"]
            aws_keys = {ip: t["key"] for c in aws_state.values() for ip, t in c["tunnels"].items()}
            cf_state = httpx.get(ready["simulators"]["cloudflare"].removesuffix("/client/v4") + "/_sim/state")
            endpoints = {tid: t.get("customer_endpoint") for tid, t in cf_state.json()["result"]["accounts"][aws_acc].items()}
            on_aws = all(rec and not pending and dev_name == "demo-aws" and rec == cf == aws_keys.get(endpoints[tid])
                         for tid, (rec, pending, dev_name, cf, _) in ends[aws_acc].items())
            return ends if with_device and without and on_aws else None

        wait_for(lambda: settled() is not None, timeout=60, what="both ends holding the record's psk")
        before = settled()
        assert before is not None

        # "Rotate now: curl -s -X POST -H "Authorization: Bearer $(cat FILE)" -d 'BODY' URL"
        command = text.split("Rotate now:", 1)[1].split("Status", 1)[0].replace("\\\n", " ")
        args = shlex.split(command)
        token_file = re.search(r"\$\(cat (\S+)\)", command).group(1)  # type: ignore[union-attr]
        with open(token_file) as fh:
            token = fh.read().strip()
        body = json.loads(args[args.index("-d") + 1])
        assert body["account"] == device_acc
        r = httpx.post(args[-1], json=body, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 202
        run = r.json()["href"]
        wait_for(lambda: httpx.get(ready["admin_url"] + run, headers={"Authorization": f"Bearer {token}"})
                 .json()["state"] == "done")

        # The run rotated the device's account: new keys, delivered to the device, applied, agreed.
        def rotated_again() -> bool:
            after = settled()
            return after is not None and all(after[device_acc][t][0] != before[device_acc][t][0]
                                             for t in before[device_acc])

        wait_for(rotated_again, timeout=30, what="the requested rotation reaching the device")
        assert token not in text and token not in json.dumps(ready)
    finally:
        out, err = _stop(proc, 40)
        OUTPUTS.extend([text, json.dumps(ready), out, err])
    assert proc.returncode == 0 and "Traceback" not in err
    assert not os.path.exists(os.path.dirname(token_file)), "the demo removes its temporary directory"
    # Once every tunnel had rotated, the demo wrote each account's audit report (README "Audit evidence").
    written = re.findall(r"psk-report-([0-9a-f]{32})-\d{8}T\d{6}Z-\d{8}T\d{6}Z\.(json|html)", out)
    assert sorted(written) == sorted((a, f) for a in ready["accounts"] for f in ("json", "html"))


def _sas(command: str) -> dict[str, tuple[str, bool]]:
    """Tunnel name -> (IKE SA unique id, established with an installed CHILD_SA) from the printed
    ``swanctl --list-sas`` command, run as printed."""
    out = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=20).stdout
    sas: dict[str, tuple[str, bool]] = {}
    current = ""
    for line in out.splitlines():
        ike = re.match(r"^(\S+): #(\d+), (\w+), IKEv2", line)
        if ike:
            current = ike.group(1)
            if sas.get(current, ("", False))[1]:
                current = ""  # keep the established SA when an old one lingers (make-before-break)
                continue
            sas[current] = (ike.group(2), False)
        elif current and ", INSTALLED, " in line and sas[current][0]:
            sas[current] = (sas[current][0], True)
    return {name: sa for name, sa in sas.items() if sa[1]}


@pytest.mark.ike
def test_demo_ike_rotates_real_tunnels_and_tears_everything_down() -> None:
    require_lab()
    proc = start_cli(["demo", "--ike", "--listen", "127.0.0.1:0"], {})
    text, ready = "", {}
    try:
        ready, text = _read_instructions(proc)
        far_end = ready["far_end"]
        assert far_end["kind"] == "strongswan"
        site = text.split("Site SAs  :", 1)[1].splitlines()[0].strip()
        assert site == far_end["site_sas"]
        names = [f"lab-{i}" for i in range(4)]
        wait_for(lambda: set(_sas(site)) == set(names), timeout=30, what="every lab tunnel up at the site")

        def rotated() -> float:
            body = httpx.get(ready["metrics_url"]).text
            return sum(float(v) for v in re.findall(r'psk_rotator_rotations_total\{[^}]*result="rotated"\} (\S+)', body))

        wait_for(lambda: rotated() >= 4, timeout=30, what="the demo's first rotation of the lab tunnels")
        before = _sas(site)
        command = text.split("Rotate now:", 1)[1].split("Status", 1)[0].replace("\\\n", " ")
        args = shlex.split(command)
        token_file = re.search(r"\$\(cat (\S+)\)", command).group(1)  # type: ignore[union-attr]
        with open(token_file) as fh:
            headers = {"Authorization": f"Bearer {fh.read().strip()}"}
        r = httpx.post(args[-1], json=json.loads(args[args.index("-d") + 1]), headers=headers)
        assert r.status_code == 202
        run = ready["admin_url"] + r.json()["href"]
        wait_for(lambda: httpx.get(run, headers=headers).json()["state"] == "done", timeout=60, what="the run")
        result = httpx.get(run, headers=headers).json()
        assert result["error"] is None, result
        # Every tunnel re-authenticated: a new IKE SA (new unique id), established with its CHILD_SA.
        wait_for(lambda: all(_sas(site).get(n, ("", False))[0] not in ("", before[n][0]) for n in names),
                 timeout=30, what="a fresh IKE SA for every tunnel after the rotation")
        records = httpx.post(ready["simulators"]["vault"] + "/_sim/control",
                             json={"op": "latest_under", "prefix": f"{PREFIX}/{far_end['account']}"}).json()["result"]
        SECRETS.update(v for rec in records.values() for k, v in rec.items() if "psk" in k and v)
        assert len(records) == 4 and all(rec["device"] == "lab-site" for rec in records.values())
    finally:
        out, err = _stop(proc, 60)
        OUTPUTS.extend([text, json.dumps(ready), out, err])
    assert proc.returncode == 0 and "Traceback" not in err
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in netns for ns in far_end["namespaces"]), netns
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in far_end["charon_pids"]), timeout=10,
             what="both charons gone")


def test_demo_ike_without_the_lab_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Where the lab cannot run (not root, no strongSwan), ``--ike`` names what is missing, exit 2, and
    starts nothing. Here by the real check when it fails, else with the check's answer for a machine
    without strongSwan."""
    import rotator.sim.ike
    from rotator.cli import main

    reason = unavailable()
    if reason is None:
        reason = "strongSwan is missing (/usr/lib/ipsec/charon): apt-get install strongswan-charon"
        monkeypatch.setattr(rotator.sim.ike, "unavailable", lambda: reason)
    assert main(["demo", "--ike", "--listen", "127.0.0.1:0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and reason in err and "--ike" in err and "Traceback" not in err


def test_demo_ike_lab_that_fails_to_start_is_one_line_and_leaves_nothing(monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import rotator.sim.ike
    from rotator.cli import main
    from rotator.sim.ike import Lab, LabError

    stopped: list[bool] = []

    def fail(self: Lab) -> Lab:
        raise LabError("site charon exited with 1 at start; see /tmp/psk-lab-x")

    monkeypatch.setattr(rotator.sim.ike, "unavailable", lambda: None)
    monkeypatch.setattr(Lab, "start", fail)
    monkeypatch.setattr(Lab, "stop", lambda self: stopped.append(True))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert main(["demo", "--ike", "--listen", "127.0.0.1:0"]) == 1
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "site charon exited" in err and "Traceback" not in err
    assert stopped, "the lab's teardown ran"
