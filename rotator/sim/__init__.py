"""Local simulators of Vault KV v2 and the Cloudflare Magic IPsec API (and, optionally, the EC2 API
of AWS Site-to-Site VPN, rotator/sim/aws.py, and the ARM API of Azure VPN Gateway connections,
rotator/sim/azure.py), for the demo, tests and benchmarks."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from rotator.httpserver import ServerThread, stop_all, stop_on_signals
from rotator.sim.aws import AwsSim, attach
from rotator.sim.azure import AzureSim, loopback_tls
from rotator.sim.azure import Client as AzureClient
from rotator.sim.azure import attach as attach_azure
from rotator.sim.cloudflare import CloudflareSim, EdgeHook, HealthSource, RateLimit
from rotator.sim.vault import VaultSim

__all__ = ["AwsSim", "AzureSim", "CloudflareSim", "RateLimit", "Simulators", "VaultSim", "run_sim"]


@dataclass
class Simulators:
    """Both simulators on free loopback ports, with generated accounts, tunnels and credentials.

    ``vault_token`` carries only the least-privilege ``rotator`` policy the README documents;
    ``vault.root_token`` is there for tests that need more.
    """

    accounts: int = 1
    tunnels: int = 3
    rate_limit: RateLimit | None = None
    edge_hook: EdgeHook | None = None  # sees every key Cloudflare applies for real (an IKE lab's edge)
    health_source: HealthSource | None = None  # GraphQL tunnel health from elsewhere (an IKE lab's SAs)
    # With ``aws``: an EC2 fake whose VPN connections terminate one account's tunnels, two per
    # connection, each AWS tunnel UP while its key equals Cloudflare's; ``aws_replacement`` seconds per
    # modification. ``aws_config()`` is the [[devices]] block for it, ``env()`` carries its credentials.
    aws: bool = False
    aws_replacement: float = 2.0
    aws_account: int = 0  # which account (by order) terminates on AWS
    aws_sim: AwsSim | None = field(init=False, default=None)
    # With ``azure``: an ARM fake over loopback TLS whose VPN connections terminate one account's
    # tunnels, two per gateway, each Connected while its key equals Cloudflare's; ``azure_config()``
    # is the [[devices]] block for it, ``env()`` carries its service principal.
    azure: bool = False
    azure_account: int = 0
    azure_sim: AzureSim | None = field(init=False, default=None)
    azure_client: AzureClient | None = field(init=False, default=None)
    _azure_tls: tuple[str, str, str] | None = field(init=False, default=None)  # workdir, CA file, server file
    _azure_server: ServerThread | None = field(init=False, default=None)
    vault: VaultSim = field(init=False)
    cloudflare: CloudflareSim = field(init=False)
    vault_token: str = field(init=False)
    cloudflare_api_token: str = field(init=False)
    tunnels_by_account: dict[str, list[str]] = field(init=False, default_factory=dict)
    _servers: list[ServerThread] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.vault = VaultSim()
        self.cloudflare = CloudflareSim(rate_limit=self.rate_limit, edge_hook=self.edge_hook,
                                        health_source=self.health_source)
        self.vault_token = self.vault.create_token(["default", "rotator"], ttl=24 * 3600, max_ttl=30 * 24 * 3600)
        self.cloudflare_api_token = self.cloudflare.add_token()
        for _ in range(self.accounts):
            acc = self.cloudflare.add_account()
            self.tunnels_by_account[acc] = [self.cloudflare.add_tunnel(acc) for _ in range(self.tunnels)]
        if self.aws:
            self.aws_sim = AwsSim(replacement=self.aws_replacement)
            acc = list(self.tunnels_by_account)[self.aws_account]
            attach(self.aws_sim, self.cloudflare, acc, self.tunnels_by_account[acc])
        if self.azure:
            self.azure_sim = AzureSim(renegotiate=1.0, operation_seconds=2.0, retry_after="1")
            self.azure_client = self.azure_sim.add_client()
            acc = list(self.tunnels_by_account)[self.azure_account]
            attach_azure(self.azure_sim, self.cloudflare, acc, self.tunnels_by_account[acc])

    def start(self) -> Simulators:
        self._servers = [ServerThread(self.vault).start(), ServerThread(self.cloudflare).start()]
        if self.aws_sim is not None:
            self._servers.append(ServerThread(self.aws_sim, name="aws").start())
        if self.azure_sim is not None:
            workdir = tempfile.mkdtemp(prefix="rotator-azure-")
            ca_file, server_file = loopback_tls(workdir)
            self._azure_tls = (workdir, ca_file, server_file)
            self._azure_server = ServerThread(self.azure_sim, tls=(server_file, server_file), name="azure").start()
        return self

    def stop(self) -> None:
        stop_all(self._servers)
        self._servers = []
        if self._azure_server is not None:
            self._azure_server.stop()
            self._azure_server = None
        if self._azure_tls is not None:
            shutil.rmtree(self._azure_tls[0], ignore_errors=True)
            self._azure_tls = None

    def __enter__(self) -> Simulators:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def vault_addr(self) -> str:
        return self._servers[0].url

    @property
    def cloudflare_base_url(self) -> str:
        return self._servers[1].url + self.cloudflare.base_path

    @property
    def aws_endpoint(self) -> str | None:
        return self._servers[2].url if self.aws_sim is not None and len(self._servers) > 2 else None

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "vault_addr": self.vault_addr,
            "vault_token": self.vault_token,
            "cloudflare_base_url": self.cloudflare_base_url,
            "cloudflare_api_token": self.cloudflare_api_token,
            "accounts": self.tunnels_by_account,
        }
        if self.azure_client is not None and self._azure_server is not None and self._azure_tls is not None:
            assert self.azure_sim is not None
            out["azure"] = {"url": self._azure_server.url, "ca_file": self._azure_tls[1],
                            "subscription_id": self.azure_sim.subscription_id,
                            "resource_group": self.azure_sim.resource_group, "tenant_id": self.azure_client.tenant,
                            "client_id": self.azure_client.client_id, "client_secret": self.azure_client.secret,
                            "connections": sorted(c.name for c in self.azure_sim.connections.values())}
        if self.aws_sim is not None:
            out["aws"] = {"endpoint": self.aws_endpoint, "region": self.aws_sim.region,
                          "access_key_id": self.aws_sim.access_key, "secret_access_key": self.aws_sim.secret_key,
                          "vpn_connection_ids": sorted(self.aws_sim.connections)}
        return out

    def env(self) -> dict[str, str]:
        """The standard variables a rotator process needs to talk to these simulators."""
        out = {
            "VAULT_ADDR": self.vault_addr, "VAULT_TOKEN": self.vault_token,
            "CLOUDFLARE_API_TOKEN": self.cloudflare_api_token,
            "CLOUDFLARE_BASE_URL": self.cloudflare_base_url,
        }
        if self.aws_sim is not None and self.aws_endpoint is not None:
            # botocore's own variables: the standard credential chain and endpoint resolution.
            out.update({"AWS_ENDPOINT_URL_EC2": self.aws_endpoint, "AWS_ACCESS_KEY_ID": self.aws_sim.access_key,
                        "AWS_SECRET_ACCESS_KEY": self.aws_sim.secret_key, "AWS_REGION": self.aws_sim.region,
                        "AWS_EC2_METADATA_DISABLED": "true"})
        if self.azure_client is not None:
            # azure-identity's own variables (EnvironmentCredential in DefaultAzureCredential).
            out.update({"AZURE_TENANT_ID": self.azure_client.tenant, "AZURE_CLIENT_ID": self.azure_client.client_id,
                        "AZURE_CLIENT_SECRET": self.azure_client.secret})
        return out

    def azure_config(self, name: str = "azure", verify_timeout: str = "60s", timeout: str = "10s",
                     tunnels: str = "*", poll_interval: float = 1.0) -> str:
        """The [[devices]] block of an azure_vpn device for the ARM fake (docs/design.md section 10)."""
        assert self.azure_sim is not None and self._azure_tls is not None and self._azure_server is not None, \
            "Simulators(azure=True), started"
        url = self._azure_server.url
        return (f'[[devices]]\nname = "{name}"\nkind = "azure_vpn"\ntunnels = ["{tunnels}"]\n'
                f'subscription_id = "{self.azure_sim.subscription_id}"\n'
                f'resource_group = "{self.azure_sim.resource_group}"\nauthority = "{url}"\narm_endpoint = "{url}"\n'
                f'ca_file = "{self._azure_tls[1]}"\npoll_interval = {poll_interval}\ntimeout = "{timeout}"\n'
                f'verify_timeout = "{verify_timeout}"\n')

    def aws_config(self, name: str = "aws", verify_timeout: str = "60s", timeout: str = "10s",
                   tunnels: str = "*") -> str:
        """The [[devices]] block of an aws_vpn device for the EC2 fake (docs/design.md section 10)."""
        assert self.aws_sim is not None, "Simulators(aws=True) has no EC2 fake otherwise"
        return (f'[[devices]]\nname = "{name}"\nkind = "aws_vpn"\nregion = "{self.aws_sim.region}"\n'
                f'tunnels = ["{tunnels}"]\ntimeout = "{timeout}"\nverify_timeout = "{verify_timeout}"\n')


def run_sim(accounts: int, tunnels: int, as_json: bool, latency_cf: float = 0.0,
            latency_vault: float = 0.0, *, aws: bool = False, aws_replacement: float = 10.0,
            azure: bool = False) -> int:
    """``rotator sim``: serve the simulators until SIGINT/SIGTERM."""
    stop = stop_on_signals()
    sims = Simulators(accounts=accounts, tunnels=tunnels, aws=aws, aws_replacement=aws_replacement,
                      azure=azure).start()
    if latency_cf:
        sims.cloudflare.set_latency(latency_cf)
    if latency_vault:
        sims.vault.set_latency(latency_vault)
    info = sims.info()
    if as_json:
        print(json.dumps(info), flush=True)
    else:
        print("Simulators running (Ctrl-C to stop).")
        print(f"  Vault       {info['vault_addr']}  (KV v2 mount 'secret', control: {info['vault_addr']}/_sim/state)")
        print(f"  Cloudflare  {info['cloudflare_base_url']}")
        if sims.aws_sim is not None:
            aws_info = info["aws"]
            print(f"  AWS EC2     {aws_info['endpoint']}  (region {aws_info['region']}, "
                  f"{len(aws_info['vpn_connection_ids'])} VPN connections for the first account's tunnels)")
            print("  A device block for it (the PSK policy must make AWS keys: psk_charset = \"aws\"):")
            for line in sims.aws_config().splitlines():
                print(f"    {line}")
        if sims.azure_sim is not None:
            print(f"  Azure ARM   {info['azure']['url']}  (TLS: trust {info['azure']['ca_file']}; "
                  f"{len(info['azure']['connections'])} VPN connections for the first account's tunnels)")
            print("  A device block for it:")
            for line in sims.azure_config().splitlines():
                print(f"    {line}")
        print("  Set these to point the rotator at them:")
        for name, value in sims.env().items():
            print(f"    export {name}={value}")
        print("  Accounts and tunnels:")
        for acc, tids in info["accounts"].items():
            print(f"    {acc}: {len(tids)} tunnels")
        sys.stdout.flush()
    stop.wait()
    sims.stop()
    return 0
