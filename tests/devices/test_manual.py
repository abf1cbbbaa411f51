"""The manual device: keys wait for an operator; it cannot verify."""

from __future__ import annotations

import time

from rotator.adapters.devices import DeviceRegistry, ManualDevice, parse_devices
from rotator.rotation.ports import DeviceStatus
from tests.devices.conftest import ACCOUNT, assert_no_key, make_tunnels


def test_deliver_and_rollback_wait_for_an_operator_and_verify_says_it_did_not_verify():
    tunnels = make_tunnels(2)
    device = ManualDevice("pfsense", ack_timeout=3600)
    end = time.monotonic() + 5
    delivered = device.deliver(ACCOUNT, "r", tunnels, deadline=end)
    assert {r.status for r in delivered.values()} == {DeviceStatus.WAITING}
    assert set(delivered) == {t.tunnel_id for t in tunnels}
    reason = delivered[tunnels[0].tunnel_id].reason
    assert reason.startswith("waiting for an operator to acknowledge that pfsense holds the new key")
    assert f"rotator ack --account {ACCOUNT}" in reason
    rolled = device.rollback(ACCOUNT, "r", tunnels, deadline=end)
    assert {r.status for r in rolled.values()} == {DeviceStatus.WAITING}
    assert "put the previous key back on pfsense" in rolled[tunnels[0].tunnel_id].reason
    verified = device.verify(ACCOUNT, "r", tunnels, deadline=end)
    assert {r.status for r in verified.values()} == {DeviceStatus.OK}
    assert verified[tunnels[0].tunnel_id].reason.startswith("not verified: a manual device cannot verify")
    assert_no_key(repr([delivered, rolled, verified, device]), tunnels)


def test_a_manual_device_from_config_never_verifies_and_carries_its_ack_timeout():
    (spec,) = parse_devices([{"name": "unifi", "kind": "manual", "tunnels": ["*"], "ack_timeout": "6h"}])
    assert spec.verify is False
    device = DeviceRegistry((spec,)).by_name("unifi")
    assert isinstance(device, ManualDevice) and device.ack_timeout == 6 * 3600
