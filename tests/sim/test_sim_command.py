"""`rotator sim --json` as a newcomer runs it: a subprocess, one JSON line, real clients, SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import cloudflare
import hvac


def test_sim_json_prints_one_line_serves_and_stops_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "rotator", "sim", "--json", "--accounts", "2", "--tunnels", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        assert set(info) == {"vault_addr", "vault_token", "cloudflare_base_url", "cloudflare_api_token", "accounts"}
        assert len(info["accounts"]) == 2 and all(len(t) == 3 for t in info["accounts"].values())
        vault = hvac.Client(url=info["vault_addr"], token=info["vault_token"])
        assert vault.is_authenticated()
        vault.secrets.kv.v2.create_or_update_secret("cloudflare/magic-ipsec/x/y", {"a": "b"})
        cf = cloudflare.Cloudflare(api_token=info["cloudflare_api_token"], base_url=info["cloudflare_base_url"])
        for acc, tids in info["accounts"].items():
            assert sorted(t.id for t in cf.magic_transit.ipsec_tunnels.list(account_id=acc).ipsec_tunnels) == sorted(tids)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert out == "" and "Traceback" not in err


def test_sim_aws_serves_an_ec2_fake_for_the_first_accounts_tunnels():
    import boto3

    from tests.helpers import SECRETS

    proc = subprocess.Popen([sys.executable, "-m", "rotator", "sim", "--json", "--accounts", "1", "--tunnels", "4",
                             "--aws"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        aws = info["aws"]
        SECRETS.add(aws["secret_access_key"])
        ec2 = boto3.session.Session().client("ec2", region_name=aws["region"], endpoint_url=aws["endpoint"],
                                             aws_access_key_id=aws["access_key_id"],
                                             aws_secret_access_key=aws["secret_access_key"])
        conns = ec2.describe_vpn_connections()["VpnConnections"]
        assert sorted(c["VpnConnectionId"] for c in conns) == aws["vpn_connection_ids"] and len(conns) == 2
        outside = {o["OutsideIpAddress"] for c in conns for o in c["Options"]["TunnelOptions"]}
        cf = cloudflare.Cloudflare(api_token=info["cloudflare_api_token"], base_url=info["cloudflare_base_url"])
        (acc,) = info["accounts"]
        endpoints = {t.customer_endpoint for t in cf.magic_transit.ipsec_tunnels.list(account_id=acc).ipsec_tunnels}
        assert endpoints == outside  # every tunnel is matched by its customer endpoint
        assert all(t["Status"] == "UP" for c in conns for t in c["VgwTelemetry"])  # both ends on the same key
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
