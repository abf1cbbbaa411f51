"""The azure_vpn kind end to end: the Vault and Cloudflare simulators, the Azure fake over loopback TLS
(its connections come up only on the key Cloudflare holds for their tunnel), the real Azure SDK in the
adapter and the engine. Every test ends with the invariant on both ends (Cloudflare's key and the
Azure connection's key each readable from the latest Vault version)."""

from __future__ import annotations

import os
import signal
import tomllib

import pytest

from rotator.adapters.devices import DeviceRegistry, parse_devices
from rotator.rotation.engine import RunRequest
from rotator.sim.azure import CF_ANYCAST as CF_ENDPOINTS
from rotator.sim.azure import AzureSim, attach, gateway_address
from tests import helpers
from tests.devices.azure_env import serve
from tests.devices.test_end_to_end import outcomes
from tests.helpers import assert_both_ends, record, runtime


def gateway_ip(i: int) -> str:
    return gateway_address(i // 2)  # attach(): tunnels 2k and 2k+1 are a pair on one Azure gateway


def device_block(azure, *, tunnels: str = '["*"]', extra: str = "") -> str:
    return (f'[[devices]]\nname = "azure-eu"\nkind = "azure_vpn"\ntunnels = {tunnels}\n'
            f'subscription_id = "{azure.sim.subscription_id}"\nresource_group = "{azure.sim.resource_group}"\n'
            f'authority = "{azure.url}"\narm_endpoint = "{azure.url}"\nca_file = "{azure.ca_file}"\n'
            f'poll_interval = 0.05\ntimeout = "5s"\nverify_timeout = "4s"\n{extra}')


@pytest.fixture
def azure_world(sims, tmp_path, monkeypatch):
    acc = next(iter(sims.tunnels_by_account))
    tunnels = sims.tunnels_by_account[acc]
    sim = AzureSim(renegotiate=0.1, operation_seconds=0.05, retry_after="0")
    attach(sim, sims.cloudflare, acc, tunnels)  # two tunnels per gateway, coupled to Cloudflare's keys
    with serve(sim, tmp_path) as azure:
        for name, value in azure.env().items():
            if name != "AZURE_AUTHORITY_HOST":
                monkeypatch.setenv(name, value)
        rt = runtime(sims, "[cloudflare]\nbatch_size = 6\nretry_attempts = 2\n", tmp_path)
        registry = DeviceRegistry(parse_devices(tomllib.loads(device_block(azure))["devices"]))
        try:
            first = run(rt, acc, registry)  # every tunnel managed: both ends on the record's psk
            assert first.ok, [(o.result, o.reason) for o in first.outcomes]
            yield sims, rt, acc, azure, registry
        finally:
            registry.close()
            rt.close()


def run(rt, acc, registry, **kw):
    return rt.engine.run(RunRequest(acc, device_for=registry.for_account(acc), **kw))


def conn_of(azure, acc, tid) -> str:
    return next(c.name for c in azure.sim.connections.values() if c.tunnel == (acc, tid))


def test_a_rotation_sets_each_connection_once_and_verifies_it_connected(azure_world):
    sims, rt, acc, azure, registry = azure_world
    first = {tid: sims.cloudflare.psk_of(acc, tid) for tid in sims.tunnels_by_account[acc]}
    report = run(rt, acc, registry)
    assert report.ok, [(o.result, o.reason) for o in report.outcomes]
    assert assert_both_ends(sims, acc, azure.sim.held, strict=True) == 6
    for tid in sims.tunnels_by_account[acc]:
        name = conn_of(azure, acc, tid)
        now = sims.cloudflare.psk_of(acc, tid)
        assert now != first[tid]
        assert azure.sim.keys_set(name) == [first[tid], now]  # one modification per rotation
        assert azure.sim.status_of(name) == "Connected"
        assert azure.sim.connections[name.lower()].resets == 2  # each verify forced a fresh negotiation
        data = record(sims, acc, tid) or {}
        assert data.get("device") == "azure-eu" and "vendor_status" in str(data.get("verified_by"))


@pytest.mark.parametrize("fault", ["denied", "5xx", "timeout"])
def test_a_modification_azure_refuses_fails_or_times_out(azure_world, fault):
    sims, rt, acc, azure, registry = azure_world
    bad = sims.tunnels_by_account[acc][0]
    before = sims.cloudflare.psk_of(acc, bad)
    name = conn_of(azure, acc, bad)
    if fault == "denied":
        azure.sim.deny(azure.client.client_id, "Microsoft.Network/connections/sharedKey/write")
    elif fault == "5xx":
        azure.sim.fail_next("azure.sharedkey_set", count=10, status=500)
    else:
        azure.sim.late_next("azure.sharedkey_set", delay=8.0, count=10)  # past the 5 s deadline
    report = run(rt, acc, registry, tunnels=[bad])
    result = outcomes(report)[bad]
    if fault == "timeout":
        assert result == "unknown"  # the write may still land: the key stays pending
        assert (record(sims, acc, bad) or {}).get("pending_psk")
    else:
        assert result == "refused", [o.reason for o in report.outcomes if o.tunnel_id == bad]
        assert azure.sim.keys_set(name) == [before]  # only the first rotation's
        reason = next(o.reason for o in report.outcomes if o.tunnel_id == bad) or ""
        assert ("sharedKey/write" in reason) if fault == "denied" else ("HTTP 500" in reason)
    assert sims.cloudflare.psk_of(acc, bad) == before  # Cloudflare never saw the key
    assert_both_ends(sims, acc, azure.sim.held)


def test_a_connection_that_never_comes_back_is_rolled_back_on_both_ends(azure_world):
    sims, rt, acc, azure, registry = azure_world
    bad = sims.tunnels_by_account[acc][2]
    before = sims.cloudflare.psk_of(acc, bad)
    name = conn_of(azure, acc, bad)
    azure.sim.fail_negotiation([name])
    report = run(rt, acc, registry, tunnels=[bad])
    assert outcomes(report)[bad] == "rolled_back", [(o.result, o.reason) for o in report.outcomes]
    assert sims.cloudflare.psk_of(acc, bad) == before
    # The rollback returns once ARM accepted it; its long-running operation ends a moment later.
    helpers.wait_for(lambda: name not in azure.sim.updating(), what="Azure's rollback operation to end")
    assert azure.sim.key_of(name) == before  # set to the new key, then back
    assert azure.sim.keys_set(name)[-1] == before and len(azure.sim.keys_set(name)) == 3
    assert_both_ends(sims, acc, azure.sim.held, strict=True)


def test_an_unmatched_tunnel_is_refused_and_nothing_is_sent(azure_world):
    sims, rt, acc, azure, registry = azure_world
    stray = sims.cloudflare.add_tunnel(acc, "branch-new", customer_endpoint="203.0.113.99",
                                       cloudflare_endpoint=CF_ENDPOINTS[0])  # no Azure connection for it yet
    writes = list(azure.sim.writes)
    report = run(rt, acc, registry, tunnels=[stray])
    assert outcomes(report)[stray] == "refused", [o.reason for o in report.outcomes]
    reason = next(o.reason for o in report.outcomes if o.tunnel_id == stray) or ""
    assert "203.0.113.99" in reason and "public IP" in reason and "rg-vpn" in reason
    assert azure.sim.writes == writes  # nothing sent to any connection
    assert sims.cloudflare.psk_of(acc, stray) != (record(sims, acc, stray) or {}).get("pending_psk")
    assert_both_ends(sims, acc, azure.sim.held, strict=True)


def test_reconcile_after_a_kill_during_the_update_does_not_modify_again(sims, tmp_path):
    """SIGKILL a rotator while Azure's set-shared-key operation runs; reconcile must not set the key
    a second time on a connection that already holds it."""
    acc = next(iter(sims.tunnels_by_account))
    tid = sims.tunnels_by_account[acc][0]
    sim = AzureSim(renegotiate=0.2, operation_seconds=0.2, retry_after="0")
    attach(sim, sims.cloudflare, acc, [tid])
    with serve(sim, tmp_path) as azure:
        config = helpers.write_config(tmp_path, device_block(azure, tunnels=f'["{tid}"]'))
        env = {**sims.env(), **{k: v for k, v in azure.env().items() if k != "AZURE_AUTHORITY_HOST"},
               "ROTATOR_CONFIG": config}
        first = helpers.run_cli(["rotate", "--account", acc, "--tunnel", tid], env)  # now managed
        assert first.returncode == 0, first.stderr
        assert_both_ends(sims, acc, sim.held, strict=True)
        sim.hang_operations("cf-0")  # the next update runs until the test lets it finish
        writes = len(sim.writes)
        proc = helpers.start_cli(["rotate", "--account", acc, "--tunnel", tid], env)
        try:
            helpers.wait_for(lambda: len(sim.writes) > writes, timeout=60, what="the set-shared-key request")
            helpers.wait_for(lambda: sim.request_counts().get("azure.connection", 0) >= 1, timeout=30,
                             what="verify polling the connection")
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=10)
            helpers.OUTPUTS.extend([out, err])
        data = record(sims, acc, tid) or {}
        assert data.get("state") == "pending" and data.get("pending_psk")
        assert_both_ends(sims, acc, sim.held)
        sim.finish_operations()  # Azure finishes the update the dead rotator started
        assert sim.key_of("cf-0") == data["pending_psk"]
        done = helpers.run_cli(["reconcile", "--account", acc], env)
        assert done.returncode == 0, done.stderr
        assert sim.keys_set("cf-0")[1:] == [data["pending_psk"]]  # no second modification
        assert [w for w in sim.writes[writes:] if w[1] == "azure.sharedkey"] == [("cf-0", "azure.sharedkey")]
        assert_both_ends(sims, acc, sim.held, strict=True)
        assert sim.status_of("cf-0") == "Connected"


def test_config_check_refuses_a_policy_azure_cannot_take(sims, tmp_path):
    block = (f'[[devices]]\nname = "azure-eu"\nkind = "azure_vpn"\ntunnels = ["*"]\n'
             f'subscription_id = "{"0" * 8}-1111-2222-3333-{"4" * 12}"\nresource_group = "rg-vpn"\n')
    path = helpers.write_config(tmp_path, '[policies.default]\nevery = "30d"\npsk_charset = "aws"\n' + block)  # '.' and '_'
    proc = helpers.run_cli(["config", "check", "--config", path], sims.env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "devices[0] (azure-eu, kind azure_vpn)" in line and "'._'" in line
    ok = helpers.write_config(tmp_path, block)  # the default alnum policy fits
    checked = helpers.run_cli(["config", "check", "--one-shot", "--config", ok], sims.env())
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("extra, message", [
    ({"subscription_id": "my-sub"}, "devices[0].subscription_id: 'my-sub' is not a subscription id"),
    ({"resource_group": "rg/../x"}, "devices[0].resource_group: 'rg/../x' is not a resource group name"),
    ({"connections": ["ok", "no/slash"]}, "devices[0].connections[1]: 'no/slash' is not a connection name"),
    ({"cloud": "mars"}, "devices[0].cloud: unknown cloud 'mars'"),
    ({"arm_endpoint": "http://127.0.0.1:1"}, "devices[0].arm_endpoint: must be an https URL"),
    ({"ca_file": "/nonexistent/ca.pem"}, "devices[0].ca_file: /nonexistent/ca.pem is not a readable file"),
    ({"client_secret": "x"}, "devices[0].client_secret: unknown setting for this kind of device"),
])
def test_bad_settings_are_one_line_errors_naming_the_key(extra, message):
    from rotator.errors import ConfigError

    block = {"name": "azure-eu", "kind": "azure_vpn", "tunnels": ["*"],
             "subscription_id": "00000000-1111-2222-3333-444444444444", "resource_group": "rg-vpn", **extra}
    with pytest.raises(ConfigError) as exc:
        parse_devices([block])
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


# -- the device alone, against the fake: the answers the engine builds on ------------------------------

@pytest.fixture
def device_rig(tmp_path, monkeypatch):
    sim = AzureSim(renegotiate=0.05, operation_seconds=0.05, retry_after="0")
    sim.add_gateway("vpngw-0", gateway_ip(0))
    sim.add_connection("cf-0", "vpngw-0", CF_ENDPOINTS[0], key="OldKey0123456789abcdef")
    with serve(sim, tmp_path) as azure:
        for name, value in azure.env().items():
            if name != "AZURE_AUTHORITY_HOST":
                monkeypatch.setenv(name, value)
        spec = parse_devices(tomllib.loads(device_block(azure).replace('timeout = "5s"', 'timeout = "2s"'))
                             ["devices"])[0]
        from rotator.adapters.devices import build_device

        device = build_device(spec)
        try:
            yield azure, device
        finally:
            device.close()


def tunnel(psk: str, previous: str = "OldKey0123456789abcdef"):
    from rotator.rotation.ports import DeviceTunnel
    from rotator.secret import Secret

    return DeviceTunnel("a" * 32, "tun-a", Secret(psk), Secret(previous), gateway_ip(0), CF_ENDPOINTS[0])


def deliver(device, t):
    import time

    return device.deliver("b" * 32, "r1", [t], deadline=time.monotonic() + device.timeout)[t.tunnel_id]


def test_a_lost_answer_to_the_update_is_read_back(device_rig):
    azure, device = device_rig
    azure.sim.drop_next("azure.sharedkey_set")  # Azure takes the key; the answer never arrives
    result = deliver(device, tunnel("NewKey0123456789abcdef"))
    assert result.ok and "read back" in (result.reason or "")
    assert azure.sim.key_of("cf-0") == "NewKey0123456789abcdef"


def test_an_update_running_elsewhere_leaves_the_key_pending(device_rig):
    azure, device = device_rig
    azure.sim.busy("cf-0")  # another operation holds the connection past the deadline
    result = deliver(device, tunnel("NewKey0123456789abcdef"))
    assert result.status.value == "unknown" and "still updating" in (result.reason or "")
    assert azure.sim.keys_set("cf-0") == []


def test_reasons_from_azure_are_redacted(device_rig):
    azure, device = device_rig
    key = "NewKey0123456789abcdef"
    azure.sim.fail_next("azure.sharedkey_set", count=5, status=400, message=f"the value {key} is not allowed")
    result = deliver(device, tunnel(key))
    assert result.status.value == "failed" and key not in (result.reason or "") and "HTTP 400" in (result.reason or "")


def test_the_client_secret_is_a_secret_the_redactor_knows(device_rig, monkeypatch):
    from rotator.adapters.devices import secrets_of

    azure, device = device_rig
    spec = parse_devices(tomllib.loads(device_block(azure))["devices"])
    assert [s.reveal() for s in secrets_of(spec)] == [azure.client.secret]
    assert azure.client.secret not in repr(spec) and azure.client.secret not in str(spec[0].masked())


def verify(device, t, seconds: float = 2.0):
    import time

    return device.verify("b" * 32, "r1", [t], deadline=time.monotonic() + seconds)[t.tunnel_id]


def test_verify_resets_once_the_connection_is_free_and_sees_it_connected(device_rig):
    azure, device = device_rig
    t = tunnel("NewKey0123456789abcdef")
    assert deliver(device, t).ok
    helpers.wait_for(lambda: azure.sim.key_of("cf-0") == t.psk.reveal(), what="the update to finish")
    azure.sim.busy("cf-0", seconds=0.3)  # the reset meets 409 AnotherOperationInProgress first
    assert verify(device, t).ok
    assert azure.sim.connections["cf-0"].resets == 1 and azure.sim.status_of("cf-0") == "Connected"


def test_verify_of_an_update_that_never_ends_is_unknown(device_rig):
    azure, device = device_rig
    azure.sim.hang_operations("cf-0")
    t = tunnel("NewKey0123456789abcdef")
    assert deliver(device, t).ok  # accepted by ARM
    result = verify(device, t, seconds=1.5)
    assert result.status.value == "unknown" and "reset not sent" in (result.reason or "")
    assert azure.sim.connections["cf-0"].resets == 0


def test_verify_of_an_update_that_failed_is_failed(device_rig):
    azure, device = device_rig
    azure.sim.fail_operations("cf-0")
    t = tunnel("NewKey0123456789abcdef")
    assert deliver(device, t).ok
    result = verify(device, t)
    assert result.status.value == "failed" and "does not hold the new key" in (result.reason or "")


def test_rotator_sim_serves_the_azure_fake_for_a_config_to_try(tmp_path):
    from rotator.sim import Simulators

    with Simulators(accounts=1, tunnels=2, azure=True) as sims:
        sims.azure_sim.renegotiate, sims.azure_sim.operation_seconds, sims.azure_sim.retry_after = 0.1, 0.1, "0"
        acc = next(iter(sims.tunnels_by_account))
        assert sims.info()["azure"]["connections"] == ["cf-0", "cf-1"]
        path = helpers.write_config(tmp_path, sims.azure_config(poll_interval=0.05))
        done = helpers.run_cli(["rotate", "--account", acc, "--all", "--local", "--config", path], sims.env())
        helpers.SECRETS.update(sims.azure_sim.scan_secrets())
        helpers.remember_secrets(sims)
        assert done.returncode == 0, done.stdout + done.stderr
        assert assert_both_ends(sims, acc, sims.azure_sim.held, strict=True) == 2


def test_the_error_table_without_an_http_answer():
    from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError, ServiceResponseError
    from azure.identity import CredentialUnavailableError

    from rotator.adapters.devices.azure_vpn import _Late, classify
    from rotator.rotation.ports import DeviceStatus

    what = "set the shared key of connection cf-0"
    table = [
        (ServiceRequestError("Connection refused"), DeviceStatus.FAILED, "nothing was sent"),
        (ServiceResponseError("Connection aborted"), DeviceStatus.UNKNOWN, "answer from Azure was lost"),
        (_Late(), DeviceStatus.UNKNOWN, "may still land"),
        (CredentialUnavailableError("EnvironmentCredential unavailable"), DeviceStatus.FAILED, "AZURE_CLIENT_ID"),
        (ClientAuthenticationError("AADSTS7000215: Invalid client secret"), DeviceStatus.FAILED, "AADSTS7000215"),
        (ValueError("odd"), DeviceStatus.UNKNOWN, "unexpected error"),
    ]
    for exc, status, words in table:
        got, reason = classify(exc, what)
        assert got is status and words in reason and what in reason and "\n" not in reason, (exc, reason)
