"""A simulated VyOS router: the VyOS HTTPS API for IPsec pre-shared keys, commits, saves and SAs.

The facts it follows, from the vendor's documentation (VyOS 1.4 "VyOS API",
https://docs.vyos.io/en/1.4/automation/vyos-api.html, and "IPsec Site-to-Site",
https://docs.vyos.io/en/1.4/configuration/vpn/site2site_ipsec.html):
- every endpoint takes an HTTP POST whose form carries ``data`` (JSON) and ``key`` (the API key);
  answers are ``{"success": bool, "data": ..., "error": ...}``; a missing or wrong key is HTTP 401
  "Valid API key is required"; a refused operation is HTTP 400 with the reason in ``error``;
- ``/retrieve``: ``showConfig`` (a subtree as JSON; 400 "Configuration under specified path is
  empty" where there is none), ``returnValue``, ``returnValues``, ``exists``;
- ``/configure``: one op or a list of ops (``{"op": "set"|"delete", "path": [...], "value": ...}``),
  applied and **committed together** (a failed commit changes nothing); with ``confirm_time``
  (minutes) the commit is a commit-confirm, reverted unless ``{"op": "confirm"}`` follows in time;
- ``/config-file``: ``save`` writes the running configuration to the boot configuration;
- ``/reset``: ``{"op": "reset", "path": ["vpn", "ipsec", "site-to-site", "peer", NAME]}`` deletes the
  peer's SAs (``reset vpn ipsec site-to-site peer NAME``); ``/show``: ``["vpn", "ipsec", "sa"]`` is the
  text table of ``show vpn ipsec sa`` (Connection, State, Uptime, ...);
- keys live at ``vpn ipsec authentication psk NAME secret`` (``id`` lists the peers' addresses) and,
  unlike most firewalls, VyOS shows them in clear: the API can tell whether a key is already there.

What it adds for tests: each psk entry and site-to-site peer is bound to a Cloudflare tunnel; after a
reset, a fresh SA (uptime from 0) comes up only while the router's key equals the key ``peer(account,
tunnel)`` says Cloudflare holds. Faults: the shared ones by route (``vyos.retrieve``, ``vyos.configure``,
``vyos.config-file``, ``vyos.reset``, ``vyos.show``, ``vyos.other``), ``fail_commit`` (a 400 whose
text may quote the key), ``refuse_key``, ``never_reauth``, ``fail_save``. ``scan_secrets()`` lists every key and
credential it holds, for the secret scan.
"""

from __future__ import annotations

import copy
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from rotator.sim.base import Fault, Request, Response, SimApp
from rotator.sim.base import serve as serve  # the shared loopback server, HTTPS in the tests

JSON_CT = (b"content-type", b"application/json")
PSK = ("vpn", "ipsec", "authentication", "psk")
PEER = ("vpn", "ipsec", "site-to-site", "peer")
ROUTES = {"/retrieve": "vyos.retrieve", "/configure": "vyos.configure", "/config-file": "vyos.config-file",
          "/reset": "vyos.reset", "/show": "vyos.show"}


@dataclass
class Binding:
    account_id: str
    tunnel_id: str
    psk: str  # the psk entry's name
    peer: str  # the site-to-site peer's name
    sa_since: float | None  # monotonic time the current SA came up (None: no SA)
    sa_pending_at: float | None = None


class VyosSim(SimApp):
    def __init__(self, *, peer: Callable[[str, str], str | None] | None = None, api_key: str | None = None,
                 version: str = "1.4.1") -> None:
        super().__init__()
        self.peer = peer
        self.api_key = api_key or secrets.token_urlsafe(24)
        self.version = version
        self.config: dict[str, Any] = {}
        self.saved: dict[str, Any] = {}
        self.bindings: dict[str, Binding] = {}  # peer name -> binding
        self.commits = 0
        self.saves = 0
        self.reauth_seconds = 0.0
        self._confirm_by: float | None = None
        self._before_confirm: dict[str, Any] | None = None
        self._commit_failures: list[str] = []
        self._save_failures = 0
        self._never: set[str] = set()
        self._refused: dict[str, str] = {}

    # -- set-up and inspection ----------------------------------------------------------------
    def add_tunnel(self, name: str, account_id: str, tunnel_id: str, key: str | None, *,
                   local_ip: str = "203.0.113.1", remote_ip: str = "162.159.66.164", peer: str | None = None) -> None:
        """A psk entry ``name`` holding ``key`` and a site-to-site peer (default: the same name), with
        an SA up; committed and saved."""
        peer_name = peer or name
        with self.lock:
            entry: dict[str, Any] = {"id": [local_ip, remote_ip]}
            if key is not None:
                entry["secret"] = key
            _put(self.config, [*PSK, name], entry)
            _put(self.config, [*PEER, peer_name], {"authentication": {"mode": "pre-shared-secret"},
                                                   "local-address": local_ip, "remote-address": remote_ip,
                                                   "vti": {"bind": f"vti{len(self.bindings)}"}})
            self.saved = copy.deepcopy(self.config)
            self.bindings[peer_name] = Binding(account_id, tunnel_id, name, peer_name, time.monotonic())

    def secret_of(self, name: str, saved: bool = False) -> str | None:
        with self.lock:
            self._advance()
            node = _get(self.saved if saved else self.config, [*PSK, name])
            return node.get("secret") if isinstance(node, dict) else None

    def held(self, account_id: str, tunnel_id: str) -> str | None:
        """The key the router runs for a Cloudflare tunnel (for the invariant)."""
        with self.lock:
            b = next((b for b in self.bindings.values() if (b.account_id, b.tunnel_id) == (account_id, tunnel_id)),
                     None)
        return self.secret_of(b.psk) if b else None

    def scan_secrets(self) -> set[str]:
        with self.lock:
            found = {self.api_key}
            for tree in (self.config, self.saved, self._before_confirm or {}):
                psk = _get(tree, list(PSK))
                if isinstance(psk, dict):
                    found |= {e["secret"] for e in psk.values() if isinstance(e, dict) and e.get("secret")}
            return found

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"request_counts": dict(self.counts), "commits": self.commits, "saves": self.saves,
                    "peers": sorted(self.bindings), "confirm_pending": self._confirm_by is not None}

    # -- faults -------------------------------------------------------------------------------
    def fail_commit(self, text: str, count: int = 1) -> None:
        """The next ``count`` configure requests fail their commit (HTTP 400, nothing changes) with
        ``text``; ``{key}`` in it becomes the first secret the request sets."""
        with self.lock:
            self._commit_failures.extend([text] * count)

    def refuse_key(self, name: str, message: str) -> None:
        """The next configure that sets psk ``name``'s secret fails validation (HTTP 400) with ``message``."""
        with self.lock:
            self._refused[name] = message

    def fail_save(self, count: int = 1) -> None:
        with self.lock:
            self._save_failures += count

    def never_reauth(self, peers: list[str]) -> None:
        with self.lock:
            self._never.update(peers)

    def clear(self) -> None:
        """Lift every armed fault (the router's keys and SAs stay)."""
        with self.lock:
            self._commit_failures.clear()
            self._refused.clear()
            self._never.clear()
            self._save_failures = 0
            self.faults.clear()

    def expire_confirm(self) -> None:
        """The commit-confirm window passes now: an unconfirmed commit is reverted."""
        with self.lock:
            if self._confirm_by is not None:
                self._confirm_by = time.monotonic()
            self._advance()

    def control(self, op: str, args: dict[str, Any]) -> Any:
        own: dict[str, Callable[..., Any]] = {"fail_commit": self.fail_commit, "fail_save": self.fail_save,
                                              "refuse_key": self.refuse_key, "clear": self.clear,
                                              "never_reauth": self.never_reauth, "expire_confirm": self.expire_confirm}
        if op in own:
            return own[op](**args)
        return self._shared_control(op, args)

    # -- HTTP ---------------------------------------------------------------------------------
    def route_of(self, req: Request) -> str:
        return ROUTES.get(req.path, "vyos.other") if req.method == "POST" else "vyos.other"

    def fault_response(self, fault: Fault) -> Response:
        return _answer(fault.status, False, None, fault.message or f"simulated failure (HTTP {fault.status})")

    def handle(self, req: Request, route: str) -> Response:
        self._advance()
        if route == "vyos.other":
            return _answer(404, False, None, "Not Found")
        form = dict(parse_qsl(req.body.decode("utf-8", "replace"), keep_blank_values=True))
        if not hmac.compare_digest(form.get("key", "").encode(), self.api_key.encode()):
            return _answer(401, False, None, "Valid API key is required")
        try:
            data = json.loads(form.get("data", ""))
        except ValueError:
            return _answer(400, False, None, "Failed to parse JSON")
        if route == "vyos.configure":
            return self._configure(data)
        if not isinstance(data, dict) or not isinstance(data.get("path", []), list):
            return _answer(400, False, None, "Malformed command")
        op, path = data.get("op"), [str(p) for p in data.get("path", [])]
        if route == "vyos.retrieve":
            return self._retrieve(op, path)
        if route == "vyos.config-file":
            if op != "save":
                return _answer(400, False, None, f"'{op}' is not a valid operation")
            if self._save_failures:
                self._save_failures -= 1
                return _answer(400, False, None, "Failed to save: /config/config.boot: No space left on device")
            self.saved = copy.deepcopy(self.config)
            self.saves += 1
            return _answer(200, True, "Saving configuration to '/config/config.boot'...\nDone\n")
        if route == "vyos.reset":
            if op != "reset" or len(path) != 5 or tuple(path[:4]) != PEER:
                return _answer(400, False, None, "Invalid command")
            binding = self.bindings.get(path[4])
            if binding is None:
                return _answer(400, False, None, f"Peer {path[4]} not found")
            binding.sa_since = None
            binding.sa_pending_at = time.monotonic() + self.reauth_seconds
            self._advance()
            return _answer(200, True, f"Resetting {path[4]}...\n")
        if op != "show" or path != ["vpn", "ipsec", "sa"]:
            return _answer(400, False, None, "Invalid command")
        return _answer(200, True, self._sa_table())

    def _retrieve(self, op: Any, path: list[str]) -> Response:
        node = _get(self.config, path)
        if op == "exists":
            return _answer(200, True, node is not None)
        if op == "showConfig":
            if node is None:
                return _answer(400, False, None, "Configuration under specified path is empty\n")
            return _answer(200, True, node if isinstance(node, dict) else {path[-1]: node})
        if op in ("returnValue", "returnValues"):
            if node is None or isinstance(node, dict):
                return _answer(400, False, None, "Path has no value\n" if node is None else "Path is not a leaf\n")
            values = node if isinstance(node, list) else [node]
            return _answer(200, True, values if op == "returnValues" else values[0])
        return _answer(400, False, None, f"'{op}' is not a valid operation")

    def _configure(self, data: Any) -> Response:
        if isinstance(data, dict) and isinstance(data.get("commands"), list):  # a list with confirm_time
            ops = data["commands"]
        else:
            ops = data if isinstance(data, list) else [data]
        if len(ops) == 1 and isinstance(ops[0], dict) and ops[0].get("op") == "confirm":
            if self._confirm_by is None:
                return _answer(400, False, None, "No confirmation pending")
            self._confirm_by, self._before_confirm = None, None
            return _answer(200, True, "Reboot timer stopped\n")
        confirm = data.get("confirm_time") if isinstance(data, dict) else None
        working = copy.deepcopy(self.config)
        first_secret = None
        for op in ops:
            if not isinstance(op, dict) or op.get("op") not in ("set", "delete") or not isinstance(op.get("path"), list):
                return _answer(400, False, None, "Malformed command")
            path = [str(p) for p in op["path"]]
            if "value" in op:
                path.append(str(op["value"]))
            if op["op"] == "set":
                if len(path) < 2:
                    return _answer(400, False, None, "Invalid path")
                if tuple(path[:4]) == PSK and len(path) == 7 and path[5] == "secret":
                    first_secret = first_secret or path[6]
                    if path[4] in self._refused:
                        return _answer(400, False, None, f"Invalid value for vpn ipsec authentication psk {path[4]} "
                                                         f"secret: {self._refused.pop(path[4])}\n")
                _put(working, path[:-1], path[-1], leaf=True)
            else:
                _delete(working, path)
        if self._commit_failures:
            text = self._commit_failures.pop(0).replace("{key}", first_secret or "")
            return _answer(400, False, None, f"Commit failed: {text}\n")
        if confirm is not None:
            if not isinstance(confirm, int) or confirm < 1:
                return _answer(400, False, None, "confirm_time must be a positive number of minutes")
            self._before_confirm = copy.deepcopy(self.config)
            self._confirm_by = time.monotonic() + 60 * confirm
        self.config = working
        self.commits += 1
        return _answer(200, True, None)

    def _advance(self) -> None:
        now = time.monotonic()
        if self._confirm_by is not None and now >= self._confirm_by and self._before_confirm is not None:
            self.config, self._before_confirm, self._confirm_by = self._before_confirm, None, None
        for b in self.bindings.values():
            if b.sa_pending_at is not None and now >= b.sa_pending_at:
                node = _get(self.config, [*PSK, b.psk])
                key = node.get("secret") if isinstance(node, dict) else None
                theirs = self.peer(b.account_id, b.tunnel_id) if self.peer else key
                if b.peer not in self._never and key is not None and theirs == key:
                    b.sa_since, b.sa_pending_at = now, None

    def _sa_table(self) -> str:
        head = ("Connection    State    Uptime    Bytes In/Out    Packets In/Out    Remote address    Remote ID    "
                "Proposal\n------------  -------  --------  --------------  ----------------  ----------------  "
                "-----------  ----------\n")
        rows = []
        now = time.monotonic()
        for b in self.bindings.values():
            state, uptime = ("up", _uptime(now - b.sa_since)) if b.sa_since is not None else ("down", "N/A")
            remote = _get(self.config, [*PEER, b.peer, "remote-address"]) or "N/A"
            rows.append(f"{b.peer}-vti  {state}  {uptime}  0B/0B  0/0  {remote}  N/A  "
                        "AES_GCM_16_256/PRF_HMAC_SHA2_256/ECP_384")
        return head + "\n".join(rows) + "\n"


def _uptime(seconds: float) -> str:
    s = int(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if h or m else "") + f"{s}s"


def _get(tree: Any, path: list[str] | tuple[str, ...]) -> Any:
    node = tree
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _put(tree: dict[str, Any], path: list[str], value: Any, leaf: bool = False) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
    if leaf and path[-1] == "id":  # a multi-value node
        values = node.setdefault("id", [])
        if value not in values:
            values.append(value)
    else:
        node[path[-1]] = value


def _delete(tree: dict[str, Any], path: list[str]) -> None:
    node = _get(tree, path[:-1])
    if isinstance(node, dict):
        node.pop(path[-1], None)


def _answer(status: int, success: bool, data: Any, error: str | None = None) -> Response:
    return Response(status, json.dumps({"success": success, "data": data, "error": error}).encode(), [JSON_CT])
