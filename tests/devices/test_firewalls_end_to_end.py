"""The engine with each firewall kind (panos, vyos, fortigate): Vault and Cloudflare simulators and the
kind's simulated firewall over verified HTTPS, whose fresh IKE SA comes up only while it holds the key
Cloudflare holds. Every test ends with the invariant on both ends (tests/helpers.py, assert_both_ends)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from rotator.adapters.devices import build_device, parse_devices
from rotator.rotation.engine import RunRequest
from tests import helpers
from tests.devices.firewalls import KINDS, firewall
from tests.helpers import assert_both_ends, record, runtime

CHILD = Path(__file__).with_name("firewall_crash_child.py")
# Keys every firewall kind takes (FortiOS refuses a leading 0).
CONFIG = '[cloudflare]\nbatch_size = 4\nretry_attempts = 2\n\n[policies.default]\nevery = "30d"\npsk_forbidden_first = "0"\n'


@pytest.fixture(params=KINDS)
def world(request, sims, tmp_path, loopback_tls):
    acc = next(iter(sims.tunnels_by_account))
    rt = runtime(sims, CONFIG, tmp_path)
    devices = []

    def device(**over):
        (spec,) = parse_devices([{**fw.table, **over}])
        devices.append(build_device(spec))
        return devices[-1]
    try:
        with firewall(request.param, sims, acc, loopback_tls, tmp_path) as fw:
            yield sims, rt, acc, fw, device
    finally:
        for d in devices:
            d.close()
        rt.close()


def run(rt, acc, device, **kw):
    return rt.engine.run(RunRequest(acc, device_for=lambda tunnel: device, **kw))


def outcomes(report) -> dict[str, str]:
    return {o.tunnel_id: str(o.result) for o in report.outcomes}


def reason_of(report, tid) -> str:
    return next(o.reason or "" for o in report.outcomes if o.tunnel_id == tid)


def test_a_rotation_reaches_both_ends_and_a_fresh_ike_sa_proves_it(world):
    sims, rt, acc, fw, device = world
    report = run(rt, acc, device())
    assert report.ok, outcomes(report)
    assert assert_both_ends(sims, acc, fw.held, strict=True) == 6
    assert fw.changes() == (6 if fw.kind == "fortigate" else 2)  # six tunnels, batches of four: a commit each
    for tid in sims.tunnels_by_account[acc]:
        assert fw.held(acc, tid) == sims.cloudflare.psk_of(acc, tid) == record(sims, acc, tid)["psk"]


def test_a_key_the_firewall_refuses_stays_off_both_ends(world):
    sims, rt, acc, fw, device = world
    dev = device()
    assert run(rt, acc, dev).ok
    bad = sims.tunnels_by_account[acc][1]
    before = sims.cloudflare.psk_of(acc, bad)
    fw.refuse_key(bad)
    report = run(rt, acc, dev, tunnels=[bad])
    assert outcomes(report) == {bad: "refused"}
    assert "refused the" in reason_of(report, bad)
    assert sims.cloudflare.psk_of(acc, bad) == before == fw.held(acc, bad)
    assert_both_ends(sims, acc, fw.held, strict=True)


def test_a_failed_commit_refuses_its_batch_with_the_key_masked(world):
    sims, rt, acc, fw, device = world
    dev = device()
    assert run(rt, acc, dev).ok
    before = dict(sims.cloudflare.psks(acc))
    batch = sims.tunnels_by_account[acc][:4]
    fw.fail_commit(batch)
    report = run(rt, acc, dev, tunnels=batch)
    assert set(outcomes(report).values()) == {"refused"}, outcomes(report)
    reason = reason_of(report, batch[0])
    assert "Validation Error: pre-shared-key **redacted** rejected by policy" in reason
    for tid in batch:
        assert sims.cloudflare.psk_of(acc, tid) == before[tid] == fw.held(acc, tid)
    assert_both_ends(sims, acc, fw.held, strict=True)


def test_a_tunnel_that_never_reauthenticates_is_rolled_back_on_both_ends(world):
    sims, rt, acc, fw, device = world
    dev = device()
    assert run(rt, acc, dev).ok
    bad = sims.tunnels_by_account[acc][2]
    before = sims.cloudflare.psk_of(acc, bad)
    fw.never_reauth(bad)
    report = run(rt, acc, dev, tunnels=[bad])
    assert outcomes(report) == {bad: "rolled_back"}, reason_of(report, bad)
    assert "no fresh" in reason_of(report, bad)
    assert sims.cloudflare.psk_of(acc, bad) == before == fw.held(acc, bad)
    assert_both_ends(sims, acc, fw.held, strict=True)


@pytest.mark.parametrize("what", ["credential", "tls"])
def test_bad_credentials_and_an_untrusted_certificate_are_one_line_naming_the_cause(world, tmp_path, loopback_tls,
                                                                                      what):
    sims, rt, acc, fw, device = world
    if what == "credential":
        wrong = tmp_path / "wrong.credential"
        wrong.write_text("wrongwrongwrongwrong0123")
        helpers.SECRETS.add("wrongwrongwrongwrong0123")
        key = "token_file" if fw.kind == "fortigate" else "api_key_file"
        dev, expected = device(**{key: str(wrong)}), "refused the API"
    else:
        dev, expected = device(ca_file=loopback_tls.other_ca_file), "TLS verification of 127.0.0.1:"
    before = dict(sims.cloudflare.psks(acc))
    report = run(rt, acc, dev, tunnels=sims.tunnels_by_account[acc][:2])
    assert set(outcomes(report).values()) == {"refused"}
    reason = reason_of(report, sims.tunnels_by_account[acc][0])
    assert expected in reason and "\n" not in reason, reason
    assert dict(sims.cloudflare.psks(acc)) == before and fw.changes() == 0
    assert_both_ends(sims, acc, fw.held, strict=True)


def test_sigkill_between_deliver_and_apply_then_reconcile(world, tmp_path):
    sims, rt, acc, fw, device = world
    assert run(rt, acc, device()).ok
    before, changes = dict(sims.cloudflare.psks(acc)), fw.changes()
    device_json = tmp_path / "device.json"
    device_json.write_text(json.dumps(fw.table))
    holder = f"{fw.kind}-crash-test"
    config_file = tmp_path / "child.toml"
    config_file.write_text(CONFIG.replace("batch_size = 4", "batch_size = 100"))
    helpers.kill_at_crash_point([sys.executable, str(CHILD), acc, str(device_json), "delivered", holder],
                                {**sims.env(), "ROTATOR_CONFIG": str(config_file)}, "delivered")
    helpers.remember_secrets(sims)
    pending = [tid for tid in sims.tunnels_by_account[acc] if (record(sims, acc, tid) or {}).get("pending_psk")]
    assert len(pending) == 6  # every tunnel staged in Vault; none applied at Cloudflare
    for tid in pending:
        assert sims.cloudflare.psk_of(acc, tid) == before[tid]
    on_firewall = [tid for tid in pending if fw.held(acc, tid) == record(sims, acc, tid)["pending_psk"]]
    # Delivered (one batch: the child runs the default batch size), then killed. A commit takes the batch
    # whole; FortiOS takes each tunnel's write on its own, and one may have had no answer in time.
    assert len(on_firewall) == 6 if not fw.recommits else on_firewall
    delivered = fw.changes() - changes
    assert_both_ends(sims, acc, fw.held)
    rt2 = runtime(sims, CONFIG, tmp_path, holder=holder)
    try:
        report = run(rt2, acc, device(), reconcile_only=True)
    finally:
        rt2.close()
    assert report.ok, outcomes(report)
    assert delivered == (len(on_firewall) if fw.recommits else 1)
    # PAN-OS and VyOS can tell the firewall already holds the keys: no second commit. FortiOS cannot.
    assert fw.changes() - changes - delivered == (len(pending) if fw.recommits else 0)
    assert assert_both_ends(sims, acc, fw.held, strict=True) == 6
