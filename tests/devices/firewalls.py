"""The three simulated firewalls behind one face, for the end-to-end tests of the firewall kinds: each
holds, for every tunnel of an account, the key Cloudflare holds today, is served over HTTPS with the
loopback CA, and gives the ``[[devices]]`` table that points a rotator at it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from rotator.sim import Simulators
from rotator.sim import fortigate as fortigate_sim
from rotator.sim import panos as panos_sim
from rotator.sim import vyos as vyos_sim
from tests import helpers

KINDS = ("panos", "vyos", "fortigate")


@dataclass
class Firewall:
    kind: str
    sim: Any
    table: dict[str, Any]
    names: dict[str, str]  # tunnel id -> the firewall's name for it (gateway, psk/peer, phase 1)
    recommits: bool  # whether a repeated deliver changes the firewall again (the API cannot tell)

    @property
    def held(self) -> Callable[[str, str], str | None]:
        return self.sim.held  # type: ignore[no-any-return]

    def changes(self) -> int:
        """Commits (PAN-OS, VyOS) or writes (FortiOS has no commit) so far."""
        return int(self.sim.puts if self.kind == "fortigate" else self.sim.commits)

    def refuse_key(self, tid: str) -> None:
        self.sim.refuse_key(self.names[tid], "{key} is not a valid pre-shared key" if self.kind == "fortigate"
                            else "is not a valid pre-shared key")

    def fail_commit(self, tids: list[str]) -> None:
        """The next commit fails with a text quoting the key (FortiOS: every write of these tunnels)."""
        text = "Validation Error: pre-shared-key {key} rejected by policy"
        if self.kind == "fortigate":
            for tid in tids:
                self.sim.refuse_key(self.names[tid], text)
        else:
            self.sim.fail_commit(text)

    def never_reauth(self, tid: str) -> None:
        self.sim.never_reauth([self.names[tid]])


@contextlib.contextmanager
def firewall(kind: str, sims: Simulators, account: str, tls: Any, tmp_path: Any) -> Iterator[Firewall]:
    cloudflare = sims.cloudflare
    names = {tid: f"cf-{cloudflare.accounts[account][tid].name}" for tid in sims.tunnels_by_account[account]}
    common = {"name": f"{kind}-site", "kind": kind, "tunnels": ["*"], "timeout": "10s", "verify_timeout": "3s",
              "host": "127.0.0.1", "ca_file": tls.ca_file, "poll_interval": 0.05}
    sim: Any
    if kind == "panos":
        sim = panos_sim.PanosSim(peer=cloudflare.psk_of)
        for tid, name in names.items():
            sim.add_gateway(name, account, tid, cloudflare.psk_of(account, tid))
        credential, serve = ("api_key_file", sim.api_key), panos_sim.serve
    elif kind == "vyos":
        sim = vyos_sim.VyosSim(peer=cloudflare.psk_of)
        for tid, name in names.items():
            sim.add_tunnel(name, account, tid, cloudflare.psk_of(account, tid))
        credential, serve = ("api_key_file", sim.api_key), vyos_sim.serve
    else:
        sim = fortigate_sim.FortigateSim(peer=cloudflare.psk_of)
        for tid, name in names.items():
            sim.add_tunnel(name, account, tid, cloudflare.psk_of(account, tid))
        credential, serve = ("token_file", sim.token), fortigate_sim.serve
    secret_file = tmp_path / f"{kind}.credential"
    secret_file.write_text(credential[1])
    with serve(sim, certfile=tls.certfile, keyfile=tls.keyfile) as server:
        table = {**common, "port": server.port, credential[0]: str(secret_file)}
        try:
            yield Firewall(kind, sim, table, names, recommits=kind == "fortigate")
        finally:
            helpers.SECRETS.update(sim.scan_secrets())
