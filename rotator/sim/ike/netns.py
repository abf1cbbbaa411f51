"""Network namespaces for the IKE lab: create and delete them, run commands in them, open sockets in them.

A socket belongs to the network namespace its thread was in when it was created, so the lab opens
the traffic probe's sockets in a namespace (``setns`` on the calling thread only, then back) and
uses them from ordinary threads. Python 3.11 has no ``os.setns``: libc's, through ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import socket
import subprocess
import threading
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
COMMAND_TIMEOUT = 10.0

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_setns_lock = threading.Lock()


class LabError(RuntimeError):
    """The lab could not be built or driven (one line: what failed and why)."""


def run(*argv: str, timeout: float = COMMAND_TIMEOUT) -> str:
    """Run a command (``ip`` and friends), bounded; a failure is a LabError naming the command."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(argv)}: {exc}") from None
    if proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return proc.stdout


def ns_run(ns: str, *argv: str, timeout: float = COMMAND_TIMEOUT) -> str:
    return run("ip", "netns", "exec", ns, *argv, timeout=timeout)


def create(ns: str) -> None:
    run("ip", "netns", "add", ns)
    ns_run(ns, "ip", "link", "set", "lo", "up")


def delete(ns: str) -> None:
    with contextlib.suppress(LabError):
        run("ip", "netns", "delete", ns)


def exists(ns: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, ns))


def pids_in(ns: str) -> list[int]:
    """Processes whose network namespace is ``ns`` (``ip netns pids``), empty when it is gone."""
    try:
        out = run("ip", "netns", "pids", ns)
    except LabError:
        return []
    return [int(p) for p in out.split() if p.isdigit()]


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise LabError(f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(ns: str) -> Iterator[None]:
    """The calling thread in namespace ``ns`` for the block (sockets made in it stay there)."""
    with _setns_lock, open(f"/proc/self/task/{threading.get_native_id()}/ns/net", "rb") as home, \
            open(os.path.join(NETNS_DIR, ns), "rb") as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


def udp_socket(ns: str, bind: tuple[str, int], connect: tuple[str, int] | None = None) -> socket.socket:
    """A UDP socket living in namespace ``ns``, bound (and optionally connected)."""
    with entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(bind)
        if connect is not None:
            sock.connect(connect)
    except OSError:
        sock.close()
        raise
    return sock
