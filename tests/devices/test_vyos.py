"""The simulated VyOS router (rotator/sim/vyos.py) over HTTPS with httpx, and the ``vyos`` kind against
it: one commit per batch, no commit for a key the router already holds, commit-confirm, save, a fresh SA
after a peer reset as proof, and every failure one line naming the cause."""

from __future__ import annotations

import json
import re
import ssl

import httpx
import pytest

from rotator.adapters.devices import vyos
from rotator.errors import ConfigError
from rotator.rotation.ports import DeviceStatus
from tests import helpers
from tests.devices.conftest import ACCOUNT, assert_no_key, assert_unknown_by_the_deadline, deadline, statuses
from tests.devices.firewalls import unit_firewall


@pytest.fixture
def router(loopback_tls, tmp_path):
    with unit_firewall("vyos", loopback_tls, tmp_path) as (sim, device, tunnels, cloudflare, table):
        yield sim, device, tunnels, cloudflare, f"https://127.0.0.1:{table['port']}"


def test_the_simulator_speaks_the_vyos_api(router, loopback_tls):
    sim, _, tunnels, _, server = router
    with httpx.Client(verify=ssl.create_default_context(cafile=loopback_tls.ca_file)) as http:
        def post(endpoint, data, key=sim.api_key):
            r = http.post(server + endpoint, data={"data": json.dumps(data), "key": key})
            return r.status_code, r.json()
        assert post("/retrieve", {"op": "exists", "path": ["vpn"]}, key="wrong") == \
            (401, {"success": False, "data": None, "error": "Valid API key is required"})
        status, doc = post("/retrieve", {"op": "showConfig", "path": ["vpn", "ipsec", "authentication", "psk",
                                                                        "cf-site-0"]})
        assert status == 200 and doc["data"]["secret"] == tunnels[0].previous_psk.reveal()  # keys in clear
        assert post("/retrieve", {"op": "showConfig", "path": ["vpn", "nothing"]})[0] == 400
        new = tunnels[0].psk.reveal()
        ops = [{"op": "set", "path": ["vpn", "ipsec", "authentication", "psk", "cf-site-0", "secret"], "value": new}]
        assert post("/configure", {"commands": ops, "confirm_time": 1}) == (200, {"success": True, "data": None,
                                                                                  "error": None})
        assert sim.secret_of("cf-site-0") == new and sim.secret_of("cf-site-0", saved=True) != new
        sim.expire_confirm()  # not confirmed in time: reverted
        assert sim.secret_of("cf-site-0") == tunnels[0].previous_psk.reveal()
        assert post("/configure", ops)[0] == 200 and post("/config-file", {"op": "save"})[0] == 200
        assert sim.secret_of("cf-site-0", saved=True) == new
        status, doc = post("/reset", {"op": "reset", "path": ["vpn", "ipsec", "site-to-site", "peer", "cf-site-0"]})
        assert status == 200
        table = post("/show", {"op": "show", "path": ["vpn", "ipsec", "sa"]})[1]["data"]
        assert re.search(r"^cf-site-0-vti\s+down", table, re.M)  # Cloudflare still holds the old key
        assert re.search(r"^cf-site-1-vti\s+up\s+\d+s", table, re.M)


def test_a_batch_is_one_commit_and_saved_then_a_fresh_sa_proves_it(router):
    sim, device, tunnels, cloudflare, _ = router
    dev = device()
    results = dev.deliver(ACCOUNT, "r1", tunnels, deadline=deadline())
    assert set(statuses(results).values()) == {DeviceStatus.OK}
    assert (sim.commits, sim.saves) == (1, 1)
    assert [sim.secret_of(f"cf-{t.tunnel_name}", saved=True) for t in tunnels] == [t.psk.reveal() for t in tunnels]
    cloudflare.update({t.tunnel_id: t.psk.reveal() for t in tunnels[:2]})
    results = dev.verify(ACCOUNT, "r1", tunnels, deadline=deadline())
    assert statuses(results) == {tunnels[0].tunnel_id: DeviceStatus.OK, tunnels[1].tunnel_id: DeviceStatus.OK,
                                 tunnels[2].tunnel_id: DeviceStatus.FAILED}
    assert "no fresh SA within" in results[tunnels[2].tunnel_id].reason
    assert "resetting peer cf-site-2" in results[tunnels[2].tunnel_id].reason
    again = dev.deliver(ACCOUNT, "r1", tunnels, deadline=deadline())  # a reconcile: nothing to commit
    assert set(statuses(again).values()) == {DeviceStatus.OK} and sim.commits == 1


def test_commit_confirm_is_confirmed_once_the_api_still_answers(router):
    sim, device, tunnels, _, _ = router
    results = device(confirm_time=2).deliver(ACCOUNT, "r1", tunnels, deadline=deadline())
    assert set(statuses(results).values()) == {DeviceStatus.OK}
    sim.expire_confirm()  # confirmed: nothing to revert
    assert [sim.held(ACCOUNT, t.tunnel_id) for t in tunnels] == [t.psk.reveal() for t in tunnels]


def test_a_refused_commit_changes_nothing_and_is_reported_redacted(router):
    sim, device, tunnels, _, _ = router
    sim.fail_commit("[vpn ipsec] secret {key} rejected by the ipsec script")
    results = device().deliver(ACCOUNT, "r1", tunnels, deadline=deadline())
    assert set(statuses(results).values()) == {DeviceStatus.FAILED}
    reason = results[tunnels[0].tunnel_id].reason
    assert "the router refused the commit: Commit failed: [vpn ipsec] secret **redacted** rejected" in reason
    assert_no_key(reason, tunnels)
    assert [sim.held(ACCOUNT, t.tunnel_id) for t in tunnels] == [t.previous_psk.reveal() for t in tunnels]


def test_a_missing_psk_entry_is_refused_and_nothing_is_sent(router):
    sim, device, tunnels, _, _ = router
    results = device(psk="other-{tunnel_name}").deliver(ACCOUNT, "r1", tunnels[:1], deadline=deadline())
    assert results[tunnels[0].tunnel_id].status is DeviceStatus.FAILED
    assert "no psk entry other-site-0" in results[tunnels[0].tunnel_id].reason and sim.commits == 0


@pytest.mark.parametrize("fault", ["late_configure", "configure_502", "garbage_configure", "deep_configure",
                                   "failed_save"])
def test_an_unclear_answer_is_unknown_and_the_call_keeps_its_deadline(router, fault):
    sim, device, tunnels, _, _ = router
    if fault == "late_configure":
        sim.late_next("vyos.configure", delay=3.0)
    elif fault == "configure_502":
        sim.fail_next("vyos.configure", status=502)
    elif fault == "garbage_configure":
        sim.garbage_next("vyos.configure", variant="html")
    elif fault == "deep_configure":  # a 200 nested 100,000 brackets deep: unreadable, not a RecursionError
        sim.garbage_next("vyos.configure", variant="deep")
    else:
        sim.fail_save()
    assert_unknown_by_the_deadline(device(), tunnels)


def test_a_wrong_api_key_and_an_untrusted_certificate_are_one_line_naming_the_cause(router, tmp_path, loopback_tls):
    sim, device, tunnels, _, _ = router
    bad = tmp_path / "bad.key"
    bad.write_text("not-the-vyos-key\n")
    helpers.SECRETS.add("not-the-vyos-key")
    reason = device(api_key_file=str(bad)).deliver(ACCOUNT, "r1", tunnels, deadline=deadline())[
        tunnels[0].tunnel_id].reason
    assert "refused the API key (HTTP 401 Valid API key is required)" in reason and "\n" not in reason
    results = device(ca_file=loopback_tls.other_ca_file).deliver(ACCOUNT, "r1", tunnels, deadline=deadline())
    reason = results[tunnels[0].tunnel_id].reason
    assert set(statuses(results).values()) == {DeviceStatus.FAILED}
    assert "TLS verification of 127.0.0.1:" in reason and "set ca_file" in reason and "\n" not in reason
    assert sim.commits == 0


@pytest.mark.parametrize("raw, message", [
    ({"confirm_time": 90}, "devices[0].confirm_time: 90 is outside 0..60"),
    ({"peer": "{nope}"}, "devices[0].peer: unknown field {nope}"),
    ({"api_key_file": "/nonexistent/vyos.key"}, "devices[0].api_key_file: cannot read /nonexistent/vyos.key"),
])
def test_bad_settings_name_the_key(router, raw, message):
    _, device, _, _, _ = router
    with pytest.raises(ConfigError, match=re.escape(message)):
        device(**raw)


def test_the_key_rules_keep_to_what_needs_no_quoting():
    assert vyos.KEY_RULES.refuses("A-z_0.9+/=" * 4) is None
    assert "alphabet" in vyos.KEY_RULES.refuses('has"quote"inside')
    assert vyos.uptime_seconds("1h2m3s") == 3723.0 and vyos.uptime_seconds("N/A") is None
