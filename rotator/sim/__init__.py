"""Local simulators of Vault KV v2 and the Cloudflare Magic IPsec API, for the demo, tests and benchmarks."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

from rotator.httpserver import ServerThread, stop_all, stop_on_signals
from rotator.sim.cloudflare import CloudflareSim, EdgeHook, HealthSource, RateLimit
from rotator.sim.vault import VaultSim

__all__ = ["CloudflareSim", "RateLimit", "Simulators", "VaultSim", "run_sim"]


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

    def start(self) -> Simulators:
        self._servers = [ServerThread(self.vault).start(), ServerThread(self.cloudflare).start()]
        return self

    def stop(self) -> None:
        stop_all(self._servers)
        self._servers = []

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

    def info(self) -> dict[str, Any]:
        return {
            "vault_addr": self.vault_addr,
            "vault_token": self.vault_token,
            "cloudflare_base_url": self.cloudflare_base_url,
            "cloudflare_api_token": self.cloudflare_api_token,
            "accounts": self.tunnels_by_account,
        }

    def env(self) -> dict[str, str]:
        """The standard variables a rotator process needs to talk to these simulators."""
        return {
            "VAULT_ADDR": self.vault_addr, "VAULT_TOKEN": self.vault_token,
            "CLOUDFLARE_API_TOKEN": self.cloudflare_api_token,
            "CLOUDFLARE_BASE_URL": self.cloudflare_base_url,
        }


def run_sim(accounts: int, tunnels: int, as_json: bool, latency_cf: float = 0.0,
            latency_vault: float = 0.0) -> int:
    """``rotator sim``: serve both simulators until SIGINT/SIGTERM."""
    stop = stop_on_signals()
    sims = Simulators(accounts=accounts, tunnels=tunnels).start()
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
