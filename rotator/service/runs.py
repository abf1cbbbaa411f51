"""The registry of rotation runs the daemon knows: queued, running, finished.

Single-flight: a request already covered by a queued or running run of the same account and kind
joins it instead of starting another. The queue of waiting on-demand runs is bounded; a full queue
is refused (the admin API answers 429 with ``Retry-After``). Runs end ``done`` or ``failed``; a run
never stays ``running`` after its worker returned, whatever went wrong inside it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rotator.rotation.engine import RunReport

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
KEEP_FINISHED = 500


@dataclass
class Run:
    id: str
    account: str
    tunnels: frozenset[str] | None
    dry_run: bool
    trigger: str
    reconcile: bool = False
    rollback: bool = False
    due: bool = False  # only what the schedule would rotate now (rotate --due)
    state: str = QUEUED
    report: RunReport | None = None
    error: str | None = None

    @property
    def kind(self) -> str:
        return "reconcile" if self.reconcile else "rollback" if self.rollback else "due" if self.due else "rotate"

    @property
    def active(self) -> bool:
        return self.state in (QUEUED, RUNNING)

    def covers(self, other: Run) -> bool:
        """True when this queued or running run already does what ``other`` asks."""
        if not self.active or (self.account, self.dry_run, self.kind) != (other.account, other.dry_run, other.kind):
            return False
        wanted = other.tunnels
        return self.tunnels is None or (wanted is not None and wanted <= self.tunnels)

    def view(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "account": self.account, "state": self.state, "trigger": self.trigger,
                               "kind": self.kind, "dry_run": self.dry_run, "error": self.error,
                               "tunnels": sorted(self.tunnels) if self.tunnels else "all"}
        if self.report is not None:
            out["result"] = self.report.as_dict()
        return out


class QueueFull(Exception):
    """Too many on-demand runs are waiting; ask again after ``retry_after`` seconds."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"{waiting} runs are already waiting")
        self.retry_after = retry_after


class Runs:
    """Thread-safe registry of runs, bounded in waiting runs and in finished runs remembered."""

    def __init__(self, queue_limit: int = 16, retry_after: int = 30) -> None:
        self.queue_limit = queue_limit
        self.retry_after = retry_after
        self._runs: dict[str, Run] = {}
        self._lock = threading.Lock()

    def admit(self, run: Run) -> tuple[Run, bool]:
        """Register ``run`` unless an active run covers it; returns (the run to follow, deduplicated)."""
        with self._lock:
            for existing in self._runs.values():
                if existing.covers(run):
                    return existing, True
            waiting = sum(1 for r in self._runs.values() if r.state == QUEUED)
            if waiting >= self.queue_limit:
                raise QueueFull(waiting, self.retry_after)
            self._runs[run.id] = run
            finished = [r.id for r in self._runs.values() if not r.active]
            for old in finished[:max(0, len(finished) - KEEP_FINISHED)]:
                del self._runs[old]
            return run, False

    def get(self, run_id: str) -> Run | None:
        with self._lock:
            return self._runs.get(run_id)

    def cancel_waiting(self, reason: str) -> None:
        """Shutting down: runs that never started end failed with ``reason``."""
        with self._lock:
            for run in self._runs.values():
                if run.state == QUEUED:
                    run.state, run.error = FAILED, reason
