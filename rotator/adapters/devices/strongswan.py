"""The ``strongswan`` device: a charon reached over vici (strongSwan's control protocol, through the
official ``vici`` binding) on its unix socket.

- deliver / rollback: ``load-shared {id, type: IKE, data: key, owners}`` with a stable id per tunnel
  (template ``secret_id``, default ``psk-rotator-{tunnel_id}``), which replaces the tunnel's key in
  place. Established SAs keep running; the key is checked at the next authentication.
- verify: load the key again (a charon restarted since the delivery has forgotten vici-loaded
  secrets), then force a fresh authentication of the IKE SA named by ``ike`` (default
  ``{tunnel_name}``): ``reauth = "rekey"`` sends ``rekey {ike, reauth: yes}`` (or ``initiate`` when
  no SA is up), ``reauth = "restart"`` sends ``terminate`` then ``initiate`` of ``child``. The
  verdict comes from charon's ``ike-updown`` events, watched on a session of its own opened before
  the triggers: a new IKE SA of that name up (OK), or a new one down without ever being up (FAILED:
  the authentication was refused or never answered), seen as soon as it happens; none by the
  deadline: FAILED. Without a usable event stream, ``list-sas`` is polled instead, and it can only
  tell OK: list-sas skips SAs that are busy, so an SA not listed is not yet known.
- A charon that cannot be reached: FAILED (the call never arrived). A session that breaks or times
  out in the middle of a call: UNKNOWN for the tunnel in flight, FAILED for those not yet sent.

Every wait is bounded by the call's deadline: the vici transport here reads with the time left, and
a connect refused with EAGAIN (charon's accept backlog is full) is retried with backoff until then.

Known limit: an IKE SA *rekey* (not a re-authentication) that the site's own timers start during
the few seconds of a verification also yields a new unique id, and would be taken for the fresh
authentication. Cloudflare never initiates rekeys; keep the site's IKE rekey interval long, as the
guides do (8-24 h), and the window is negligible.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import vici
import vici.exception
import vici.protocol

from rotator.adapters.devices._common import (
    DeviceBase,
    DeviceSpec,
    Fields,
    batch_keys,
    check_template,
    every,
    fill,
    one_line,
)
from rotator.rotation.ports import DeviceResult, DeviceStatus, DeviceTunnel, KeyRules
from rotator.secret import Secret

DEFAULT_SOCKET = "/var/run/charon.vici"
REAUTH_MODES = ("rekey", "restart")
POLL_INTERVAL = 0.2
CONNECT_RETRY_FIRST = 0.005
CONNECT_RETRY_MAX = 0.1
WATCH_EVENTS = ("ike-updown",)
WATCH_JOIN_TIMEOUT = 5.0


KIND = "strongswan"
KEY_RULES = KeyRules()  # load-shared takes any key; the policy's printable ASCII is fine
INTERRUPTS = False  # load-shared replaces the key in place: established SAs keep running
PROOF = "ike_reauth"


@dataclass(frozen=True)
class StrongSwanSettings:
    socket: str
    owners: tuple[str, ...]
    secret_id: str = "psk-rotator-{tunnel_id}"
    ike: str = "{tunnel_name}"
    child: str = "{tunnel_name}"
    reauth: str = "rekey"

    def masked(self) -> dict[str, object]:
        return {"socket": self.socket, "owners": list(self.owners), "secret_id": self.secret_id, "ike": self.ike,
                "child": self.child, "reauth": self.reauth}


def parse_settings(f: Fields) -> StrongSwanSettings:
    sock = f.text("socket", DEFAULT_SOCKET)
    if not sock.startswith("/"):
        raise f.fail("socket", f"{sock!r} is not an absolute path", f"e.g. {DEFAULT_SOCKET}")
    owners = f.texts("owners", required=True)
    if not owners:
        raise f.fail("owners", "is empty: the key would be offered to every peer",
                     "list the IKE identities that use it, e.g. [\"{tunnel_name}.example.net\"]")
    for j, owner in enumerate(owners):
        check_template(owner, f"{f.key('owners')}[{j}]")
    reauth = f.text("reauth", "rekey")
    if reauth not in REAUTH_MODES:
        raise f.fail("reauth", f"unknown mode {reauth!r}", "use rekey (rekey with reauth) or restart "
                                                          "(terminate + initiate)")
    return StrongSwanSettings(sock, tuple(owners), f.template("secret_id", "psk-rotator-{tunnel_id}"),
                              f.template("ike", "{tunnel_name}"), f.template("child", "{tunnel_name}"), reauth)


class _Broken(Exception):
    """The vici session failed in the middle of a call: the outcome of that call is unknown."""


class _DeadlineTransport(vici.protocol.Transport):  # type: ignore[misc]
    """vici's transport, with every send and receive bounded by one absolute deadline (the stock
    transport stops timing a read after its first byte)."""

    def __init__(self, sock: socket.socket, end: float) -> None:
        super().__init__(sock)
        self.end = end

    def _left(self, cap: float | None = None) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("vici deadline passed")
        return min(left, cap) if cap is not None else left

    def send(self, packet: bytes) -> None:
        self.socket.settimeout(self._left())
        super().send(packet)

    def _recvall(self, count: int, timeout: Any = vici.protocol.RECV_TIMEOUT_DEFAULT) -> bytes:
        data = b""
        while len(data) < count:
            self.socket.settimeout(self._left())
            buf = self.socket.recv(count - len(data))
            if not buf:
                raise ConnectionError("charon closed the vici connection")
            data += buf
        return data


def build(spec: DeviceSpec) -> StrongSwanDevice:
    s = spec.settings
    assert isinstance(s, StrongSwanSettings)
    return StrongSwanDevice(spec.name, s.socket, owners=s.owners, secret_id=s.secret_id, ike=s.ike, child=s.child,
                            reauth=s.reauth, timeout=spec.timeout, verify=spec.verify, concurrency=spec.concurrency)


def secrets(settings: StrongSwanSettings) -> list[Secret]:
    return []


class StrongSwanDevice(DeviceBase):
    kind = "strongswan"

    def __init__(self, name: str, socket_path: str = DEFAULT_SOCKET, *, owners: Sequence[str],
                 secret_id: str = "psk-rotator-{tunnel_id}", ike: str = "{tunnel_name}",
                 child: str = "{tunnel_name}", reauth: str = "rekey", timeout: float = 60.0, verify: bool = True,
                 concurrency: int = 16, poll_interval: float = POLL_INTERVAL) -> None:
        if reauth not in REAUTH_MODES:
            raise ValueError(f"reauth must be one of {REAUTH_MODES}")
        self.name = name
        self.socket_path = socket_path
        self.owners = tuple(owners)
        self.secret_id = secret_id
        self.ike = ike
        self.child = child
        self.reauth = reauth
        self.timeout = timeout  # read by the engine, with verifies
        self.verifies = verify
        self.concurrency = concurrency
        self.poll_interval = poll_interval

    def __repr__(self) -> str:
        return f"StrongSwanDevice(name={self.name!r}, socket={self.socket_path!r})"

    # -- the port --------------------------------------------------------------------------------
    def deliver(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
                deadline: float) -> dict[str, DeviceResult]:
        return self._load(tunnels, self._end(deadline))

    def rollback(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
                 deadline: float) -> dict[str, DeviceResult]:
        return self._load(tunnels, self._end(deadline))

    def verify(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
               deadline: float) -> dict[str, DeviceResult]:
        end = self._end(deadline)
        results = self._load(tunnels, end)
        loaded = [t for t in tunnels if results[t.tunnel_id].ok]
        if not loaded:
            return results
        keys = batch_keys(tunnels)
        try:
            with self._session(end) as session:
                before = _ike_sas(session)
        except _Broken as exc:
            results.update(every(loaded, DeviceStatus.UNKNOWN, f"list-sas failed: {exc}"))
            return results
        except OSError as exc:
            results.update(every(loaded, DeviceStatus.FAILED, self._unreachable(exc)))
            return results
        started = time.monotonic()
        watch = _Watch(self.socket_path, end).start()  # before any trigger: no event can be missed
        try:
            triggered: dict[str, DeviceTunnel] = {}
            with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(loaded)))) as pool:
                for tunnel, result in zip(loaded, pool.map(lambda t: self._trigger(t, before, end, keys), loaded),
                                          strict=True):
                    if result is None:
                        triggered[tunnel.tunnel_id] = tunnel
                    else:
                        results[tunnel.tunnel_id] = result
            results.update(self._await_fresh(triggered, before, watch, started, end, keys))
        finally:
            watch.stop()
        return results

    # -- steps -------------------------------------------------------------------------------------
    def _end(self, deadline: float) -> float:
        return min(deadline, time.monotonic() + self.timeout)

    def _unreachable(self, exc: OSError) -> str:
        return f"cannot reach charon at {self.socket_path}: {exc.strerror or type(exc).__name__}"

    @contextlib.contextmanager
    def _session(self, end: float) -> Iterator[Any]:
        """A vici session whose every read and write ends by ``end``. Connecting raises OSError
        (nothing was sent); a failure after that raises _Broken."""
        sock = _connect(self.socket_path, end)
        try:
            session = vici.Session(sock)
            session.transport = _DeadlineTransport(sock, end)
            try:
                yield session
            except (OSError, vici.exception.SessionException, vici.exception.DeserializationException,
                    ValueError, KeyError, IndexError) as exc:  # struct errors surface as ValueError
                raise _Broken(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None
        finally:
            sock.close()

    def _load(self, tunnels: Sequence[DeviceTunnel], end: float) -> dict[str, DeviceResult]:
        """load-shared each tunnel's ``psk``, in one session."""
        if not tunnels:
            return {}
        keys = batch_keys(tunnels)
        results: dict[str, DeviceResult] = {}
        current: DeviceTunnel | None = None
        try:
            with self._session(end) as session:
                for tunnel in tunnels:
                    current = tunnel
                    try:
                        session.load_shared({"id": fill(self.secret_id, tunnel), "type": "IKE",
                                             "data": tunnel.psk.reveal(),
                                             "owners": [fill(o, tunnel) for o in self.owners]})
                    except vici.exception.CommandException as exc:
                        results[tunnel.tunnel_id] = DeviceResult(
                            DeviceStatus.FAILED, f"charon refused the key: {one_line(str(exc), keys, 200)}")
                    else:
                        results[tunnel.tunnel_id] = DeviceResult(DeviceStatus.OK)
                    current = None
        except _Broken as exc:
            reason = one_line(str(exc), keys, 200)
            if current is not None:
                results[current.tunnel_id] = DeviceResult(
                    DeviceStatus.UNKNOWN, f"the vici session broke during load-shared ({reason}): "
                                          "charon may hold the key")
        except OSError as exc:
            reason = self._unreachable(exc)
            return every(tunnels, DeviceStatus.FAILED, reason)
        for tunnel in tunnels:
            results.setdefault(tunnel.tunnel_id, DeviceResult(DeviceStatus.FAILED,
                                                              "not sent: the vici session broke before it"))
        return results

    def _trigger(self, tunnel: DeviceTunnel, before: dict[str, dict[str, str]], end: float,
                 keys: list[str]) -> DeviceResult | None:
        """Start a fresh authentication; None when it is under way."""
        ike, child = fill(self.ike, tunnel), fill(self.child, tunnel)
        left_ms = max(1, int((end - time.monotonic()) * 1000))
        try:
            with self._session(end) as session:
                if self.reauth == "rekey" and before.get(ike):
                    try:
                        answer = session.rekey({"ike": ike, "reauth": "yes"})
                    except vici.exception.CommandException:
                        answer = {"matches": b"0"}  # the SA went away since list-sas: bring it up instead
                    if int(answer.get("matches", b"1") or 1) > 0:
                        return None
                if self.reauth == "restart" and before.get(ike):
                    _drain(lambda: session.terminate({"ike": ike, "timeout": left_ms}))
                _drain(lambda: session.initiate({"child": child, "ike": ike, "timeout": -1}))
                return None
        except vici.exception.CommandException as exc:
            return DeviceResult(DeviceStatus.FAILED,
                                f"charon refused to re-authenticate {ike}: {one_line(str(exc), keys, 200)}")
        except _Broken as exc:
            return DeviceResult(DeviceStatus.UNKNOWN, f"the vici session broke while re-authenticating {ike} "
                                                      f"({one_line(str(exc), keys, 200)})")
        except OSError as exc:
            return DeviceResult(DeviceStatus.FAILED, self._unreachable(exc))

    def _await_fresh(self, triggered: dict[str, DeviceTunnel], before: dict[str, dict[str, str]], watch: _Watch,
                     started: float, end: float, keys: list[str]) -> dict[str, DeviceResult]:
        """Wait until each tunnel's IKE SA is freshly ESTABLISHED (OK), its new IKE SA went down without
        ever being up (FAILED: the authentication was refused or never answered), or time is out.
        charon's ``ike-updown`` events give both verdicts as they happen; while they cannot be trusted,
        list-sas is polled, which can only tell OK: an SA it does not list may be busy (list-sas skips
        those), so absence is no verdict."""
        results: dict[str, DeviceResult] = {}
        waiting = {tid: fill(self.ike, tunnel) for tid, tunnel in triggered.items()}
        last_error, polled = "", False  # the last list-sas's error; whether one ever answered
        next_poll = time.monotonic()
        events_ok, broken = True, ""
        while waiting and time.monotonic() < end:  # past the end, the event session's own deadline breaks it
            with watch.cond:
                events_ok, broken = not watch.broken, watch.broken
                up, down, seen = set(watch.up), dict(watch.down), watch.version
            for tid, ike in list(waiting.items()):
                old = before.get(ike, {})
                if any(name == ike and uid not in old for name, uid in up):
                    results[tid] = DeviceResult(DeviceStatus.OK)
                    del waiting[tid]
                elif any(name == ike and uid not in old for name, uid in down):
                    results[tid] = DeviceResult(DeviceStatus.FAILED, f"the re-authentication of {ike} failed: "
                                                                     "the new IKE SA was torn down")
                    del waiting[tid]
            if waiting and not events_ok and time.monotonic() >= next_poll:
                try:
                    with self._session(end) as session:
                        now_sas = _ike_sas(session)
                    last_error, polled = "", True
                except (_Broken, OSError) as exc:
                    last_error = one_line(str(exc), keys, 200)
                    now_sas = None
                for tid, ike in list(waiting.items()):
                    prior = set(before.get(ike, {}))
                    if now_sas is not None and any(uid not in prior and state == "ESTABLISHED"
                                                   for uid, state in now_sas.get(ike, {}).items()):
                        results[tid] = DeviceResult(DeviceStatus.OK)
                        del waiting[tid]
                next_poll = time.monotonic() + self.poll_interval
            left = end - time.monotonic()
            if not waiting or left <= 0:
                break
            with watch.cond:
                if watch.version == seen:  # nothing new since the look above
                    watch.cond.wait(min(left, self.poll_interval))
        waited = time.monotonic() - started
        # as of the last look before the deadline (the event session itself ends at the deadline)
        blind = not events_ok and not polled  # no event stream to the end, and no list-sas ever answered
        why = last_error or broken
        for tid, ike in waiting.items():
            if blind:
                results[tid] = DeviceResult(DeviceStatus.UNKNOWN, f"could not watch {ike} come up ({why})")
            else:  # watched to the end, and no fresh SA came up in time
                results[tid] = DeviceResult(DeviceStatus.FAILED,
                                            f"no fresh IKE SA {ike} established within {waited:.0f}s")
        return results


def _drain(call: Callable[[], Any]) -> None:
    """Run a streamed vici command to its end (its log events are not needed)."""
    for _ in call():
        pass


def _ike_sas(session: Any) -> dict[str, dict[str, str]]:
    """IKE SA name -> {unique id: state}, from one list-sas."""
    out: dict[str, dict[str, str]] = {}
    for event in session.list_sas({"noblock": "yes"}):  # never wait for an SA busy elsewhere
        for name, sa in event.items():
            if isinstance(sa, dict):
                uid = _text(sa.get("uniqueid"))
                out.setdefault(name, {})[uid] = _text(sa.get("state"))
    return out


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value or "")


def _connect(path: str, end: float) -> socket.socket:
    """A unix-socket connection to charon, made by ``end``. A connect with a timeout is non-blocking,
    and a non-blocking unix connect to a listener whose accept backlog is full fails at once with
    EAGAIN instead of waiting: retry it, with a growing pause, until the deadline."""
    pause = CONNECT_RETRY_FIRST
    refused: BlockingIOError | None = None
    while True:
        left = end - time.monotonic()
        if left <= 0:
            if refused is not None:
                raise BlockingIOError(refused.errno, f"{refused.strerror} (charon's vici backlog stayed full)")
            raise TimeoutError("no time left before the deadline")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(left)
            sock.connect(path)
            return sock
        except BlockingIOError as exc:  # EAGAIN: the backlog is full; nothing was sent
            sock.close()
            refused = exc
        except BaseException:
            sock.close()
            raise
        time.sleep(max(0.0, min(pause, end - time.monotonic())))  # backoff, bounded by the deadline
        pause = min(pause * 2, CONNECT_RETRY_MAX)


class _Watch:
    """charon's ``ike-updown`` events, on a session of its own, read by a thread for the duration of
    a verification: which IKE SAs (name, unique id) came up, and which went down before they were
    ever up (a refused authentication, a peer that never answered). ``broken`` tells that the stream
    is not (or no longer) to be trusted; the caller then falls back to polling list-sas."""

    def __init__(self, path: str, end: float) -> None:
        self.cond = threading.Condition()
        self.up: set[tuple[str, str]] = set()
        self.down: dict[tuple[str, str], str] = {}  # went down without having been up -> last state
        self.broken = ""
        self.version = 0  # counts changes, for waiters
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._end = end
        self._path = path

    def start(self) -> _Watch:
        try:
            sock = _connect(self._path, self._end)
        except OSError as exc:
            self.broken = f"cannot open an event session: {exc.strerror or type(exc).__name__}"
            return self
        try:
            transport = _DeadlineTransport(sock, self._end)
            for event in WATCH_EVENTS:
                transport.send(vici.protocol.Packet.register_event(event))
                while True:
                    answer = vici.protocol.Packet.parse(transport.receive())
                    if answer.response_type != vici.protocol.Packet.EVENT:
                        break
                if answer.response_type != vici.protocol.Packet.EVENT_CONFIRM:
                    raise ValueError(f"charon did not confirm the {event} event (type {answer.response_type})")
        except (OSError, ValueError, vici.exception.DeserializationException) as exc:
            sock.close()
            self.broken = f"cannot watch events: {type(exc).__name__}"
            return self
        self._sock = sock
        self._thread = threading.Thread(target=self._read, args=(transport,), name="vici-events", daemon=True)
        self._thread.start()
        return self

    def _read(self, transport: _DeadlineTransport) -> None:
        try:
            while True:
                packet = vici.protocol.Packet.parse(transport.receive())
                if packet.response_type != vici.protocol.Packet.EVENT:
                    continue
                message = vici.protocol.Message.deserialize(packet.payload)
                is_up = _text(message.get("up")) == "yes"
                with self.cond:
                    for name, sa in message.items():
                        if name == "up" or not isinstance(sa, dict):
                            continue
                        key = (_text(name), _text(sa.get("uniqueid")))
                        if is_up:
                            self.up.add(key)
                        elif key not in self.up:
                            self.down[key] = _text(sa.get("state"))
                    self.version += 1
                    self.cond.notify_all()
        except TimeoutError:
            return  # the call's deadline: the stream ends with it, and nothing was missed before
        except Exception as exc:  # any other failure of the stream makes it untrusted
            with self.cond:
                self.broken = self.broken or f"the event session broke: {type(exc).__name__}"
                self.version += 1
                self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.broken = self.broken or "stopped"
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader with end-of-file
        if self._thread is not None:
            self._thread.join(timeout=WATCH_JOIN_TIMEOUT)
        if self._sock is not None:
            self._sock.close()
