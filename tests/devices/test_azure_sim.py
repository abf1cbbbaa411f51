"""The Azure fake, driven by the Azure SDK itself (azure-mgmt-network and azure-identity) over HTTPS on
loopback: the shapes, status codes, long-running operations and errors the azure_vpn kind relies on."""

from __future__ import annotations

import ssl

import httpx
import pytest
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError

from rotator.sim.azure import AzureSim
from tests import helpers
from tests.devices.azure_env import ManualClock, serve

GW_IP, CF_A, CF_B = "198.51.100.7", "162.159.66.164", "172.64.242.10"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def azure(tmp_path, clock):
    peer_keys: dict[tuple[str, str], str] = {}
    sim = AzureSim(clock=clock, retry_after="0", renegotiate=2.0, peer=lambda a, t: peer_keys.get((a, t)))
    sim.add_gateway("vpngw", GW_IP)
    sim.add_connection("cf-a", "vpngw", CF_A, key="InitialKeyA1234567890", tunnel=("acc", "ta"))
    sim.add_connection("cf-b", "vpngw", CF_B, key="InitialKeyB1234567890", tunnel=("acc", "tb"))
    peer_keys.update({("acc", "ta"): "InitialKeyA1234567890", ("acc", "tb"): "InitialKeyB1234567890"})
    with serve(sim, tmp_path) as running:
        running.peer_keys = peer_keys  # type: ignore[attr-defined]
        yield running


def test_list_pages_through_next_link(azure):
    azure.sim.page_size = 2
    for i in range(3):
        azure.sim.add_connection(f"extra-{i}", "vpngw", f"192.0.2.{i + 1}")
    ops = azure.network_client().virtual_network_gateway_connections
    names = [c.name for c in ops.list(azure.sim.resource_group)]
    assert names == ["cf-a", "cf-b", "extra-0", "extra-1", "extra-2"]
    assert azure.sim.request_counts()["azure.list"] == 3


def test_connection_refers_to_its_gateways_by_id_and_they_hold_the_addresses(azure):
    net = azure.network_client()
    rg = azure.sim.resource_group
    conn = net.virtual_network_gateway_connections.get(rg, "cf-a")
    assert conn.connection_status == "Connected" and conn.connection_type == "IPsec"
    gateway = net.virtual_network_gateways.get(rg, conn.virtual_network_gateway1.id.rsplit("/", 1)[-1])
    pip_name = gateway.ip_configurations[0].public_ip_address.id.rsplit("/", 1)[-1]
    assert net.public_ip_addresses.get(rg, pip_name).ip_address == GW_IP  # Cloudflare's customer_endpoint
    lgw = net.local_network_gateways.get(rg, conn.local_network_gateway2.id.rsplit("/", 1)[-1])
    assert lgw.gateway_ip_address == CF_A  # Cloudflare's anycast endpoint


def test_set_shared_key_is_a_long_running_operation(azure, clock):
    azure.sim.operation_seconds = 30.0
    ops = azure.network_client().virtual_network_gateway_connections
    rg = azure.sim.resource_group
    poller = ops.begin_set_shared_key(rg, "cf-a", {"value": "NextKeyA0987654321"})
    helpers.wait_for(lambda: azure.sim.request_counts().get("azure.operation", 0) >= 1, what="a status poll")
    assert poller.status() == "InProgress" and not poller.done()
    assert ops.get_shared_key(rg, "cf-a").value == "InitialKeyA1234567890"  # not applied until it finishes
    assert ops.get(rg, "cf-a").provisioning_state == "Updating"
    with pytest.raises(HttpResponseError) as exc:  # one operation at a time
        ops.begin_set_shared_key(rg, "cf-a", {"value": "OtherKeyA0987654321"}).result()
    assert exc.value.status_code == 409 and exc.value.error.code == "AnotherOperationInProgress"
    clock.advance(30.0)
    assert poller.result(timeout=20).value == "NextKeyA0987654321"
    assert ops.get_shared_key(rg, "cf-a").value == "NextKeyA0987654321"
    assert azure.sim.keys_set("cf-a") == ["NextKeyA0987654321"]


def test_the_connection_is_up_only_while_both_ends_hold_its_key(azure, clock):
    ops = azure.network_client().virtual_network_gateway_connections
    rg = azure.sim.resource_group
    ops.begin_set_shared_key(rg, "cf-a", {"value": "NextKeyA0987654321"}).result()
    assert ops.get(rg, "cf-a").connection_status == "Connecting"  # the SA was dropped; negotiating
    clock.advance(2.0)
    assert ops.get(rg, "cf-a").connection_status == "NotConnected"  # Cloudflare still has the old key
    azure.peer_keys[("acc", "ta")] = "NextKeyA0987654321"
    clock.advance(2.0)
    assert ops.get(rg, "cf-a").connection_status == "Connected"
    assert ops.get(rg, "cf-b").connection_status == "Connected"  # the partner never moved


def test_reset_forces_a_negotiation_that_an_established_sa_would_skip(azure, clock):
    ops = azure.network_client().virtual_network_gateway_connections
    rg = azure.sim.resource_group
    azure.peer_keys[("acc", "tb")] = "SomethingElse123456789"  # the peer changed; the SA survives
    assert ops.get(rg, "cf-b").connection_status == "Connected"
    assert ops.begin_reset_connection(rg, "cf-b").result() is None
    clock.advance(2.0)
    assert ops.get(rg, "cf-b").connection_status == "NotConnected"


def test_an_operation_that_fails_changes_nothing(azure):
    azure.sim.fail_operations("cf-a", code="VpnGatewayUpdateFailed", message="Gateway update failed.")
    ops = azure.network_client().virtual_network_gateway_connections
    rg = azure.sim.resource_group
    with pytest.raises(HttpResponseError) as exc:
        ops.begin_set_shared_key(rg, "cf-a", {"value": "NextKeyA0987654321"}).result()
    assert "VpnGatewayUpdateFailed" in str(exc.value)
    assert ops.get_shared_key(rg, "cf-a").value == "InitialKeyA1234567890"
    assert ops.get(rg, "cf-a").connection_status == "Connected"


def test_errors_in_arm_format(azure):
    ops = azure.network_client(retry_total=0).virtual_network_gateway_connections
    rg = azure.sim.resource_group
    with pytest.raises(ResourceNotFoundError) as missing:
        ops.get(rg, "no-such")
    assert missing.value.error.code == "ResourceNotFound"
    azure.sim.deny(azure.client.client_id, "Microsoft.Network/connections/sharedKey/write")
    with pytest.raises(HttpResponseError) as denied:
        ops.begin_set_shared_key(rg, "cf-a", {"value": "NextKeyA0987654321"})
    assert denied.value.status_code == 403 and denied.value.error.code == "AuthorizationFailed"
    assert "Microsoft.Network/connections/sharedKey/write" in denied.value.error.message
    azure.sim.fail_next("azure.connection", status=429, retry_after=3)
    with pytest.raises(HttpResponseError) as throttled:
        ops.get(rg, "cf-a")
    assert throttled.value.status_code == 429 and throttled.value.response.headers["Retry-After"] == "3"
    assert ops.get_shared_key(rg, "cf-a").value == "InitialKeyA1234567890"  # the key never changed


def test_the_sdk_retries_5xx_and_429_by_itself(azure):
    ops = azure.network_client(retry_backoff_factor=0.01).virtual_network_gateway_connections
    azure.sim.fail_next("azure.sharedkey_get", count=2, status=503)
    assert ops.get_shared_key(azure.sim.resource_group, "cf-a").value == "InitialKeyA1234567890"
    assert azure.sim.request_counts()["azure.sharedkey_get"] == 3


def test_bearer_tokens_are_checked(azure):
    url = (f"{azure.url}/subscriptions/{azure.sim.subscription_id}/resourceGroups/{azure.sim.resource_group}"
           "/providers/Microsoft.Network/connections/cf-a")
    with httpx.Client(verify=ssl.create_default_context(cafile=azure.ca_file)) as http:
        missing = http.get(url, params={"api-version": "2024-05-01"})
        forged = http.get(url, params={"api-version": "2024-05-01"}, headers={"Authorization": "Bearer forged"})
    assert missing.status_code == forged.status_code == 401
    assert forged.headers["www-authenticate"].startswith("Bearer ")
    assert forged.json()["error"]["code"] == "InvalidAuthenticationToken"
    ops = azure.network_client().virtual_network_gateway_connections
    ops.get(azure.sim.resource_group, "cf-a")
    token = next(iter(azure.sim.tokens))
    with httpx.Client(verify=ssl.create_default_context(cafile=azure.ca_file), headers={"Authorization": f"Bearer {token}"}) as http:
        no_version = http.get(url)
        ok = http.get(url, params={"api-version": "2024-05-01"})
    assert no_version.status_code == 400 and no_version.json()["error"]["code"] == "MissingApiVersionParameter"
    assert ok.status_code == 200 and ok.json()["properties"]["connectionStatus"] == "Connected"
    azure.sim.revoke_tokens()
    with pytest.raises(ClientAuthenticationError) as expired:  # the client's cached token is refused now
        ops.get(azure.sim.resource_group, "cf-a")
    assert expired.value.status_code == 401


def test_a_wrong_client_secret_gets_no_token(azure):
    from azure.identity import ClientSecretCredential
    from azure.mgmt.network import NetworkManagementClient

    wrong = "WrongSecret-" + "q7" * 12
    helpers.SECRETS.add(wrong)
    credential = ClientSecretCredential(azure.client.tenant, azure.client.client_id, wrong, authority=azure.url,
                                        disable_instance_discovery=True, connection_verify=azure.ca_file)
    client = NetworkManagementClient(credential, azure.sim.subscription_id, base_url=azure.url,
                                     connection_verify=azure.ca_file)
    azure.clients.append(client)
    with pytest.raises(ClientAuthenticationError) as exc:
        client.virtual_network_gateway_connections.get(azure.sim.resource_group, "cf-a")
    assert "AADSTS7000215" in str(exc.value)
    assert not azure.sim.tokens


def test_scan_secrets_knows_every_key_secret_and_token(azure):
    ops = azure.network_client().virtual_network_gateway_connections
    ops.begin_set_shared_key(azure.sim.resource_group, "cf-a", {"value": "NextKeyA0987654321"}).result()
    held = set(azure.sim.scan_secrets())
    assert {"NextKeyA0987654321", "InitialKeyB1234567890", azure.client.secret} <= held
    assert set(azure.sim.tokens) <= held and azure.sim.tokens
