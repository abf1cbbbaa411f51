"""The ``panos`` kind against the simulated PAN-OS firewall over verified HTTPS: one commit per batch,
no second commit for a key the firewall already runs, commit failures reported redacted, a fresh IKE SA
as proof, and every failure one line naming the cause."""

from __future__ import annotations

import re

import pytest

from rotator.adapters.devices import panos
from rotator.errors import ConfigError
from rotator.rotation.ports import DeviceStatus
from tests import helpers
from tests.devices.conftest import ACCOUNT, assert_no_key, assert_unknown_by_the_deadline, deadline, statuses
from tests.devices.firewalls import unit_firewall


@pytest.fixture
def firewall(loopback_tls, tmp_path):
    with unit_firewall("panos", loopback_tls, tmp_path, verify_timeout=1.0) as (sim, device, tunnels, cloudflare, _):
        yield sim, device, tunnels, cloudflare


def test_a_batch_is_set_and_committed_once_then_a_fresh_ike_sa_proves_it(firewall):
    sim, device, tunnels, cloudflare = firewall
    dev = device()
    results = dev.deliver(ACCOUNT, "r1", tunnels, deadline=deadline())
    assert statuses(results) == dict.fromkeys((t.tunnel_id for t in tunnels), DeviceStatus.OK)
    assert sim.commits == 1  # one commit for the batch
    assert [sim.held(ACCOUNT, t.tunnel_id) for t in tunnels] == [t.psk.reveal() for t in tunnels]
    cloudflare.update({t.tunnel_id: t.psk.reveal() for t in tunnels[:2]})  # Cloudflare applied two of them
    results = dev.verify(ACCOUNT, "r1", tunnels, deadline=deadline())
    assert statuses(results) == {tunnels[0].tunnel_id: DeviceStatus.OK, tunnels[1].tunnel_id: DeviceStatus.OK,
                                 tunnels[2].tunnel_id: DeviceStatus.FAILED}
    assert "no fresh IKE SA within" in results[tunnels[2].tunnel_id].reason
    assert "clearing the IKE SA of cf-site-2" in results[tunnels[2].tunnel_id].reason


def test_a_repeated_deliver_commits_nothing_again(firewall):
    sim, device, tunnels, _ = firewall
    dev = device()
    assert all(r.ok for r in dev.deliver(ACCOUNT, "r1", tunnels, deadline=deadline()).values())
    again = dev.deliver(ACCOUNT, "r1", tunnels, deadline=deadline())
    assert all(r.ok for r in again.values()) and sim.commits == 1
    assert "already runs this key" in again[tunnels[0].tunnel_id].reason


def test_a_failed_commit_is_reported_redacted_and_a_rollback_needs_no_commit(firewall):
    sim, device, tunnels, _ = firewall
    dev = device()
    sim.fail_commit(f"Validation Error: pre-shared-key {tunnels[0].psk.reveal()} rejected by policy")
    results = dev.deliver(ACCOUNT, "r1", tunnels, deadline=deadline())
    assert set(statuses(results).values()) == {DeviceStatus.FAILED}
    reason = results[tunnels[0].tunnel_id].reason
    assert "commit job 1 failed: Validation Error: pre-shared-key **redacted** rejected" in reason
    assert_no_key(reason, tunnels)
    assert [sim.held(ACCOUNT, t.tunnel_id) for t in tunnels] == [t.previous_psk.reveal() for t in tunnels]
    back = [t.__class__(t.tunnel_id, t.tunnel_name, t.previous_psk, t.psk, t.customer_endpoint) for t in tunnels]
    assert all(r.ok for r in dev.rollback(ACCOUNT, "r1", back, deadline=deadline()).values())
    assert sim.commits == 1  # the candidate went back to the running key: nothing to commit
    assert [sim.candidate_key(f"cf-{t.tunnel_name}") for t in tunnels] == [t.previous_psk.reveal() for t in tunnels]


def test_a_key_the_firewall_refuses_fails_its_batch_and_a_missing_gateway_is_never_created(firewall):
    sim, device, tunnels, _ = firewall
    sim.refuse_key("cf-site-1", f"'{tunnels[1].psk.reveal()}' is not a valid key")
    del sim.gateways["cf-site-2"]
    results = device().deliver(ACCOUNT, "r1", tunnels, deadline=deadline())
    assert set(statuses(results).values()) == {DeviceStatus.FAILED}  # one set for the batch: all or none
    assert "the firewall refused the keys of this batch: cf-site-1 -> authentication" in \
        results[tunnels[0].tunnel_id].reason
    assert "no IKE gateway named cf-site-2" in results[tunnels[2].tunnel_id].reason
    assert "cf-site-2" not in sim.gateways and sim.commits == 0  # never created by a set, nothing committed
    assert sim.candidate_key("cf-site-0") == tunnels[0].previous_psk.reveal()
    for r in results.values():
        assert_no_key(r.reason or "", tunnels)
    assert all(r.ok for r in device().deliver(ACCOUNT, "r1", tunnels[:2], deadline=deadline()).values())


def test_uncommitted_changes_of_someone_else_stop_the_deliver_before_anything_is_set(firewall):
    sim, device, tunnels, _ = firewall
    sim.gateways["cf-site-0"].candidate = "someone-elses-unfinished-key"
    helpers.SECRETS.add("someone-elses-unfinished-key")
    results = device().deliver(ACCOUNT, "r1", tunnels[1:], deadline=deadline())
    assert set(statuses(results).values()) == {DeviceStatus.FAILED}
    assert "uncommitted changes" in results[tunnels[1].tunnel_id].reason
    assert sim.candidate_key("cf-site-1") == tunnels[1].previous_psk.reveal() and sim.commits == 0


@pytest.mark.parametrize("fault", [
    "late_commit",   # the commit may still land
    "commit_503",
    "garbage_set",   # the candidate may hold the keys
    "slow_job",      # the job outlives the call
])
def test_an_unclear_answer_is_unknown_and_the_call_keeps_its_deadline(firewall, fault):
    sim, device, tunnels, _ = firewall
    if fault == "late_commit":
        sim.late_next("panos.commit", delay=3.0)
    elif fault == "commit_503":
        sim.fail_next("panos.commit", status=503)
    elif fault == "garbage_set":
        sim.garbage_next("panos.config.set", variant="html", count=3)
    else:
        sim.set_commit_seconds(3.0)
    assert_unknown_by_the_deadline(device(), tunnels)


def test_a_wrong_api_key_is_one_line_naming_the_cause(firewall, tmp_path):
    sim, device, tunnels, _ = firewall
    bad = tmp_path / "bad.key"
    bad.write_text("LUFRPTnotthekey\n")
    helpers.SECRETS.add("LUFRPTnotthekey")
    results = device(api_key_file=str(bad)).deliver(ACCOUNT, "r1", tunnels, deadline=deadline())
    reason = results[tunnels[0].tunnel_id].reason
    assert set(statuses(results).values()) == {DeviceStatus.FAILED}
    assert "refused the API key (HTTP 403 Invalid Credential)" in reason and "api_key_file" in reason
    assert "\n" not in reason and "LUFRPT" not in reason


def test_a_certificate_the_ca_file_does_not_trust_is_one_line_naming_the_cause(firewall, loopback_tls):
    sim, device, tunnels, _ = firewall
    results = device(ca_file=loopback_tls.other_ca_file).deliver(ACCOUNT, "r1", tunnels, deadline=deadline())
    reason = results[tunnels[0].tunnel_id].reason
    assert set(statuses(results).values()) == {DeviceStatus.FAILED}
    assert reason.startswith("TLS verification of 127.0.0.1:") and "set ca_file" in reason and "\n" not in reason
    assert sim.commits == 0 and sim.request_counts() == {}  # no request was ever read by the firewall


@pytest.mark.parametrize("raw, message", [
    ({"host": "https://fw.example.net"}, "devices[0].host: 'https://fw.example.net' is not a host name"),
    ({"api_key_file": "/nonexistent/panos.key"}, "devices[0].api_key_file: cannot read /nonexistent/panos.key"),
    ({"verify_tls": False}, "devices[0].verify_tls: is false while ca_file is set"),
    ({"gateway": "cf-{tunnel}"}, "devices[0].gateway: unknown field {tunnel}"),
])
def test_bad_settings_name_the_key(firewall, raw, message):
    _, device, _, _ = firewall
    with pytest.raises(ConfigError, match=re.escape(message)):
        device(**raw)


def test_the_key_rules_follow_pan_os():
    assert panos.KEY_RULES.refuses("a" * 255) is None
    assert "outside 1..255" in panos.KEY_RULES.refuses("a" * 256)
    assert "alphabet" in panos.KEY_RULES.refuses("has space")
