"""The EC2 fake (rotator/sim/aws.py) against boto3 itself: botocore serialises every request from
its service model and parses every answer and error with it, so a shape the fake gets wrong fails
here. The fake's clock is injected: replacement times pass without waiting."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import boto3
import botocore.config
import botocore.exceptions
import pytest

from rotator.sim.aws import AwsSim
from rotator.sim.base import ServerThread


@dataclass
class Clock:
    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Fake:
    sim: AwsSim
    clock: Clock
    url: str
    peers: dict[str, str]

    def client(self, access_key: str | None = None, secret_key: str | None = None, region: str = "eu-west-1"):
        return boto3.session.Session().client(
            "ec2", region_name=region, endpoint_url=self.url,
            aws_access_key_id=access_key or self.sim.access_key,
            aws_secret_access_key=secret_key or self.sim.secret_key,
            config=botocore.config.Config(retries={"total_max_attempts": 1}, read_timeout=5, connect_timeout=2))


@pytest.fixture
def fake() -> Iterator[Fake]:
    clock = Clock()
    peers: dict[str, str] = {}
    sim = AwsSim(replacement=120.0, clock=clock, peer=peers.get)
    server = ServerThread(sim).start()
    try:
        yield Fake(sim, clock, server.url, peers)
    finally:
        server.stop()


def code_of(exc: pytest.ExceptionInfo[botocore.exceptions.ClientError]) -> tuple[str, int]:
    return exc.value.response["Error"]["Code"], exc.value.response["ResponseMetadata"]["HTTPStatusCode"]


def test_describe_answers_the_model_shapes(fake: Fake) -> None:
    conn = fake.sim.add_connection(("198.51.100.1", "198.51.100.2"), ("Akey.one_111", "Akey.two_222"))
    fake.peers["198.51.100.1"] = "Akey.one_111"  # Cloudflare holds the same key for the first tunnel only
    fake.sim.hold_down([])
    answer = fake.client().describe_vpn_connections()
    (vpn,) = answer["VpnConnections"]
    assert vpn["VpnConnectionId"] == conn and vpn["State"] == "available"
    options = {o["OutsideIpAddress"]: o for o in vpn["Options"]["TunnelOptions"]}
    assert options["198.51.100.1"]["PreSharedKey"] == "Akey.one_111" and options["198.51.100.2"]["StartupAction"] == "start"
    telemetry = {t["OutsideIpAddress"]: t for t in vpn["VgwTelemetry"]}
    assert telemetry["198.51.100.1"]["Status"] == "UP" and telemetry["198.51.100.2"]["Status"] == "DOWN"
    assert telemetry["198.51.100.1"]["LastStatusChange"].timestamp() == fake.clock.now


def test_describe_by_id_and_an_unknown_id(fake: Fake) -> None:
    a, b = fake.sim.add_connection(), fake.sim.add_connection()
    answer = fake.client().describe_vpn_connections(VpnConnectionIds=[b])
    assert [v["VpnConnectionId"] for v in answer["VpnConnections"]] == [b]
    with pytest.raises(botocore.exceptions.ClientError) as err:
        fake.client().describe_vpn_connections(VpnConnectionIds=[a, "vpn-0000000000000dead"])
    assert code_of(err) == ("InvalidVpnConnectionID.NotFound", 400)


def test_a_modification_replaces_the_tunnel_and_blocks_the_connection_meanwhile(fake: Fake) -> None:
    conn = fake.sim.add_connection(("198.51.100.1", "198.51.100.2"), ("Aold.key_1111", "Aold.key_2222"))
    fake.peers.update({"198.51.100.1": "Aold.key_1111", "198.51.100.2": "Aold.key_2222"})
    ec2 = fake.client()
    answer = ec2.modify_vpn_tunnel_options(VpnConnectionId=conn, VpnTunnelOutsideIpAddress="198.51.100.1",
                                           TunnelOptions={"PreSharedKey": "Anew.key_1111"})
    assert answer["VpnConnection"]["State"] == "modifying"
    assert fake.sim.key_of("198.51.100.1") == "Anew.key_1111"
    with pytest.raises(botocore.exceptions.ClientError) as err:
        ec2.modify_vpn_tunnel_options(VpnConnectionId=conn, VpnTunnelOutsideIpAddress="198.51.100.2",
                                      TunnelOptions={"PreSharedKey": "Anew.key_2222"})
    assert code_of(err) == ("IncorrectState", 400)
    fake.peers["198.51.100.1"] = "Anew.key_1111"  # Cloudflare applies the key during the replacement
    status = {t["OutsideIpAddress"]: t for t in ec2.describe_vpn_connections()["VpnConnections"][0]["VgwTelemetry"]}
    assert status["198.51.100.1"]["Status"] == "DOWN" and status["198.51.100.2"]["Status"] == "UP"
    fake.clock.now += 121
    vpn = ec2.describe_vpn_connections()["VpnConnections"][0]
    status = {t["OutsideIpAddress"]: t for t in vpn["VgwTelemetry"]}
    assert vpn["State"] == "available" and status["198.51.100.1"]["Status"] == "UP"
    assert status["198.51.100.1"]["LastStatusChange"].timestamp() == fake.clock.now
    assert [m.outside_ip for m in fake.sim.modifications_of()] == ["198.51.100.1"]


def test_a_key_aws_refuses_is_invalid_parameter_value(fake: Fake) -> None:
    conn = fake.sim.add_connection(("198.51.100.1", "198.51.100.2"))
    for bad in ("0starts.with.zero", "short", "has-a-dash-inside", "x" * 65):
        with pytest.raises(botocore.exceptions.ClientError) as err:
            fake.client().modify_vpn_tunnel_options(VpnConnectionId=conn, VpnTunnelOutsideIpAddress="198.51.100.1",
                                                    TunnelOptions={"PreSharedKey": bad})
        assert code_of(err) == ("InvalidParameterValue", 400)
    assert not fake.sim.modifications_of()


def test_wrong_credentials_are_refused_as_ec2_does(fake: Fake) -> None:
    fake.sim.add_connection()
    with pytest.raises(botocore.exceptions.ClientError) as err:
        fake.client(access_key="AKIAWRONGWRONGWRONG0").describe_vpn_connections()
    assert code_of(err) == ("AuthFailure", 401)
    with pytest.raises(botocore.exceptions.ClientError) as err:
        fake.client(secret_key="not-the-secret-key").describe_vpn_connections()
    assert code_of(err) == ("SignatureDoesNotMatch", 403)
    with pytest.raises(botocore.exceptions.ClientError) as err:
        fake.client(region="us-east-1").describe_vpn_connections()
    assert code_of(err) == ("AuthFailure", 401)


def test_faults_answer_ec2_error_documents(fake: Fake) -> None:
    conn = fake.sim.add_connection(("198.51.100.1", "198.51.100.2"))
    ec2 = fake.client()
    fake.sim.throttle_next("DescribeVpnConnections")
    with pytest.raises(botocore.exceptions.ClientError) as err:
        ec2.describe_vpn_connections()
    assert code_of(err) == ("RequestLimitExceeded", 503)
    fake.sim.server_error_next("ModifyVpnTunnelOptions")
    with pytest.raises(botocore.exceptions.ClientError) as err:
        ec2.modify_vpn_tunnel_options(VpnConnectionId=conn, VpnTunnelOutsideIpAddress="198.51.100.1",
                                      TunnelOptions={"PreSharedKey": "Avalid.key_1"})
    assert code_of(err) == ("InternalError", 500)
    assert not fake.sim.modifications_of()  # a status fault is answered before anything takes effect
    fake.sim.deny("ModifyVpnTunnelOptions")
    with pytest.raises(botocore.exceptions.ClientError) as err:
        ec2.modify_vpn_tunnel_options(VpnConnectionId=conn, VpnTunnelOutsideIpAddress="198.51.100.1",
                                      TunnelOptions={"PreSharedKey": "Avalid.key_1"})
    assert code_of(err) == ("UnauthorizedOperation", 403)


def test_a_tunnel_held_down_or_without_startup_action_start_never_comes_up(fake: Fake) -> None:
    fake.sim.add_connection(("198.51.100.1", "198.51.100.2"), ("Asame.key_1", "Asame.key_2"), startup_action="add")
    fake.sim.add_connection(("198.51.100.3", "198.51.100.4"), ("Asame.key_3", "Asame.key_4"))
    fake.peers.update({"198.51.100.1": "Asame.key_1", "198.51.100.3": "Asame.key_3"})
    fake.sim.hold_down(["198.51.100.3"])
    assert fake.sim.status_of("198.51.100.1") == "DOWN" and fake.sim.status_of("198.51.100.3") == "DOWN"
    fake.sim.clear()
    assert fake.sim.status_of("198.51.100.3") == "UP"


def test_scan_secrets_lists_every_key_and_the_secret_key(fake: Fake) -> None:
    fake.sim.add_connection(("198.51.100.1", "198.51.100.2"), ("Aone.key_1111", "Atwo.key_2222"))
    listed = fake.sim.scan_secrets()
    assert fake.sim.secret_key in listed and {"Aone.key_1111", "Atwo.key_2222"} <= set(listed)
    snapshot = repr(fake.sim.snapshot())
    assert "Aone.key_1111" not in snapshot and fake.sim.secret_key not in snapshot
