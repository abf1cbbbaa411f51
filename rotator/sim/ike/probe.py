"""A traffic probe through the lab's tunnels: UDP echo from each tunnel's site inner address to its
edge inner address, so every packet crosses the tunnel's ESP SA both ways.

Per tunnel it reports packets sent and answered, the loss, and the longest gap: the longest time
between the send times of two consecutive answered packets (the start and the end of the probe
count as answered), i.e. how long the tunnel carried nothing. The sender, the echo and the receiver
are three threads over sockets opened in the namespaces; every loop checks a stop flag and every
wait has a timeout.
"""

from __future__ import annotations

import contextlib
import itertools
import selectors
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from rotator.sim.ike import netns

PORT = 7
PACKET = struct.Struct("!Qd")  # sequence number, send time (monotonic)
GRACE = 0.5  # how long answers in flight are awaited after the last send


@dataclass(frozen=True, slots=True)
class ProbeResult:
    name: str
    sent: int
    answered: int
    longest_gap: float
    gaps: tuple[tuple[float, float], ...]  # (start, end) monotonic, of every gap over 3 intervals
    lost_at: tuple[float, ...] = ()  # send times (monotonic) of the packets never answered

    @property
    def lost(self) -> int:
        return self.sent - self.answered

    @property
    def loss(self) -> float:
        return self.lost / self.sent if self.sent else 0.0


@dataclass
class _Flow:
    name: str
    site: socket.socket
    edge: socket.socket
    sent_at: list[float] = field(default_factory=list)  # index: sequence number
    answered: dict[int, float] = field(default_factory=dict)

    @property
    def sent(self) -> int:
        return len(self.sent_at)


class TrafficProbe:
    """``with TrafficProbe(lab, tunnels, interval) as probe: ...; results = probe.stop()``."""

    def __init__(self, edge_ns: str, site_ns: str, flows: Sequence[tuple[str, str, str]],
                 interval: float = 0.05) -> None:
        """``flows``: (name, site inner address, edge inner address) per tunnel."""
        self.interval = interval
        self._stop = threading.Event()
        self._stop_sending = threading.Event()
        self._flows: list[_Flow] = []
        try:
            for name, site_addr, edge_addr in flows:
                edge = netns.udp_socket(edge_ns, (edge_addr, PORT))
                site = netns.udp_socket(site_ns, (site_addr, 0), connect=(edge_addr, PORT))
                for s in (edge, site):
                    s.setblocking(False)
                self._flows.append(_Flow(name, site, edge))
        except BaseException:
            self._close()
            raise
        self._threads = [threading.Thread(target=fn, name=f"ike-probe-{fn.__name__}", daemon=True)
                         for fn in (self._echo, self._receive, self._send)]
        self.started = 0.0
        self.send_stopped = 0.0
        self._results: list[ProbeResult] | None = None

    def start(self) -> TrafficProbe:
        self.started = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def __enter__(self) -> TrafficProbe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _send(self) -> None:
        seq = 0
        next_at = time.monotonic()
        while not self._stop_sending.is_set():
            now = time.monotonic()
            for flow in self._flows:
                with contextlib.suppress(OSError):  # no route yet (tunnel down): counts as lost
                    flow.site.send(PACKET.pack(seq, now))
                flow.sent_at.append(now)
            seq += 1
            next_at += self.interval
            self._stop_sending.wait(max(0.0, next_at - time.monotonic()))

    def _echo(self) -> None:
        with selectors.DefaultSelector() as sel:
            for flow in self._flows:
                sel.register(flow.edge, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.1):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    with contextlib.suppress(OSError):
                        while True:
                            data, peer = sock.recvfrom(64)
                            sock.sendto(data, peer)

    def _receive(self) -> None:
        with selectors.DefaultSelector() as sel:
            for flow in self._flows:
                sel.register(flow.site, selectors.EVENT_READ, flow)
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.1):
                    flow = key.data
                    with contextlib.suppress(OSError):
                        while True:
                            data = flow.site.recv(64)
                            if len(data) == PACKET.size:
                                seq, sent_at = PACKET.unpack(data)
                                flow.answered[seq] = sent_at

    def answered_count(self, name: str) -> int:
        """Echoes received so far through the tunnel ``name``."""
        return sum(len(f.answered) for f in self._flows if f.name == name)

    def answered_min(self) -> int:
        """The fewest echoes any tunnel has had so far."""
        return min((len(f.answered) for f in self._flows), default=0)

    def answered_all(self, at_least: int) -> bool:
        return all(len(f.answered) >= at_least for f in self._flows)

    def stop(self) -> list[ProbeResult]:
        """Stop sending, wait for answers in flight (bounded), and report per tunnel."""
        if self._results is not None:
            return self._results
        self._stop_sending.set()
        self.send_stopped = time.monotonic()
        deadline = self.send_stopped + GRACE
        while time.monotonic() < deadline and any(len(f.answered) < f.sent for f in self._flows):
            time.sleep(0.01)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5.0)
        self._results = [self._result(f) for f in self._flows]
        self._close()
        return self._results

    def _result(self, flow: _Flow) -> ProbeResult:
        times = [self.started, *sorted(flow.answered.values()), self.send_stopped]
        gaps = list(itertools.pairwise(times))
        longest = max((b - a for a, b in gaps), default=0.0)
        big = tuple((a, b) for a, b in gaps if b - a > 3 * self.interval)
        lost = tuple(at for seq, at in enumerate(flow.sent_at) if seq not in flow.answered)
        return ProbeResult(flow.name, flow.sent, len(flow.answered), longest, big, lost)

    def _close(self) -> None:
        for flow in self._flows:
            flow.site.close()
            flow.edge.close()


def summary(results: Sequence[ProbeResult]) -> dict[str, float]:
    """Totals over tunnels: packets sent, lost, loss ratio, and the worst gap in seconds."""
    sent = sum(r.sent for r in results)
    lost = sum(r.lost for r in results)
    return {"tunnels": len(results), "sent": sent, "lost": lost, "loss": lost / sent if sent else 0.0,
            "longest_gap": max((r.longest_gap for r in results), default=0.0)}
