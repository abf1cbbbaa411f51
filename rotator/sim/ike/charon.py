"""One strongSwan charon in a network namespace, with its own strongswan.conf, vici socket, log and a
private ``/run`` (charon hard-codes its pid file there), driven over vici.

Every call is bounded: the vici socket has a timeout, waits poll with a deadline, and the daemon is
stopped by pid (SIGTERM, then SIGKILL) — a leftover charon would keep UDP 500 in its namespace.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import vici
import vici.exception

from rotator.sim.ike.netns import LabError

CHARON = "/usr/lib/ipsec/charon"
PLUGIN_DIR = "/usr/lib/ipsec/plugins"
# kernel-libipsec before kernel-netlink: this kernel has XFRM but no ESP, so CHILD_SAs run in
# userspace (over /dev/net/tun) while netlink still provides addresses and routes.
PLUGINS = ("random", "nonce", "openssl", "aes", "sha1", "sha2", "hmac", "gmp", "kdf", "pem", "pkcs1", "x509",
           "pubkey", "kernel-libipsec", "kernel-netlink", "socket-default", "vici")
VICI_TIMEOUT = 10.0
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
EVENTS = ["ike-updown", "child-updown", "ike-rekey", "child-rekey"]


def config_text(vici_socket: str, log_path: str, threads: int, make_before_break: bool) -> str:
    return f"""charon {{
  load = {" ".join(PLUGINS)}
  threads = {threads}
  # A reauthentication builds the new IKE SA before it deletes the old one (5.9.8: a global option).
  make_before_break = {"yes" if make_before_break else "no"}
  # Many half-open SAs from one peer are the lab's normal case, not an attack: without these the
  # edge answers with COOKIE notifies or drops IKE_SA_INITs, and every such tunnel costs a
  # retransmission (seen on the first re-authentication of a tunnel).
  block_threshold = 100000
  init_limit_half_open = 100000
  cookie_threshold = 100000
  cookie_threshold_ip = 100000
  dos_protection = no
  retransmit_tries = 4
  retransmit_timeout = 1.0
  retransmit_base = 1.4
  ikesa_table_size = 256
  ikesa_table_segments = 16
  install_virtual_ip = no
  filelog {{
    lab {{
      path = {log_path}
      default = 1
      knl = 0
      net = 0
      enc = 0
      ike_name = yes
      flush_line = yes
      time_format = %T
    }}
  }}
  syslog {{
  }}
  plugins {{
    vici {{
      socket = unix://{vici_socket}
    }}
  }}
}}
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Event:
    at: float  # time.monotonic()
    wall: float  # time.time(), for health timelines
    side: str
    kind: str  # ike-updown, child-updown, ike-rekey, child-rekey
    name: str  # the connection (IKE SA) name
    up: bool
    state: str
    unique_id: str


@dataclass
class Charon:
    """A charon process: ``start()``, then vici calls through ``session()``, ``stop()`` by pid."""

    side: str
    namespace: str
    workdir: str
    threads: int = 16
    on_event: Callable[[Event], None] | None = None
    make_before_break: bool = False
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _stop_events: threading.Event = field(default_factory=threading.Event, init=False)
    _event_thread: threading.Thread | None = field(default=None, init=False)
    _local: threading.local = field(default_factory=threading.local, init=False)
    _sessions: list[socket.socket] = field(default_factory=list, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    @property
    def vici_socket(self) -> str:
        return os.path.join(self.workdir, f"{self.side}.vici")

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, f"{self.side}.log")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> Charon:
        conf = os.path.join(self.workdir, f"{self.side}.strongswan.conf")
        with open(conf, "w", encoding="utf-8") as fh:
            fh.write(config_text(self.vici_socket, self.log_path, self.threads, self.make_before_break))
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "STRONGSWAN_CONF": conf}
        # `ip netns exec` gives the command its own mount namespace (slave of the host's): a tmpfs on
        # /run there holds charon's pid file without touching the host's /run.
        script = f"mount -t tmpfs tmpfs /run && exec {CHARON}"
        err = open(os.path.join(self.workdir, f"{self.side}.stderr"), "wb")
        try:
            self.process = subprocess.Popen(["ip", "netns", "exec", self.namespace, "sh", "-c", script], env=env,
                                            stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        finally:
            err.close()
        self._wait_ready()
        self._event_thread = threading.Thread(target=self._listen, name=f"ike-events-{self.side}", daemon=True)
        self._event_thread.start()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        last = "no vici socket yet"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise LabError(f"{self.side} charon exited with {self.process.returncode} at start; see "
                               f"{self.workdir}/{self.side}.stderr")
            try:
                with self._connect(1.0) as sock:
                    vici.Session(sock).version()
                return
            except (OSError, vici.exception.SessionException) as exc:
                last = str(exc)
            time.sleep(0.02)
        raise LabError(f"{self.side} charon did not answer vici within {START_TIMEOUT:.0f} s ({last})")

    def _connect(self, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.vici_socket)
        except OSError:
            sock.close()
            raise
        return sock

    def session(self) -> vici.Session:
        """This thread's vici session (one per thread: a session is one request at a time)."""
        sess: vici.Session | None = getattr(self._local, "session", None)
        if sess is None:
            sock = self._connect(VICI_TIMEOUT)
            with self._lock:
                self._sessions.append(sock)
            sess = vici.Session(sock)
            self._local.session = sess
        return sess

    @contextlib.contextmanager
    def fresh_session(self, timeout: float = VICI_TIMEOUT) -> Iterator[vici.Session]:
        with self._connect(timeout) as sock:
            yield vici.Session(sock)

    def _listen(self) -> None:
        try:
            with self.fresh_session() as sess:
                for kind, msg in sess.listen(EVENTS, timeout=0.1):
                    if self._stop_events.is_set():
                        break
                    if kind is None or self.on_event is None:
                        continue
                    self._dispatch(_text(kind), msg)
        except (OSError, vici.exception.SessionException):
            return  # the daemon went away (stop) or the socket broke: no more events

    def _dispatch(self, kind: str, msg: dict[str, Any]) -> None:
        assert self.on_event is not None
        now, wall = time.monotonic(), time.time()
        up = not kind.endswith("updown") or _text(msg.get("up", b"no")) == "yes"
        for name, sa in msg.items():
            if not isinstance(sa, dict):
                continue
            if not kind.endswith("updown"):
                sa = sa.get("new", sa)
            self.on_event(Event(now, wall, self.side, kind, _text(name), up, _text(sa.get("state", "")),
                                _text(sa.get("uniqueid", ""))))

    def list_sas(self, ike: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        """(name, SA) for every IKE SA, or those named ``ike``."""
        out: list[tuple[str, dict[str, Any]]] = []
        with self.fresh_session() as sess:
            for entry in sess.list_sas({"ike": ike} if ike else None):
                for name, sa in entry.items():
                    out.append((_text(name), sa))
        return out

    def stop(self) -> None:
        self._stop_events.set()
        if self._event_thread is not None:  # leaves listen() (and unregisters) while charon still answers
            self._event_thread.join(timeout=STOP_TIMEOUT)
        with self._lock:
            sockets, self._sessions = self._sessions, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
        if self.process is not None:
            kill_pid(self.process.pid, self.process)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie may wait long for its reaper)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_pid(pid: int, process: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM, a bounded wait, then SIGKILL; reaps our own child."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if process is not None:
            if process.poll() is not None:
                return
        elif not alive(pid):
            return
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if process is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=STOP_TIMEOUT)
