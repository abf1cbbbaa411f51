"""The invariant, checked continuously from the simulators' inspection API (docs/design.md section 2).

Soundness: a check takes the Cloudflare simulator's lock and then the Vault simulator's lock, and
reads, for every tunnel, the key Cloudflare holds and the latest version of the Vault record in the
same critical section. Both simulators change state only under their own lock, so a check sees one
instant of both; reading them one after the other could see a key Cloudflare applied after the Vault
read and raise a false alarm. Far-end devices (``ends``: anything with a ``lock`` and
``held(account, tunnel)``, such as the simulated device) are checked the same way; their locks are
taken first, because a simulated device may ask Cloudflare's simulator for its peer key while it
holds its own lock, and nothing holds Vault's lock while asking for another.

Drift: a key someone set outside the rotator (``psk_generate``, the dashboard, Terraform) is
unknown to Vault by definition. While Cloudflare holds such a key the tunnel is *drifted*, not in
violation; the rotator must heal it (the round's strict check says whether it did).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rotator.sim import Simulators

PREFIX = "cloudflare/magic-ipsec"
OUT_OF_BAND = ("psk_generate", "out_of_band")  # how the Cloudflare simulator's history names keys set outside


@dataclass
class Violation:
    at: float  # seconds since the campaign started
    round: int
    account: str
    tunnel: str
    kind: str  # "invariant" (continuous) or "strict" (after the fault-free reconcile)
    detail: str

    def line(self) -> str:
        return (f"t=+{self.at:.2f}s round {self.round} {self.kind} violation: account {self.account[:8]}… "
                f"tunnel {self.tunnel}: {self.detail}")


@dataclass
class Figures:
    snapshots: int = 0  # atomic checks of every tunnel
    tunnel_checks: int = 0  # tunnel x snapshot
    violations: int = 0  # episodes: a tunnel entering violation counts once until it is healthy again
    drifted_seen: int = 0
    longest_check_ms: float = 0.0


@dataclass
class Monitor:
    sims: Simulators
    wall0: float  # time.time() when the campaign started; trace times are relative to it
    round_of: Callable[[], int]
    interval: float = 0.02
    ends: Sequence[tuple[str, Any]] = ()  # far-end devices: (name, object with .lock and .held(account, tunnel))
    figures: Figures = field(default_factory=Figures)
    violations: list[Violation] = field(default_factory=list)
    _bad: set[tuple[str, str]] = field(default_factory=set)
    _oob: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    _history_seen: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    # -- the check ---------------------------------------------------------------------------------
    def check(self, strict: bool = False, kind: str = "invariant") -> list[Violation]:
        """One atomic check of every tunnel; returns the tunnels found in violation now."""
        cf, vault = self.sims.cloudflare, self.sims.vault
        found: list[Violation] = []
        t0 = time.monotonic()
        with contextlib.ExitStack() as locks:
            for _, end in self.ends:
                locks.enter_context(end.lock)
            locks.enter_context(cf.lock)
            locks.enter_context(vault.lock)
            history = cf.applied_history()
            for h in history[self._history_seen:]:
                if h.via in OUT_OF_BAND:
                    self._oob.setdefault((h.account, h.tunnel), set()).add(h.psk)
            self._history_seen = len(history)
            for account, tunnels in self.sims.tunnels_by_account.items():
                held = cf.psks(account)
                for tunnel in tunnels:
                    data = vault.read_data(f"{PREFIX}/{account}/{tunnel}") or {}
                    problem = self._judge(account, tunnel, held.get(tunnel), data, strict)
                    for name, end in self.ends:
                        key = end.held(account, tunnel)
                        if problem is None and key is not None:  # a device that never got a key holds none
                            problem = self._judge(account, tunnel, key, data, strict, end=name)
                    if problem is not None:
                        found.append(Violation(time.time() - self.wall0, self.round_of(), account, tunnel,
                                               kind, problem))
            self.figures.snapshots += 1
            self.figures.tunnel_checks += sum(len(t) for t in self.sims.tunnels_by_account.values())
        self.figures.longest_check_ms = max(self.figures.longest_check_ms, (time.monotonic() - t0) * 1000)
        return found

    def _judge(self, account: str, tunnel: str, key: str | None, data: dict[str, Any], strict: bool,
               end: str = "Cloudflare") -> str | None:
        psk, pending = data.get("psk"), data.get("pending_psk")
        if strict:
            if key != psk:
                return f"after the fault-free reconcile {end}'s key is not the record's psk; " + \
                    self._explain(account, tunnel, key, data, end)
            if pending is not None or data.get("state") != "active":
                return f"after the fault-free reconcile the record is {data.get('state')!r}" + \
                    (" with a pending_psk" if pending is not None else "")
            return None
        if key is not None and key in (psk, pending):
            return None
        if end == "Cloudflare" and key is not None and key in self._oob.get((account, tunnel), ()):
            self.figures.drifted_seen += 1
            return None  # drift: set outside the rotator; healing it is checked at the round's end
        return f"{end} holds a key that is neither psk nor pending_psk of the latest record; " + \
            self._explain(account, tunnel, key, data, end)

    def _explain(self, account: str, tunnel: str, key: str | None, latest: dict[str, Any],
                 end: str = "Cloudflare") -> str:
        """Where the key Cloudflare holds came from, without showing it (caller holds both locks)."""
        where = []
        mount = self.sims.vault.namespaces.get("", {}).get("secret")
        entry = mount.keys.get(f"{PREFIX}/{account}/{tunnel}") if mount else None
        if entry is not None:
            for number in sorted(entry.data, reverse=True):
                for name in ("psk", "pending_psk", "previous_psk"):
                    if key is not None and (entry.data[number] or {}).get(name) == key:
                        where.append(f"{name} of v{number} (rotation {entry.data[number].get('rotation_id')})")
        applied = [h for h in self.sims.cloudflare.applied_history() if h.tunnel == tunnel and h.psk == key]
        origin = (f"applied via {applied[-1].via} at t=+{applied[-1].at - self.wall0:.2f}s"
                  if applied else "never applied")
        version = entry.current_version if entry is not None else 0
        state = (f"latest v{version}: state={latest.get('state')!r}, pending={'pending_psk' in latest}, "
                 f"rotation={latest.get('rotation_id')!r}, last_error={str(latest.get('last_error'))[:120]!r}")
        return f"{end}'s key was {', '.join(where) or 'never in Vault'}; {origin} at Cloudflare; {state}"

    # -- the loop ----------------------------------------------------------------------------------
    def observe(self, found: list[Violation]) -> None:
        now_bad = {(v.account, v.tunnel) for v in found}
        for v in found:
            if (v.account, v.tunnel) not in self._bad:
                self.figures.violations += 1
                self.violations.append(v)
        self._bad = now_bad

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.observe(self.check())
            self._stop.wait(self.interval)

    def start(self) -> Monitor:
        self._thread = threading.Thread(target=self._loop, name="invariant-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.observe(self.check())  # one last look
