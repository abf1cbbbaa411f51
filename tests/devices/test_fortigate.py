"""The simulated FortiGate (rotator/sim/fortigate.py) over HTTPS with httpx, and the ``fortigate`` kind
against it: an immediate PUT of ``psksecret``, tunnel down/up and a fresh phase 2 in the monitor as
proof, FortiOS's envelopes and HTTP statuses read right, every failure one line naming the cause."""

from __future__ import annotations

import re
import ssl

import httpx
import pytest

from rotator.adapters.devices import fortigate
from rotator.errors import ConfigError
from rotator.model import TunnelInfo
from rotator.rotation.ports import DeviceStatus
from tests import helpers
from tests.devices.conftest import ACCOUNT, assert_no_key, assert_unknown_by_the_deadline, deadline, statuses
from tests.devices.firewalls import unit_firewall

PHASE1 = "/api/v2/cmdb/vpn.ipsec/phase1-interface/"


@pytest.fixture
def fortigate_sim(loopback_tls, tmp_path):
    with unit_firewall("fortigate", loopback_tls, tmp_path) as (sim, device, tunnels, cloudflare, table):
        yield sim, device, tunnels, cloudflare, f"https://127.0.0.1:{table['port']}"


def test_the_simulator_speaks_the_fortios_rest_api(fortigate_sim, loopback_tls):
    sim, _, tunnels, cloudflare, server = fortigate_sim
    ctx = ssl.create_default_context(cafile=loopback_tls.ca_file)
    with httpx.Client(verify=ctx, base_url=server, headers={"Authorization": f"Bearer {sim.token}"}) as http:
        doc = http.get(PHASE1 + "cf-site-0", params={"vdom": "root"}).json()
        assert (doc["status"], doc["http_status"], doc["results"][0]["psksecret"][:4]) == ("success", 200, "ENC ")
        assert doc["results"][0]["psksecret"] != http.get(PHASE1 + "cf-site-0").json()["results"][0]["psksecret"]
        assert http.get(PHASE1 + "nowhere").status_code == 404
        r = http.put(PHASE1 + "cf-site-0", json={"psksecret": "short"})
        assert (r.status_code, r.json()["error"]) == (500, -651)
        new = tunnels[0].psk.reveal()
        assert http.put(PHASE1 + "cf-site-0", json={"psksecret": new}).json()["status"] == "success"
        assert sim.key_of("cf-site-0") == new  # at once: no commit
        monitor = {e["name"]: e for e in http.get("/api/v2/monitor/vpn/ipsec").json()["results"]}
        assert monitor["cf-site-0"]["proxyid"][0]["status"] == "down"  # Cloudflare holds the old key
        cloudflare[tunnels[0].tunnel_id] = new
        assert http.post("/api/v2/monitor/vpn/ipsec/tunnel_up",
                         json={"p1name": "cf-site-0", "p2name": "cf-site-0"}).json()["status"] == "success"
        monitor = {e["name"]: e for e in http.get("/api/v2/monitor/vpn/ipsec").json()["results"]}
        assert monitor["cf-site-0"]["proxyid"][0]["status"] == "up" and monitor["cf-site-0"]["creation_time"] == 0
    with httpx.Client(verify=ctx, base_url=server, headers={"Authorization": "Bearer wrong"}) as http:
        r = http.get(PHASE1 + "cf-site-0")
        assert (r.status_code, r.content) == (401, b"")
    with httpx.Client(verify=ctx, base_url=server,
                      headers={"Authorization": f"Bearer {sim.read_only_token}"}) as http:
        assert http.put(PHASE1 + "cf-site-1", json={"psksecret": new}).status_code == 403


def test_keys_are_put_at_once_and_a_fresh_phase_2_proves_them(fortigate_sim):
    sim, device, tunnels, cloudflare, _ = fortigate_sim
    dev = device()
    results = dev.deliver(ACCOUNT, "r1", tunnels, deadline=deadline())
    assert set(statuses(results).values()) == {DeviceStatus.OK} and sim.puts == 3
    assert [sim.held(ACCOUNT, t.tunnel_id) for t in tunnels] == [t.psk.reveal() for t in tunnels]
    infos = [TunnelInfo(t.tunnel_id, t.tunnel_name) for t in tunnels]
    assert dev.tunnels_up(ACCOUNT, infos, deadline=deadline()) == dict.fromkeys((t.tunnel_id for t in tunnels), False)
    cloudflare.update({t.tunnel_id: t.psk.reveal() for t in tunnels[:2]})
    results = dev.verify(ACCOUNT, "r1", tunnels, deadline=deadline())
    assert statuses(results) == {tunnels[0].tunnel_id: DeviceStatus.OK, tunnels[1].tunnel_id: DeviceStatus.OK,
                                 tunnels[2].tunnel_id: DeviceStatus.FAILED}
    assert "no fresh phase 2 within" in results[tunnels[2].tunnel_id].reason
    assert "bringing cf-site-2 down and up" in results[tunnels[2].tunnel_id].reason
    assert sim.request_counts()["fortigate.down"] == 3 and sim.request_counts()["fortigate.up"] == 3


def test_a_refused_key_is_failed_redacted_and_a_missing_tunnel_is_never_sent(fortigate_sim):
    sim, device, tunnels, _, _ = fortigate_sim
    sim.refuse_key("cf-site-0", "psksecret {key}: invalid characters")
    del sim.tunnels["cf-site-1"]
    results = device().deliver(ACCOUNT, "r1", tunnels, deadline=deadline())
    assert statuses(results) == {tunnels[0].tunnel_id: DeviceStatus.FAILED, tunnels[1].tunnel_id: DeviceStatus.FAILED,
                                 tunnels[2].tunnel_id: DeviceStatus.OK}
    reason = results[tunnels[0].tunnel_id].reason
    assert "refused the key for cf-site-0: HTTP 500 error -651: psksecret **redacted**: invalid" in reason
    assert "no phase1-interface cf-site-1 in VDOM root" in results[tunnels[1].tunnel_id].reason
    for r in results.values():
        assert_no_key(r.reason or "", tunnels)
    assert sim.key_of("cf-site-0") == tunnels[0].previous_psk.reveal() and sim.puts == 1


@pytest.mark.parametrize("fault", ["late_put", "put_503", "garbage_put", "deep_put"])
def test_an_unclear_answer_is_unknown_and_the_call_keeps_its_deadline(fortigate_sim, fault):
    sim, device, tunnels, _, _ = fortigate_sim
    if fault == "late_put":
        sim.late_next("fortigate.put", delay=3.0, count=3)
    elif fault == "put_503":
        sim.fail_next("fortigate.put", status=503, count=3)
    else:  # a login page, or a 200 nested 100,000 brackets deep: unreadable, not a RecursionError
        sim.garbage_next("fortigate.put", variant="deep" if fault == "deep_put" else "html", count=3)
    assert_unknown_by_the_deadline(device(), tunnels)


def test_bad_tokens_and_an_untrusted_certificate_are_one_line_naming_the_cause(fortigate_sim, tmp_path, loopback_tls):
    sim, device, tunnels, _, _ = fortigate_sim
    for token, expected in ((sim.read_only_token, "may not do this (HTTP 403)"),
                            ("0123456789abcdef0123456789", "refused the API token (HTTP 401)")):
        bad = tmp_path / "bad.token"
        bad.write_text(token)
        helpers.SECRETS.add(token)
        results = device(token_file=str(bad)).deliver(ACCOUNT, "r1", tunnels, deadline=deadline())
        reason = results[tunnels[0].tunnel_id].reason
        assert set(statuses(results).values()) == {DeviceStatus.FAILED}
        assert expected in reason and "\n" not in reason and token not in reason
    reason = device(ca_file=loopback_tls.other_ca_file).deliver(ACCOUNT, "r1", tunnels, deadline=deadline())[
        tunnels[0].tunnel_id].reason
    assert "TLS verification of 127.0.0.1:" in reason and "set ca_file" in reason and sim.puts == 0


@pytest.mark.parametrize("raw, message", [
    ({"vdom": "no such vdom"}, "devices[0].vdom: 'no such vdom' is not a VDOM name"),
    ({"token_file": "/nonexistent/token"}, "devices[0].token_file: cannot read /nonexistent/token"),
])
def test_bad_settings_name_the_key(fortigate_sim, raw, message):
    _, device, _, _, _ = fortigate_sim
    with pytest.raises(ConfigError, match=re.escape(message)):
        device(**raw)


def test_the_key_rules_follow_fortios():
    assert fortigate.KEY_RULES.refuses("abcdef") is None
    assert "outside 6..128" in fortigate.KEY_RULES.refuses("abcde")
    assert "starts with" in fortigate.KEY_RULES.refuses("0x1234567890")
