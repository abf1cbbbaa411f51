"""The three simulated firewalls behind one face, for the tests of the firewall kinds: a simulator holding
given keys, served over HTTPS with the loopback CA, with the ``[[devices]]`` table that points a
rotator at it (``served``); the same for a whole account of the Cloudflare simulator (``firewall``,
end-to-end) or for a few made-up tunnels with a device factory (``unit_firewall``, the kinds' own tests)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from rotator.adapters.devices import build_device, parse_devices
from rotator.sim import Simulators
from rotator.sim import fortigate as fortigate_sim
from rotator.sim import panos as panos_sim
from rotator.sim import vyos as vyos_sim
from rotator.sim.base import serve
from tests import helpers
from tests.devices.conftest import ACCOUNT, make_tunnels

KINDS = ("panos", "vyos", "fortigate")
SIMS = {"panos": panos_sim.PanosSim, "vyos": vyos_sim.VyosSim, "fortigate": fortigate_sim.FortigateSim}


@contextlib.contextmanager
def served(kind: str, account: str, entries: dict[str, tuple[str, str | None]],
           peer: Callable[[str, str], str | None], tls: Any, tmp_path: Any) -> Iterator[tuple[Any, dict[str, Any]]]:
    """The ``kind`` simulator with ``entries`` (tunnel id -> the firewall's name for it, its key), served;
    yields it and its ``[[devices]]`` table. Every key and credential it held goes to the secret scan."""
    sim = SIMS[kind](peer=peer)
    for tid, (name, key) in entries.items():
        (sim.add_gateway if kind == "panos" else sim.add_tunnel)(name, account, tid, key)
    credential, value = ("token_file", sim.token) if kind == "fortigate" else ("api_key_file", sim.api_key)
    secret_file = tmp_path / f"{kind}.credential"
    secret_file.write_text(value + "\n")
    try:
        with serve(sim, certfile=tls.certfile, keyfile=tls.keyfile) as server:
            yield sim, {"name": f"{kind}-site", "kind": kind, "tunnels": ["*"], "timeout": "10s",
                        "verify_timeout": "3s", "host": "127.0.0.1", "port": server.port, "ca_file": tls.ca_file,
                        "poll_interval": 0.05, credential: str(secret_file)}
    finally:
        helpers.SECRETS.update(sim.scan_secrets())
        print(sim.snapshot())  # the secret scan reads it: fingerprints and counts, no key, no credential


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
    """A firewall holding, for every tunnel of ``account``, the key the Cloudflare simulator holds today."""
    cloudflare = sims.cloudflare
    names = {tid: f"cf-{cloudflare.accounts[account][tid].name}" for tid in sims.tunnels_by_account[account]}
    entries = {tid: (name, cloudflare.psk_of(account, tid)) for tid, name in names.items()}
    with served(kind, account, entries, cloudflare.psk_of, tls, tmp_path) as (sim, table):
        yield Firewall(kind, sim, table, names, recommits=kind == "fortigate")


@contextlib.contextmanager
def unit_firewall(kind: str, tls: Any, tmp_path: Any, *, verify_timeout: float = 1.5) -> Iterator[tuple[Any, ...]]:
    """Three made-up tunnels whose firewall and Cloudflare both hold the old key; yields the simulator,
    a device factory (``device(**settings)``, closed afterwards), the tunnels, Cloudflare's keys (a
    dict the test changes) and the table."""
    tunnels = make_tunnels(3)
    cloudflare = {t.tunnel_id: t.previous_psk.reveal() for t in tunnels}
    entries = {t.tunnel_id: (f"cf-{t.tunnel_name}", t.previous_psk.reveal()) for t in tunnels}
    with served(kind, ACCOUNT, entries, lambda acc, tid: cloudflare.get(tid), tls, tmp_path) as (sim, table):
        devices: list[Any] = []

        def device(**over: Any) -> Any:
            (spec,) = parse_devices([{**table, "name": "fw", "timeout": 5.0, "verify_timeout": verify_timeout,
                                      "poll_interval": 0.02, **over}])
            devices.append(build_device(spec))
            return devices[-1]
        try:
            yield sim, device, tunnels, cloudflare, table
        finally:
            for d in devices:
                d.close()
