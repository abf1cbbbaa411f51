"""The ``aws_vpn`` kind through boto3 against the EC2 fake over loopback, one clock for both (the
fake's replacement time and verify's polling pass without real waiting): matching, the repeated
deliver that changes nothing, one modification per connection, verify's rules, the error table."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import boto3
import botocore.config
import pytest

from rotator.adapters.devices import kind, parse_devices
from rotator.adapters.devices.aws_vpn import AwsVpnDevice
from rotator.errors import ConfigError
from rotator.model import TunnelInfo
from rotator.rotation.ports import DeviceStatus, DeviceTunnel
from rotator.secret import Secret
from rotator.sim.aws import AwsSim
from rotator.sim.base import ServerThread
from tests.devices.conftest import ACCOUNT

A1, A2, B1, B2 = "198.51.100.1", "198.51.100.2", "198.51.100.3", "198.51.100.4"
OLD = {A1: "Aold.key_a1_000000", A2: "Aold.key_a2_000000", B1: "Aold.key_b1_000000", B2: "Aold.key_b2_000000"}


@dataclass
class Clock:
    now: float = 1_800_000_000.25

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Rig:
    sim: AwsSim
    clock: Clock
    url: str
    cloudflare: dict[str, str] = field(default_factory=lambda: dict(OLD))  # outside ip -> the key Cloudflare holds
    conns: list[str] = field(default_factory=list)

    def device(self, **kw: object) -> AwsVpnDevice:
        client = boto3.session.Session().client(
            "ec2", region_name="eu-west-1", endpoint_url=self.url, aws_access_key_id=self.sim.access_key,
            aws_secret_access_key=self.sim.secret_key,
            config=botocore.config.Config(retries={"total_max_attempts": 1}, read_timeout=kw.pop("read", 5),
                                          connect_timeout=2))
        args: dict[str, object] = {"timeout": 10.0, "verify_timeout": 600.0, "client": client, "clock": self.clock,
                                   "sleep": self.clock.sleep, "poll_interval": 15.0, **kw}
        return AwsVpnDevice("aws-eu", "eu-west-1", **args)  # type: ignore[arg-type]


@pytest.fixture
def rig() -> Iterator[Rig]:
    clock = Clock()
    holder: list[Rig] = []
    sim = AwsSim(replacement=300.0, clock=clock, peer=lambda ip: holder[0].cloudflare.get(ip))
    server = ServerThread(sim).start()
    r = Rig(sim, clock, server.url)
    holder.append(r)
    r.conns = [sim.add_connection((A1, A2), (OLD[A1], OLD[A2])), sim.add_connection((B1, B2), (OLD[B1], OLD[B2]))]
    try:
        yield r
    finally:
        server.stop()


def tunnel(ip: str | None, key: str, n: int = 1) -> DeviceTunnel:
    return DeviceTunnel(f"{n:032x}", f"aws-{n}", Secret(key), Secret(OLD.get(ip or "", "Aprevious.key_0")), ip)


def deadline(seconds: float = 30.0) -> float:
    return time.monotonic() + seconds


def test_the_kind_parses_its_keys_and_refuses_bad_ones() -> None:
    (spec,) = parse_devices([{"name": "aws-eu", "kind": "aws_vpn", "region": "eu-west-1", "tunnels": ["aws-*"],
                              "vpn_connection_ids": ["vpn-0abc12345def67890"], "verify_timeout": "15m"}])
    assert spec.verify_timeout == 900 and spec.timeout == 60 and spec.masked()["region"] == "eu-west-1"
    for bad, key in (({"region": "Ireland"}, "region"), ({"vpn_connection_ids": ["vpc-1"]}, "vpn_connection_ids"),
                     ({"secret_access_key": "x"}, "secret_access_key")):
        block = {"name": "a", "kind": "aws_vpn", "region": "eu-west-1", "tunnels": ["*"], **bad}
        with pytest.raises(ConfigError, match=rf"devices\[0\]\.{key}"):
            parse_devices([block])
    module = kind("aws_vpn")
    assert module.INTERRUPTS and module.PROOF == "vendor_status"


def test_deliver_modifies_the_matched_tunnel_and_verify_waits_for_up_after_it(rig: Rig) -> None:
    dev = rig.device()
    t = tunnel(A1, "Anew.key_a1_111111")
    assert dev.deliver(ACCOUNT, "r", [t], deadline=deadline())[t.tunnel_id].ok
    assert rig.sim.key_of(A1) == "Anew.key_a1_111111" and rig.sim.state_of(rig.conns[0]) == "modifying"
    rig.cloudflare[A1] = "Anew.key_a1_111111"  # Cloudflare applies
    started = rig.clock.now
    result = dev.verify(ACCOUNT, "r", [t], deadline=deadline())[t.tunnel_id]
    assert result.ok, result.reason
    assert rig.clock.now - started >= 300  # it polled through the whole replacement
    assert [m.outside_ip for m in rig.sim.modifications_of()] == [A1]


def test_a_repeated_deliver_of_a_key_already_held_changes_nothing(rig: Rig) -> None:
    dev = rig.device()
    t = tunnel(A1, OLD[A1])  # the tunnel already holds this key (a reconcile after a crash)
    assert dev.deliver(ACCOUNT, "r", [t], deadline=deadline())[t.tunnel_id].ok
    assert rig.sim.modifications_of() == [] and rig.sim.state_of(rig.conns[0]) == "available"
    assert dev.verify(ACCOUNT, "r", [t], deadline=deadline())[t.tunnel_id].ok  # UP on that key suffices


def test_an_unmatched_tunnel_is_refused_naming_what_was_looked_for(rig: Rig) -> None:
    dev = rig.device(connection_ids=(rig.conns[0],))
    t = tunnel(B1, "Anew.key_b1_111111")  # on a connection this device is not given
    result = dev.deliver(ACCOUNT, "r", [t], deadline=deadline())[t.tunnel_id]
    assert result.status is DeviceStatus.FAILED
    assert B1 in (result.reason or "") and rig.conns[0] in (result.reason or "")
    assert rig.sim.modifications_of() == []


def test_two_tunnels_of_one_connection_in_one_call_modify_only_one(rig: Rig) -> None:
    dev = rig.device()
    a1, a2 = tunnel(A1, "Anew.key_a1_111111", 1), tunnel(A2, "Anew.key_a2_111111", 2)
    out = dev.deliver(ACCOUNT, "r", [a1, a2], deadline=deadline())
    assert out[a1.tunnel_id].ok and out[a2.tunnel_id].status is DeviceStatus.FAILED
    assert "one modification per connection" in (out[a2.tunnel_id].reason or "")
    assert [m.outside_ip for m in rig.sim.modifications_of()] == [A1]


def test_a_connection_that_is_modifying_is_not_touched(rig: Rig) -> None:
    dev = rig.device()
    assert dev.deliver(ACCOUNT, "r", [tunnel(A1, "Anew.key_a1_111111")], deadline=deadline())
    result = dev.deliver(ACCOUNT, "r", [tunnel(A2, "Anew.key_a2_111111", 2)], deadline=deadline())[f"{2:032x}"]
    assert result.status is DeviceStatus.FAILED and "modifying" in (result.reason or "")
    assert len(rig.sim.modifications_of()) == 1


def test_pairs_are_the_two_tunnels_of_one_connection_and_status_is_the_telemetry(rig: Rig) -> None:
    dev = rig.device()
    infos = [TunnelInfo(f"{i:032x}", f"aws-{i}", customer_endpoint=ip) for i, ip in enumerate((A1, A2, B1, "203.0.113.9"))]
    assert dev.pair_of(ACCOUNT, infos, deadline=deadline()) == {
        infos[0].id: rig.conns[0], infos[1].id: rig.conns[0], infos[2].id: rig.conns[1]}
    rig.cloudflare[B1] = "Asomething.else_0"
    assert dev.tunnels_up(ACCOUNT, infos, deadline=deadline()) == {infos[0].id: True, infos[1].id: True,
                                                                   infos[2].id: False}


@pytest.mark.parametrize(("fault", "expected"), [
    ("throttle", DeviceStatus.UNKNOWN), ("server_error", DeviceStatus.UNKNOWN),
    ("InvalidVpnConnectionID.NotFound", DeviceStatus.FAILED), ("UnauthorizedOperation", DeviceStatus.FAILED),
    ("AuthFailure", DeviceStatus.FAILED)])
def test_modification_errors_follow_the_one_table(rig: Rig, fault: str, expected: DeviceStatus) -> None:
    if fault == "throttle":
        rig.sim.throttle_next("ModifyVpnTunnelOptions")
    elif fault == "server_error":
        rig.sim.server_error_next("ModifyVpnTunnelOptions")
    else:
        rig.sim.refuse_next("ModifyVpnTunnelOptions", fault, "no")
    t = tunnel(A1, "Anew.key_a1_111111")
    result = rig.device().deliver(ACCOUNT, "r", [t], deadline=deadline())[t.tunnel_id]
    assert result.status is expected, result.reason
    assert "\n" not in (result.reason or "") and "Anew.key_a1_111111" not in (result.reason or "")


def test_a_modification_whose_answer_never_comes_is_unknown(rig: Rig) -> None:
    rig.sim.late_next("ec2.ModifyVpnTunnelOptions", delay=3.0)  # AWS acts, the answer is late
    t = tunnel(A1, "Anew.key_a1_111111")
    result = rig.device(read=1).deliver(ACCOUNT, "r", [t], deadline=deadline())[t.tunnel_id]
    assert result.status is DeviceStatus.UNKNOWN and "may have accepted" in (result.reason or "")
    assert rig.sim.key_of(A1) == "Anew.key_a1_111111"  # it did land: unknown was right


def test_unreadable_connections_fail_the_whole_call_and_send_nothing(rig: Rig) -> None:
    rig.sim.refuse_next("DescribeVpnConnections", "UnauthorizedOperation", "You are not authorized")
    out = rig.device().deliver(ACCOUNT, "r", [tunnel(A1, "Anew.key_a1_111111")], deadline=deadline())
    (result,) = out.values()
    assert result.status is DeviceStatus.FAILED and "ec2:DescribeVpnConnections" in (result.reason or "")
    assert rig.sim.modifications_of() == []


def test_verify_fails_a_tunnel_that_stays_down_and_is_unknown_while_modifying(rig: Rig) -> None:
    dev = rig.device(verify_timeout=900.0)
    t = tunnel(A1, "Anew.key_a1_111111")
    assert dev.deliver(ACCOUNT, "r", [t], deadline=deadline())[t.tunnel_id].ok
    rig.cloudflare[A1] = "Anew.key_a1_111111"
    rig.sim.hold_down([A1])  # the far end never negotiates
    result = dev.verify(ACCOUNT, "r", [t], deadline=deadline())[t.tunnel_id]
    assert result.status is DeviceStatus.FAILED and "startup action" in (result.reason or "")
    b = tunnel(B1, "Anew.key_b1_111111", 3)
    assert dev.deliver(ACCOUNT, "r", [b], deadline=deadline())[b.tunnel_id].ok
    short = rig.device(verify_timeout=60.0)
    result = short.verify(ACCOUNT, "r", [b], deadline=deadline())[b.tunnel_id]
    assert result.status is DeviceStatus.UNKNOWN and "modifying" in (result.reason or "")


def test_verify_needs_a_status_change_after_the_deliver(rig: Rig) -> None:
    """UP from before the deliver (same second resolution) is not proof: the key is new."""
    dev = rig.device(verify_timeout=120.0)
    t = tunnel(A1, "Anew.key_a1_111111")
    rig.sim.replacement = 0.0  # AWS is done at once; the telemetry changes in the deliver's second
    assert dev.deliver(ACCOUNT, "r", [t], deadline=deadline())[t.tunnel_id].ok
    rig.cloudflare[A1] = "Anew.key_a1_111111"
    result = dev.verify(ACCOUNT, "r", [t], deadline=deadline())[t.tunnel_id]
    assert result.status is DeviceStatus.FAILED  # UP, but LastStatusChange is in the deliver's own second


def test_verify_timeout_does_not_count_for_the_lease_ttl_rule(tmp_path) -> None:
    env = {"VAULT_ADDR": "http://127.0.0.1:1", "VAULT_TOKEN": "t" * 26, "CLOUDFLARE_API_TOKEN": "c" * 40}
    from rotator import config

    def load(timeout: str) -> config.Settings:
        path = tmp_path / "rotator.toml"
        path.write_text('[rotation]\nlease_ttl = "120s"\n[policies.default]\nevery = "30d"\npsk_charset = "aws"\n'
                        '[[devices]]\nname = "aws-eu"\nkind = "aws_vpn"\nregion = "eu-west-1"\ntunnels = ["*"]\n'
                        f'timeout = "{timeout}"\nverify_timeout = "20m"\n')
        return config.load(str(path), env=env)

    assert load("60s").devices[0].verify_timeout == 1200
    with pytest.raises(ConfigError, match=r"devices\[0\]\.timeout"):
        load("61s")
