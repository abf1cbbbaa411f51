"""The simulated device: its HTTP control routes, its snapshot (no keys), and the Cloudflare simulator
as its peer, so verification means 'a fresh authentication would succeed'."""

from __future__ import annotations

import time

import httpx

from rotator.adapters.cloudflare import CloudflareClient
from rotator.adapters.devices.webhook import WebhookDevice
from rotator.rotation.ports import DeviceStatus, DeviceTunnel
from rotator.secret import Secret
from rotator.sim import Simulators
from rotator.sim.device import DeviceSim, serve
from tests.devices.conftest import assert_no_key, new_key


def test_control_routes_arm_faults_and_the_snapshot_shows_no_key():
    sim = DeviceSim()
    with serve(sim) as url:
        root = url.removesuffix("/psk")
        device = WebhookDevice("sim", url, Secret(sim.secret), timeout=5)
        try:
            t = DeviceTunnel("a" * 32, "site-0", Secret(new_key()), None)
            for op, args in (("refuse", {"tunnel_ids": [t.tunnel_id]}), ("set_verify_latency", {"seconds": 0.01})):
                assert httpx.post(root + "/_sim/control", json={"op": op, **args}).json()["ok"] is True
            (r,) = device.deliver("0" * 32, "r", [t], deadline=time.monotonic() + 10).values()
            assert r.status is DeviceStatus.FAILED
            assert httpx.post(root + "/_sim/control", json={"op": "clear"}).json()["ok"] is True
            (r,) = device.deliver("0" * 32, "r", [t], deadline=time.monotonic() + 10).values()
            assert r.ok
            state = httpx.get(root + "/_sim/state").json()["result"]
            assert state["request_counts"] == {"device.deliver": 2}
            assert list(state["tunnels"]) == [f"{'0' * 32}/{t.tunnel_id}"]
            assert_no_key(str(state), [t])
            assert httpx.post(root + "/_sim/control", json={"op": "bogus"}).status_code == 400
            assert httpx.get(root + "/other").status_code == 404
        finally:
            device.close()


def test_with_cloudflare_as_its_peer_a_key_verifies_only_once_both_ends_hold_it():
    with Simulators(accounts=1, tunnels=2) as sims:
        acc, (t0, t1) = next(iter(sims.tunnels_by_account.items()))
        sim = DeviceSim(peer=sims.cloudflare.psk_of)
        with serve(sim) as url:
            device = WebhookDevice("sim", url, Secret(sim.secret), timeout=5)
            try:
                tunnels = [DeviceTunnel(tid, f"t{i}", Secret(new_key()), None) for i, tid in enumerate((t0, t1))]
                end = time.monotonic() + 30
                assert all(r.ok for r in device.deliver(acc, "r", tunnels, deadline=end).values())
                # Cloudflare has not applied the keys yet: a fresh authentication would fail.
                assert {r.status for r in device.verify(acc, "r", tunnels, deadline=end).values()} == {
                    DeviceStatus.FAILED}
                with httpx.Client() as http:  # applied at Cloudflare for t0 only, through the real client
                    cf = CloudflareClient(http, base_url=sims.cloudflare_base_url, api_token=sims.cloudflare_api_token)
                    assert cf.set_psks(acc, {t0: tunnels[0].psk}, validate_only=False).applied == {t0}
                verified = device.verify(acc, "r", tunnels, deadline=end)
                assert verified[t0].ok and not verified[t1].ok
                assert sim.held(acc, t0) == sims.cloudflare.psk_of(acc, t0)
            finally:
                device.close()


def test_config_block_parses_into_a_webhook_device_for_the_simulator(tmp_path):
    import tomllib

    from rotator.adapters.devices import DeviceRegistry, parse_devices, secrets_of
    from rotator.sim.device import config_block

    sim = DeviceSim()
    secret_file = tmp_path / "device.key"
    secret_file.write_text(sim.secret)
    with serve(sim) as url:
        specs = parse_devices(tomllib.loads(config_block("sim", url, str(secret_file)))["devices"])
        assert secrets_of(specs) == [Secret(sim.secret)]
        registry = DeviceRegistry(specs)
        try:
            from rotator.model import TunnelInfo

            device = registry.device_for("0" * 32, TunnelInfo("b" * 32, "any"))
            t = DeviceTunnel("b" * 32, "any", Secret(new_key()), None)
            assert device.deliver("0" * 32, "r", [t], deadline=time.monotonic() + 10)[t.tunnel_id].ok
            assert registry.spec_named("sim").timeout == 10.0
        finally:
            registry.close()
