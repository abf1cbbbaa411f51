"""The Azure fake (rotator/sim/azure.py) served over HTTPS on loopback with a certificate made for the
test (``loopback_tls``, trustme), and the Azure SDK pointed at it: azure-identity's ``ClientSecretCredential`` with the
fake as its authority (instance discovery off, docs/specs of azure-identity: ``disable_instance_discovery``
is for authorities Microsoft does not know) and azure-mgmt-network's client with the fake as base URL."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rotator.httpserver import ServerThread
from rotator.sim.azure import AzureSim, Client, loopback_tls
from tests import helpers


class ManualClock:
    """A clock the test moves; thread-safe, since the fake reads it from the server thread."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


@dataclass
class RunningAzure:
    sim: AzureSim
    server: ServerThread
    client: Client
    ca_file: str
    clients: list[Any] = field(default_factory=list)  # closed before the server stops

    @property
    def url(self) -> str:
        return self.server.url

    def env(self) -> dict[str, str]:
        """The standard azure-identity variables for a service principal of this fake."""
        return {"AZURE_TENANT_ID": self.client.tenant, "AZURE_CLIENT_ID": self.client.client_id,
                "AZURE_CLIENT_SECRET": self.client.secret, "AZURE_AUTHORITY_HOST": self.url}

    def network_client(self, **kwargs: object):  # type: ignore[no-untyped-def]
        from azure.identity import ClientSecretCredential
        from azure.mgmt.network import NetworkManagementClient

        credential = ClientSecretCredential(self.client.tenant, self.client.client_id, self.client.secret,
                                            authority=self.url, disable_instance_discovery=True,
                                            connection_verify=self.ca_file)
        client = NetworkManagementClient(credential, self.sim.subscription_id, base_url=self.url,
                                         connection_verify=self.ca_file, **{"polling_interval": 0.05, **kwargs})
        self.clients.extend([client, credential])
        return client


@contextlib.contextmanager
def serve(sim: AzureSim, workdir: Path) -> Iterator[RunningAzure]:
    ca_file, server_file = loopback_tls(str(workdir))
    client = sim.add_client()
    server = ServerThread(sim, tls=(server_file, server_file), name="azure").start()
    running = RunningAzure(sim, server, client, ca_file)
    try:
        yield running
    finally:
        for c in running.clients:
            c.close()
        server.stop()
        helpers.SECRETS.update(sim.scan_secrets())
