"""Per-account leases: one rotator acts on an account at a time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from rotator.errors import CasConflict, LeaseHeld, VaultError
from rotator.model import Lease
from rotator.rotation.ports import RecordStore


class LeaseManager:
    """Per-account leases in Vault (CAS + expiry) so one rotator acts on an account at a time.

    Thread-safe: the daemon renews from its scheduler while runs renew before each apply.
    """

    def __init__(self, store: RecordStore, holder: str, ttl: float = 120.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.holder, self.ttl, self.clock = store, holder, ttl, clock
        self._held: dict[str, Lease] = {}
        self._lock = threading.Lock()

    def acquire(self, account_id: str) -> Lease:
        """Take or renew the lease; raises LeaseHeld if another live holder has it."""
        with self._lock:
            lease = self._held.get(account_id)
            if lease is not None:
                try:
                    return self._write(account_id, lease.version)
                except CasConflict:
                    self._held.pop(account_id, None)
            current = self.store.read_lease(account_id)
            now = self.clock()
            if current.holder and current.holder != self.holder and current.expires_at > now:
                raise LeaseHeld(f"account {account_id} is leased to {current.holder} for another "
                                f"{current.expires_at - now:.0f}s", "another replica is rotating it; this one stands by")
            try:
                return self._write(account_id, current.version)
            except CasConflict as exc:
                raise LeaseHeld(f"account {account_id}: another rotator took the lease first",
                                "another replica is rotating it; this one stands by") from exc

    def _write(self, account_id: str, cas: int) -> Lease:
        expires = self.clock() + self.ttl
        version = self.store.write_lease(account_id, self.holder, expires, cas)
        lease = self._held[account_id] = Lease(self.holder, expires, version)
        return lease

    def expires_at(self, account_id: str) -> float | None:
        with self._lock:
            lease = self._held.get(account_id)
            return lease.expires_at if lease is not None else None

    def holds(self, account_id: str, margin: float = 0.0) -> bool:
        with self._lock:
            lease = self._held.get(account_id)
            return lease is not None and lease.expires_at - margin > self.clock()

    def release(self, account_id: str) -> None:
        with self._lock:
            lease = self._held.pop(account_id, None)
            if lease is None:
                return
            try:
                self.store.write_lease(account_id, "", 0.0, lease.version)
            except VaultError:
                pass  # it expires on its own

    def held_accounts(self) -> list[str]:
        with self._lock:
            return [a for a, lease in self._held.items() if lease.expires_at > self.clock()]
