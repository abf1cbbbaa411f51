"""Batch pipelining, optional: while one batch is at Cloudflare, the next is staged and the previous
promoted, so Vault's work overlaps Cloudflare's round trips.

Staging early is always safe (a staged key is in Vault before anyone else sees it, and a staged
batch that is never sent is taken back); promotion only records what both ends already hold.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Phases(Generic[T]):
    ahead: Callable[[list[T]], list[T]]                    # batch -> items that move on (stage)
    body: Callable[[list[T]], tuple[list[T], str | None]]  # -> (items for ``behind``, why to halt)
    behind: Callable[[list[T]], None]                      # promote
    interrupt: Callable[[int], str | None]                 # before batch k: why to stop, if so
    abandon: Callable[[list[T], str, bool], None]          # (items, why, staged) never sent
    progress: Callable[[], None] = lambda: None


def run_sequential(batches: Sequence[list[T]], p: Phases[T]) -> None:
    """The same phases one after another: the reference the pipelined executor must match."""
    for k, batch in enumerate(batches):
        stop = p.interrupt(k)
        if stop is not None:
            for rest in batches[k:]:
                p.abandon(rest, stop, False)
            return
        done, halt = p.body(p.ahead(batch))
        p.behind(done)
        p.progress()
        if halt is not None:
            for rest in batches[k + 1:]:
                p.abandon(rest, halt, False)
            return


def run_pipelined(batches: Sequence[list[T]], p: Phases[T]) -> None:
    """Stage batch k+1 and promote batch k-1 while batch k is at Cloudflare (two worker threads)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="pipeline") as pool:
        ahead: concurrent.futures.Future[list[T]] | None = None
        behind: list[concurrent.futures.Future[None]] = []
        halted: str | None = None
        for k, batch in enumerate(batches):
            stop = halted or p.interrupt(k)
            if stop is not None:
                rest = batches[k:]
                if ahead is not None:  # batch k is staged but was never sent: take it back
                    p.abandon(ahead.result(), stop, True)
                    rest = batches[k + 1:]
                for b in rest:
                    p.abandon(b, stop, False)
                break
            live = ahead.result() if ahead is not None else p.ahead(batch)
            ahead = pool.submit(p.ahead, batches[k + 1]) if k + 1 < len(batches) else None
            done, halted = p.body(live)
            behind.append(pool.submit(p.behind, done))
            p.progress()
        for future in behind:
            future.result()  # re-raise anything unexpected instead of losing outcomes
