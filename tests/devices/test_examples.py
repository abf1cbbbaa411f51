"""The example hooks in config/devices/: the strongSwan one runs through the exec device against a
fake swanctl; all of them are valid Python that reads the documented contract."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import py_compile
import stat
import sys
import textwrap
import time

import pytest

from rotator.adapters.devices import parse_devices
from rotator.adapters.devices.exec import ExecDevice
from rotator.rotation.ports import DeviceStatus
from tests.devices.conftest import ACCOUNT, assert_no_key, make_tunnels

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "config" / "devices"
HOOK = EXAMPLES / "strongswan-swanctl.py"

FAKE_SWANCTL = """
    import base64, json, pathlib, re, sys
    state_path = pathlib.Path(STATE)
    state = json.loads(state_path.read_text())
    argv = sys.argv[1:]
    state["calls"].append(argv)
    if argv[0] == "--load-creds":
        for conf in sorted(pathlib.Path(CONF).glob("*.conf")):
            m = re.search(r"id-1 = (\\S+)\\n\\s+secret = 0s(\\S+)", conf.read_text())
            state["secrets"][m.group(1)] = base64.b64decode(m.group(2)).decode()
        print("loaded " + str(len(state["secrets"])) + " secrets")
    elif argv[0] == "--rekey":
        ike = argv[2]
        owner = ike + ".site.example.net"
        if state["secrets"].get(owner) == state["peer"].get(ike):
            state["next"] += 1
            state["sas"][ike] = [state["next"]]
        else:
            state["sas"][ike] = []
            print("initiate failed: AUTHENTICATION_FAILED", file=sys.stderr)
    elif argv[0] == "--list-sas":
        ike = argv[2]
        for uid in state["sas"].get(ike, []):
            print("list-sa event {" + ike + " {uniqueid=" + str(uid) + " version=2 state=ESTABLISHED local-host=192.0.2.1}}")
        print("list-sas reply {}")
    state_path.write_text(json.dumps(state))
"""


@pytest.fixture
def fake_swanctl(tmp_path):
    conf = tmp_path / "conf.d"
    conf.mkdir()
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"calls": [], "secrets": {}, "peer": {}, "sas": {}, "next": 100}))
    script = tmp_path / "swanctl"
    script.write_text(f"#!{sys.executable}\n" + f"STATE, CONF = {str(state)!r}, {str(conf)!r}\n"
                      + textwrap.dedent(FAKE_SWANCTL))
    script.chmod(0o755)
    return script, conf, state


def test_the_swanctl_hook_delivers_and_verifies_through_the_exec_device(fake_swanctl):
    script, conf, state_path = fake_swanctl
    tunnels = make_tunnels(2)
    state = json.loads(state_path.read_text())
    state["peer"] = {tunnels[0].tunnel_name: tunnels[0].psk.reveal(),  # Cloudflare has the new key
                     tunnels[1].tunnel_name: tunnels[1].previous_psk.reveal()}  # ... but not for this one
    state["sas"] = {t.tunnel_name: [1 + i] for i, t in enumerate(tunnels)}
    state_path.write_text(json.dumps(state))
    (spec,) = parse_devices([{
        "name": "site", "kind": "exec", "tunnels": ["site-*"], "timeout": "30s",
        "command": [sys.executable, str(HOOK), "--owner", "{tunnel_name}.site.example.net", "--conf-dir", str(conf),
                    "--swanctl", str(script), "--wait", "2"]}])
    device = ExecDevice(spec.name, spec.settings.command, timeout=spec.timeout)
    end = time.monotonic() + 60

    delivered = device.deliver(ACCOUNT, "r", tunnels, deadline=end)
    assert {r.status for r in delivered.values()} == {DeviceStatus.OK}
    for t in tunnels:
        path = conf / f"psk-rotator-{t.tunnel_id}.conf"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert base64.b64encode(t.psk.reveal().encode()).decode() in path.read_text()
    state = json.loads(state_path.read_text())
    assert state["secrets"] == {f"{t.tunnel_name}.site.example.net": t.psk.reveal() for t in tunnels}

    verified = device.verify(ACCOUNT, "r", tunnels, deadline=end)
    assert verified[tunnels[0].tunnel_id].status is DeviceStatus.OK
    assert verified[tunnels[1].tunnel_id].status is DeviceStatus.FAILED
    assert verified[tunnels[1].tunnel_id].reason == "no fresh IKE SA site-1 within 2s"
    assert ["--rekey", "--ike", "site-0", "--reauth"] in json.loads(state_path.read_text())["calls"]

    back = [type(t)(t.tunnel_id, t.tunnel_name, t.previous_psk, t.psk) for t in tunnels]
    assert {r.status for r in device.rollback(ACCOUNT, "r", back, deadline=end).values()} == {DeviceStatus.OK}
    state = json.loads(state_path.read_text())
    assert state["secrets"] == {f"{t.tunnel_name}.site.example.net": t.previous_psk.reveal() for t in tunnels}
    assert_no_key(json.dumps(state["calls"]) + repr([delivered, verified]), tunnels)


def test_a_failing_swanctl_fails_the_batch_with_its_last_line(fake_swanctl, tmp_path):
    _, conf, _ = fake_swanctl
    broken = tmp_path / "broken-swanctl"
    broken.write_text("#!/bin/sh\necho 'connecting to unix:///var/run/charon.vici failed: No such file' >&2\nexit 1\n")
    broken.chmod(0o755)
    device = ExecDevice("site", [sys.executable, str(HOOK), "--owner", "x", "--conf-dir", str(conf),
                                 "--swanctl", str(broken)], timeout=30)
    (r,) = device.deliver(ACCOUNT, "r", make_tunnels(1), deadline=time.monotonic() + 60).values()
    assert r.status is DeviceStatus.FAILED
    assert r.reason == ("exit status 1: strongswan-swanctl: connecting to unix:///var/run/charon.vici failed: "
                        "No such file")


def test_every_example_hook_compiles_and_is_executable(tmp_path):
    hooks = sorted(EXAMPLES.glob("*.py"))
    assert hooks, "config/devices/ holds no example hook"
    for path in hooks:
        py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)
        assert os.access(path, os.X_OK), path.name
        assert path.read_text().startswith("#!/usr/bin/env python3\n"), path.name


def test_the_built_in_firewall_kinds_replaced_their_sketches():
    """PAN-OS and VyOS have built-in kinds (README, far-end devices): no untested sketch for them."""
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == ["strongswan-swanctl.py"]
    readme = (EXAMPLES / "README.md").read_text()
    assert "`kind = \"panos\"`" in readme and "`kind = \"vyos\"`" in readme
