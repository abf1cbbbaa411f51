"""``rotator config check`` with the firewall kinds: settings shown without a credential, a credential
file or a PSK policy a kind cannot take refused in one line naming the key, exit status 2."""

from __future__ import annotations

import json

import pytest

from tests import helpers
from tests.helpers import run_cli, write_config

ACCOUNT = '[[accounts]]\nid = "5a1e0f3b9c7d4e2f8a6b0c1d2e3f4a5b"\n\n'
POLICY = '[policies.default]\nevery = "30d"\npsk_forbidden_first = "0"\n'


def blocks(tmp_path, ca_file, **over) -> str:
    key = tmp_path / "fw.key"
    key.write_text("LUFRPT" + "q1w2e3r4" * 5)
    helpers.SECRETS.add("LUFRPT" + "q1w2e3r4" * 5)
    text = ""
    for kind, cred in (("panos", "api_key_file"), ("vyos", "api_key_file"), ("fortigate", "token_file")):
        fields = {"name": f"{kind}-hq", "kind": kind, "tunnels": [f"{kind}-*"], "host": "fw.example.net",
                  cred: str(key), "ca_file": ca_file, "verify_timeout": "2m", **over.get(kind, {})}
        text += "[[devices]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items()) + "\n"
    return text


def test_config_check_shows_the_firewall_devices_without_their_credentials(sims, tmp_path, loopback_tls):
    proc = run_cli(["--config", write_config(tmp_path, ACCOUNT + POLICY + blocks(tmp_path, loopback_tls.ca_file)), "config", "check", "--one-shot"], sims.env())
    assert proc.returncode == 0, proc.stderr
    shown = {d["name"]: d for d in json.loads(proc.stdout)["devices"]}
    assert shown["panos-hq"]["gateway"] == "cf-{tunnel_name}" and shown["vyos-hq"]["save"] is True
    assert shown["fortigate-hq"]["vdom"] == "root" and shown["fortigate-hq"]["verify_timeout"] == 120
    assert "q1w2e3r4" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("policy, over, needle", [
    ('[policies.default]\nevery = "30d"\n', {}, "devices[2] (fortigate-hq, kind fortigate): policies.default could "
                                                "make a key the device refuses"),
    (POLICY, {"vyos": {"api_key_file": "/nonexistent/vyos.key"}}, "devices[1].api_key_file: cannot read"),
    (POLICY, {"panos": {"verify_tls": False}}, "devices[0].verify_tls: is false while ca_file is set"),
    (POLICY, {"fortigate": {"token": "inline"}}, "devices[2].token: unknown setting for this kind of device"),
    (POLICY, {"panos": {"ca_file": "NOT-PEM"}}, "devices[0].ca_file: NOT-PEM holds no usable PEM certificate"),
])
def test_a_bad_firewall_device_is_one_line_naming_the_key(sims, tmp_path, loopback_tls, policy, over, needle):
    if over.get("panos", {}).get("ca_file") == "NOT-PEM":
        (tmp_path / "NOT-PEM").write_text("-----BEGIN CERTIFICATE-----\n")
        over = {"panos": {"ca_file": str(tmp_path / "NOT-PEM")}}
        needle = needle.replace("NOT-PEM", str(tmp_path / "NOT-PEM"))
    text = ACCOUNT + policy + blocks(tmp_path, loopback_tls.ca_file, **over)
    proc = run_cli(["--config", write_config(tmp_path, text), "config", "check", "--one-shot"],
                   sims.env())
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
