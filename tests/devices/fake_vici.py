"""A fake charon: the vici wire protocol on a unix socket, enough of it for the strongswan device.

Packets and messages are encoded and decoded with the ``vici`` package's own ``Packet`` and
``Message``. It keeps shared secrets (``load-shared``) and IKE SAs per connection name; a forced
re-authentication (``rekey`` with reauth, or ``terminate`` + ``initiate``) makes a new SA that is
CONNECTING for ``auth_delay`` seconds and then ESTABLISHED if the shared secret owned by the
connection's local identity equals the key the far end (Cloudflare) holds, or torn down if not.
State changes are computed when ``list-sas`` looks, and by a timer when the new SA is due, which
streams ``ike-updown`` events (up, or down for an SA that never came up) to the connections that
registered for them, as charon does.
"""

from __future__ import annotations

import contextlib
import os
import socketserver
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vici.protocol import FiniteStream, Message, Packet


@dataclass
class Conn:
    local_id: str
    peer_key: str | None  # what the far end holds
    up: bool = True


@dataclass
class SA:
    uniqueid: int
    state: str
    ready_at: float = 0.0


@dataclass
class FakeCharon:
    path: str
    auth_delay: float = 0.05
    conns: dict[str, Conn] = field(default_factory=dict)
    shared: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> {data, owners, type}
    sas: dict[str, list[SA]] = field(default_factory=dict)
    commands: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    refuse_ids: set[str] = field(default_factory=set)
    hang: dict[str, float] = field(default_factory=dict)  # command -> seconds without an answer
    drop: set[str] = field(default_factory=set)  # commands answered by closing the connection
    events: bool = True  # False: registering for ike-updown is answered EVENT_UNKNOWN (no event stream)
    hide_connecting: bool = False  # every other list-sas skips SAs not ESTABLISHED (busy in charon)
    _lists: int = 0
    listeners: list[Any] = field(default_factory=list)  # sockets registered for ike-updown
    timers: list[threading.Timer] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _next_id: int = 1

    # -- setup and inspection ----------------------------------------------------------------
    def add_conn(self, name: str, local_id: str, peer_key: str | None, up: bool = True) -> None:
        with self.lock:
            self.conns[name] = Conn(local_id, peer_key)
            if up:
                self.sas[name] = [self._new_sa("ESTABLISHED")]

    def key_for(self, name: str) -> str | None:
        """The key charon would authenticate ``name`` with: the shared secret its identity owns."""
        with self.lock:
            return self._key_for(name)

    def _key_for(self, name: str) -> str | None:
        local = self.conns[name].local_id
        for secret in self.shared.values():
            if local in secret["owners"]:
                return str(secret["data"])
        return None

    def established(self, name: str) -> list[int]:
        with self.lock:
            self._settle()
            return [sa.uniqueid for sa in self.sas.get(name, []) if sa.state == "ESTABLISHED"]

    def _new_sa(self, state: str, ready_at: float = 0.0) -> SA:
        sa = SA(self._next_id, state, ready_at)
        self._next_id += 1
        return sa

    def _settle(self) -> None:
        now = time.monotonic()
        for name, sas in self.sas.items():
            for sa in list(sas):
                if sa.state == "CONNECTING" and now >= sa.ready_at:
                    conn = self.conns[name]
                    if conn.peer_key is not None and self._key_for(name) == conn.peer_key:
                        sa.state = "ESTABLISHED"
                        sas[:] = [s for s in sas if s is sa or s.state == "CONNECTING"]  # the old SA goes
                        self._emit({"up": "yes", name: {"uniqueid": str(sa.uniqueid), "state": "ESTABLISHED"}})
                    else:
                        sas.remove(sa)  # AUTHENTICATION_FAILED
                        self._emit({name: {"uniqueid": str(sa.uniqueid), "state": "CONNECTING"}})

    def _emit(self, body: dict[str, Any]) -> None:
        packet = bytes([Packet.EVENT, len(b"ike-updown")]) + b"ike-updown" + Message.serialize(body)
        for sock in list(self.listeners):
            try:
                _send(sock, packet)
            except OSError:
                self.listeners.remove(sock)

    def settle_later(self, delay: float) -> None:
        def settle() -> None:
            with self.lock:
                self._settle()

        timer = threading.Timer(delay, settle)
        timer.daemon = True
        self.timers.append(timer)
        timer.start()

    def _reauth(self, name: str) -> None:
        self.sas.setdefault(name, []).append(self._new_sa("CONNECTING", time.monotonic() + self.auth_delay))
        self.settle_later(self.auth_delay)

    # -- commands -----------------------------------------------------------------------------
    def command(self, name: str, msg: dict[str, Any]) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any]]:
        """(events to stream, response) for one command."""
        text = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in msg.items()}
        with self.lock:
            self.commands.append((name, {k: v for k, v in text.items() if k != "data"}))
            self._settle()
            if name == "load-shared":
                if text["id"] in self.refuse_ids:
                    return [], {"success": "no", "errmsg": "loading shared secret failed"}
                self.shared[text["id"]] = {"data": text["data"], "type": text["type"],
                                           "owners": [o.decode() for o in msg.get("owners", [])]}
                return [], {"success": "yes"}
            if name == "list-sas":
                self._lists += 1
                hide = self.hide_connecting and self._lists % 2 == 0
                events = [("list-sa", {n: {"uniqueid": str(sa.uniqueid), "state": sa.state, "version": "2"}})
                          for n, sas in self.sas.items() for sa in sas
                          if sa.state == "ESTABLISHED" or not hide]
                return events, {}
            if name == "rekey":
                ike = text.get("ike", "")
                live = [sa for sa in self.sas.get(ike, []) if sa.state == "ESTABLISHED"]
                if not live:
                    return [], {"success": "no", "errmsg": "no matching SAs to rekey found"}
                if text.get("reauth") == "yes":
                    self._reauth(ike)
                return [], {"success": "yes", "matches": str(len(live))}
            if name == "terminate":
                ike = text.get("ike", "")
                if not self.sas.get(ike):
                    return [], {"success": "no", "errmsg": "no matching SAs to terminate found"}
                self.sas[ike] = []
                return [("control-log", {"msg": f"deleting IKE_SA {ike}"})], {"success": "yes", "matched": "1"}
            if name == "initiate":
                ike = text.get("ike") or text.get("child", "")
                if ike not in self.conns:
                    return [], {"success": "no", "errmsg": f"CHILD_SA config '{ike}' not found"}
                self._reauth(ike)
                return [("control-log", {"msg": f"initiating IKE_SA {ike}"})], {"success": "yes"}
            return [], {"success": "no", "errmsg": f"unknown command {name}"}


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        charon = self.server.charon
        sock = self.request
        while True:
            raw = _read(sock)
            if raw is None:
                return
            kind = raw[0]
            if kind in (Packet.EVENT_REGISTER, Packet.EVENT_UNREGISTER):
                event_name = raw[2:2 + raw[1]].decode()
                with charon.lock:
                    if not charon.events and event_name != "list-sa":  # list-sas streams list-sa events
                        _send(sock, bytes([Packet.EVENT_UNKNOWN]))
                        continue
                    if kind == Packet.EVENT_REGISTER and event_name == "ike-updown":
                        charon.listeners.append(sock)
                    elif kind == Packet.EVENT_UNREGISTER and sock in charon.listeners:
                        charon.listeners.remove(sock)
                    _send(sock, bytes([Packet.EVENT_CONFIRM]))
                continue
            if kind != Packet.CMD_REQUEST:
                return
            length = raw[1]
            name = raw[2:2 + length].decode()
            msg = Message.deserialize(FiniteStream(raw[2 + length:]))
            if name in charon.hang:
                time.sleep(charon.hang[name])
                return
            if name in charon.drop:
                return
            events, response = charon.command(name, msg)
            with charon.lock:  # one writer at a time: the timers stream events too
                for event, body in events:
                    ev = event.encode()
                    _send(sock, bytes([Packet.EVENT, len(ev)]) + ev + Message.serialize(body))
                _send(sock, bytes([Packet.CMD_RESPONSE]) + Message.serialize(response))


def _read(sock: Any) -> bytes | None:
    header = _recv(sock, 4)
    if header is None:
        return None
    (length,) = struct.unpack("!I", header)
    return _recv(sock, length)


def _recv(sock: Any, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    return data


def _send(sock: Any, payload: bytes) -> None:
    sock.sendall(struct.pack("!I", len(payload)) + payload)


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    charon: FakeCharon


@contextlib.contextmanager
def fake_charon(path: str, **kwargs: Any) -> Iterator[FakeCharon]:
    charon = FakeCharon(path, **kwargs)
    server = _Server(path, _Handler)
    server.charon = charon
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield charon
    finally:
        for timer in charon.timers:
            timer.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
