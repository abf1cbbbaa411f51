"""A Cloudflare API v4 simulator: Magic IPsec tunnels, bulk PSK set, auth, envelope, rate limits.

Faithful to ``shared/specs/cloudflare-magic-ipsec.md`` (section numbers in comments); the
conformance tests in ``tests/sim/test_cloudflare_conformance.py`` drive it with the official
``cloudflare`` SDK. It keeps, per tunnel, the PSK really in force, so tests can check the
invariant against what "Cloudflare" holds. Route names for counting and faults: ``cf.list``,
``cf.get``, ``cf.psk_validate``, ``cf.psk_apply``, ``cf.psk_generate``, ``cf.other``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rotator.sim.base import Fault, Request, Response, SimApp

JSON_CT = (b"content-type", b"application/json")
HEX32 = re.compile(r"^[0-9a-f]{32}$")
TOKEN_RE = re.compile(r"^(cfat_)?[A-Za-z0-9_-]{40}$")
LEGACY_KEY_RE = re.compile(r"^([a-z0-9]{37}|[0-9a-f]{32})$")
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
ALNUM = string.ascii_letters + string.digits
HTML_ERROR = (
    "<!DOCTYPE html>\n<html><head><title>{status} Bad gateway | api.cloudflare.com | Cloudflare</title>"
    "</head><body><div id=\"cf-error-details\"><h1>Bad gateway</h1><span>Error code {status}</span>"
    "</div></body></html>\n"
)


def cf_time(ts: float) -> str:
    """RFC 3339 UTC with microseconds (whether live values carry fractions is UNCONFIRMED, 4)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_token() -> str:
    return "".join(secrets.choice(ALNUM + "_-") for _ in range(40))


def new_id() -> str:
    return secrets.token_hex(16)


@dataclass(slots=True)
class Tunnel:
    id: str
    name: str
    index: int
    psk: str | None
    created: float
    modified: float
    last_generated: float | None
    ipsec_id: str

    def view(self, new_hc_target: bool) -> dict[str, Any]:
        endpoint = f"203.0.113.{self.index % 250 + 1}"
        target: Any = {"effective": endpoint, "saved": endpoint} if new_hc_target else endpoint
        octet = (self.index * 2) % 256
        out: dict[str, Any] = {
            "id": self.id, "name": self.name, "cloudflare_endpoint": "162.159.66.164",
            "interface_address": f"10.{(self.index // 128) % 256}.{octet}.0/31",
            "customer_endpoint": endpoint, "description": f"Simulated tunnel {self.name}",
            "created_on": cf_time(self.created), "modified_on": cf_time(self.modified),
            "allow_null_cipher": False, "replay_protection": False, "automatic_return_routing": False,
            "health_check": {"direction": "unidirectional", "enabled": True, "rate": "mid",
                             "target": target, "type": "reply"},
        }
        if self.last_generated is not None:
            out["psk_metadata"] = {"last_generated_on": cf_time(self.last_generated)}
        return out


@dataclass(slots=True)
class Credential:
    accounts: set[str] | None  # None = every account
    write: bool = True


@dataclass(slots=True)
class Budget:
    window_start: float
    count: int = 0
    blocked_until: float = 0.0


@dataclass(slots=True)
class HistoryEntry:
    at: float
    account: str
    tunnel: str
    psk: str
    via: str


@dataclass
class RateLimit:
    limit: int = 1200
    window: float = 300.0


class CfError(Exception):
    def __init__(self, status: int, errors: list[dict[str, Any]], bare: bool = False,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.errors = errors
        self.bare = bare
        self.headers = headers


def _err(code: int, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}


AUTH_ERROR = _err(10000, "Authentication error")


class CloudflareSim(SimApp):
    """The Cloudflare API. Python methods below double as the fault and inspection API."""

    def __init__(self, base_path: str = "/client/v4", rate_limit: RateLimit | None = None) -> None:
        super().__init__()
        self.base_path = base_path.rstrip("/")
        self.rate = rate_limit or RateLimit()
        self.accounts: dict[str, dict[str, Tunnel]] = {}
        self.tokens: dict[str, Credential] = {}
        self.legacy: dict[tuple[str, str], Credential] = {}
        self.budgets: dict[str, Budget] = {}
        self.history: list[HistoryEntry] = []
        self.refusals: dict[str, tuple[str, str]] = {}  # tunnel -> (stage, reason)
        self._next_index = 0

    # -- setup & inspection (Python API) -------------------------------------------------------
    def add_account(self, account_id: str | None = None) -> str:
        acc = account_id or new_id()
        with self.lock:
            self.accounts.setdefault(acc, {})
        return acc

    def add_tunnel(self, account_id: str, name: str | None = None, tunnel_id: str | None = None,
                   with_psk: bool = True) -> str:
        now = time.time()
        with self.lock:
            self._next_index += 1
            idx = self._next_index
            tid = tunnel_id or new_id()
            psk = "".join(secrets.choice(ALNUM) for _ in range(32)) if with_psk else None
            self.accounts[account_id][tid] = Tunnel(
                tid, name or f"tun{idx:05d}", idx, psk, now, now, now if with_psk else None,
                f"{100000 + idx}_{secrets.token_hex(16)}",
            )
        return tid

    def add_token(self, token: str | None = None, accounts: set[str] | None = None, write: bool = True) -> str:
        tok = token or new_token()
        with self.lock:
            self.tokens[tok] = Credential(accounts, write)
        return tok

    def add_legacy_key(self, email: str, key: str, accounts: set[str] | None = None) -> None:
        with self.lock:
            self.legacy[(email, key)] = Credential(accounts, True)

    def psk_of(self, account_id: str, tunnel_id: str) -> str | None:
        """The PSK in force on the simulated edge for this tunnel."""
        with self.lock:
            return self.accounts[account_id][tunnel_id].psk

    def psks(self, account_id: str) -> dict[str, str | None]:
        with self.lock:
            return {t.id: t.psk for t in self.accounts[account_id].values()}

    def applied_history(self) -> list[HistoryEntry]:
        with self.lock:
            return list(self.history)

    def refuse_tunnels(self, tunnel_ids: list[str], reason: str = "tunnel is being modified",
                       stage: str = "apply") -> None:
        """Refuse these tunnels in ``unapplied_psks``: on apply only, or already on validate_only."""
        if stage not in ("apply", "validate"):
            raise ValueError("stage must be 'apply' or 'validate'")
        with self.lock:
            for tid in tunnel_ids:
                self.refusals[tid] = (stage, reason)

    def clear_refusals(self) -> None:
        with self.lock:
            self.refusals.clear()

    def set_rate_limit(self, limit: int, window: float) -> None:
        with self.lock:
            self.rate = RateLimit(limit, window)
            self.budgets.clear()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "request_counts": dict(self.counts),
                "accounts": {a: {t.id: {"name": t.name, "psk": t.psk,
                                        "last_generated_on": t.last_generated and cf_time(t.last_generated)}
                                 for t in ts.values()} for a, ts in self.accounts.items()},
                "history": [dataclasses.asdict(h) for h in self.history],
            }

    def control(self, op: str, args: dict[str, Any]) -> Any:
        own: dict[str, Callable[..., Any]] = {
            "refuse_tunnels": self.refuse_tunnels, "clear_refusals": self.clear_refusals,
            "set_rate_limit": self.set_rate_limit, "psk_of": self.psk_of,
        }
        if op in own:
            return own[op](**args)
        return self._shared_control(op, args)

    # -- HTTP ---------------------------------------------------------------------------------
    def route_of(self, req: Request) -> str:
        path = req.path
        if not path.startswith(self.base_path + "/accounts/"):
            return "cf.other"
        parts = path[len(self.base_path) + 1:].split("/")
        if len(parts) < 4 or parts[2] != "magic" or parts[3] != "ipsec_tunnels":
            return "cf.other"
        if len(parts) == 4:
            return "cf.list" if req.method == "GET" else "cf.other"
        if len(parts) == 5:
            if parts[4] == "psk" and req.method == "POST":
                return "cf.psk_validate" if _truthy(req.query.get("validate_only")) else "cf.psk_apply"
            return "cf.get" if req.method == "GET" else "cf.other"
        if len(parts) == 6 and parts[5] == "psk_generate" and req.method == "POST":
            return "cf.psk_generate"
        return "cf.other"

    def fault_response(self, fault: Fault) -> Response:
        headers: list[tuple[bytes, bytes]] = []
        if fault.retry_after is not None:
            headers.append((b"retry-after", str(fault.retry_after).encode()))
        if fault.html:
            body = HTML_ERROR.format(status=fault.status).encode()
            return Response(fault.status, body, [(b"content-type", b"text/html"), *headers])
        if fault.status == 429:
            error = _err(971, "Please wait and consider throttling your request speed")
        elif fault.status >= 500:
            error = _err(10001, "Internal server error")  # UNCONFIRMED code/message (7)
        else:
            error = _err(1000, "Request failed")
        return Response(fault.status, _envelope(None, [error]), [JSON_CT, *headers])

    def handle(self, req: Request, route: str) -> Response:
        rl_headers: list[tuple[bytes, bytes]] = []
        try:
            cred_key, cred = self._authenticate(req)
            if cred_key is not None:
                rl_headers = self._spend(cred_key)
            return self._route(req, route, cred, rl_headers)
        except CfError as exc:
            if exc.bare:
                body = json.dumps({"success": False, "errors": exc.errors}, separators=(",", ":")).encode()
            else:
                body = _envelope(None, exc.errors)
            return Response(exc.status, body, [JSON_CT, *(exc.headers if exc.headers is not None else rl_headers)])

    # -- auth & rate limit (2.2, 7.1) ----------------------------------------------------------
    def _authenticate(self, req: Request) -> tuple[str | None, Credential | None]:
        h = req.headers
        email, key, auth = h.get("x-auth-email"), h.get("x-auth-key"), h.get("authorization")
        if email is None and key is None and auth is None:
            raise CfError(400, [_err(9106, "Missing X-Auth-Key, X-Auth-Email or Authorization headers")], bare=True)
        if email is not None or key is not None:
            chain = []
            if email is not None and not EMAIL_RE.match(email):
                chain.append(_err(6102, "Invalid format for X-Auth-Email header"))
            if key is None or not LEGACY_KEY_RE.match(key):
                chain.append(_err(6103, "Invalid format for X-Auth-Key header"))
            if chain:
                raise CfError(400, [{**_err(6003, "Invalid request headers"), "error_chain": chain}])
            cred = self.legacy.get((email or "", key or ""))
            if cred is None:
                # UNCONFIRMED status (2.2): 403 is the most likely.
                raise CfError(403, [_err(9103, "Unknown X-Auth-Key or X-Auth-Email")])
            return f"legacy:{email}", cred
        assert auth is not None
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not TOKEN_RE.match(token.strip()):
            chain = [_err(6111, "Invalid format for Authorization header")]
            raise CfError(400, [{**_err(6003, "Invalid request headers"), "error_chain": chain}])
        token = token.strip()
        return "token:" + token, self.tokens.get(token)

    def _spend(self, cred_key: str) -> list[tuple[bytes, bytes]]:
        now = time.monotonic()
        budget = self.budgets.get(cred_key)
        if budget is None or (now >= budget.window_start + self.rate.window and now >= budget.blocked_until):
            budget = self.budgets[cred_key] = Budget(now)
        if now < budget.blocked_until:
            raise self._throttled(budget.blocked_until - now)
        if budget.count >= self.rate.limit:
            # Exceeding the limit blocks every call for a whole window (7.1).
            budget.blocked_until = now + self.rate.window
            raise self._throttled(self.rate.window)
        budget.count += 1
        reset = max(0, math.ceil(budget.window_start + self.rate.window - now))
        return [
            (b"ratelimit", f'"default";r={self.rate.limit - budget.count};t={reset}'.encode()),
            (b"ratelimit-policy", f'"default";q={self.rate.limit};w={int(self.rate.window)}'.encode()),
        ]

    def _throttled(self, wait: float) -> CfError:
        seconds = str(max(1, math.ceil(wait))).encode()
        return CfError(429, [_err(971, "Please wait and consider throttling your request speed")], headers=[
            (b"retry-after", seconds),
            (b"ratelimit", b'"default";r=0;t=' + seconds),
            (b"ratelimit-policy", f'"default";q={self.rate.limit};w={int(self.rate.window)}'.encode()),
        ])

    # -- routes (6) ---------------------------------------------------------------------------
    def _route(self, req: Request, route: str, cred: Credential | None,
               headers: list[tuple[bytes, bytes]]) -> Response:
        rel = req.path[len(self.base_path):] if req.path.startswith(self.base_path) else req.path
        parts = rel.strip("/").split("/")
        if route == "cf.other" or rel.endswith("/"):
            if len(parts) >= 2 and parts[0] == "accounts" and not HEX32.match(parts[1]):
                raise self._no_route(rel)
            raise CfError(404, [_err(7000, "No route for that URI")])
        account_id = parts[1]
        if not HEX32.match(account_id):
            raise self._no_route(rel)
        if cred is None or (cred.accounts is not None and account_id not in cred.accounts):
            raise CfError(403, [AUTH_ERROR])
        tunnels = self.accounts.get(account_id)
        if tunnels is None:
            raise CfError(403, [AUTH_ERROR])  # not an account this credential can see (UNCONFIRMED)
        new_hc = _truthy(req.headers.get("x-magic-new-hc-target"))
        if route == "cf.list":
            result: Any = {"ipsec_tunnels": [t.view(new_hc) for t in tunnels.values()]}
        elif route == "cf.get":
            tunnel = self._tunnel(tunnels, parts[4])
            result = {"ipsec_tunnel": tunnel.view(new_hc)}
        else:
            if not cred.write:
                raise CfError(403, [AUTH_ERROR])
            validate = _truthy(req.query.get("validate_only"))
            if route == "cf.psk_generate":
                result = self._generate(account_id, self._tunnel(tunnels, parts[4]), validate)
            else:
                result = self._psk_set(account_id, tunnels, req, validate)
        return Response(200, _envelope(result, []), [JSON_CT, *headers])

    @staticmethod
    def _no_route(rel: str) -> CfError:
        msg = f"Could not route to {rel}, perhaps your object identifier is invalid?"
        return CfError(400, [_err(7003, msg), _err(7000, "No route for that URI")])

    @staticmethod
    def _tunnel(tunnels: dict[str, Tunnel], tid: str) -> Tunnel:
        tunnel = tunnels.get(tid)
        if tunnel is None:
            # UNCONFIRMED status and message (6.2); code 1032 from a probe of the live API.
            raise CfError(404, [_err(1032, "IPsec tunnel not found")])
        return tunnel

    def _apply(self, account_id: str, tunnel: Tunnel, psk: str, via: str) -> None:
        now = time.time()
        tunnel.psk = psk
        tunnel.last_generated = now
        tunnel.modified = now
        self.history.append(HistoryEntry(now, account_id, tunnel.id, psk, via))

    def _generate(self, account_id: str, tunnel: Tunnel, validate: bool) -> dict[str, Any]:
        psk = "".join(secrets.choice(ALNUM) for _ in range(32))
        if not validate:
            self._apply(account_id, tunnel, psk, "psk_generate")
        stamp = tunnel.last_generated if tunnel.last_generated is not None else time.time()
        return {"ipsec_tunnel_id": tunnel.id, "psk": psk, "psk_metadata": {"last_generated_on": cf_time(stamp)}}

    def _psk_set(self, account_id: str, tunnels: dict[str, Tunnel], req: Request,
                 validate: bool) -> dict[str, Any]:
        try:
            body = json.loads(req.body) if req.body else None
        except ValueError:
            body = None
        items = body.get("psks") if isinstance(body, dict) else None
        if not isinstance(items, list):
            # UNCONFIRMED code and message for body validation failures (7).
            raise CfError(400, [{**_err(1001, "Invalid request body: psks must be an array"),
                                 "source": {"pointer": "/psks"}}])
        applied: dict[str, Any] = {}
        unapplied: dict[str, str] = {}
        seen: set[str] = set()
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not isinstance(item.get("psk"), str):
                raise CfError(400, [{**_err(1001, "Invalid request body: each entry needs id and psk strings"),
                                     "source": {"pointer": f"/psks/{i}"}}])
            tid, psk = item["id"], item["psk"]
            tunnel = tunnels.get(tid)
            refusal = self.refusals.get(tid)
            # Partial-success wording is a simulator choice (UNCONFIRMED, 6.3).
            if tunnel is None:
                unapplied[tid] = "IPsec tunnel not found"
            elif tid in seen:
                unapplied[tid] = "duplicate tunnel id in request"
            elif not psk:
                unapplied[tid] = "psk must not be empty"
            elif refusal is not None and (refusal[0] == "validate" or not validate):
                unapplied[tid] = refusal[1]
            else:
                if not validate:
                    self._apply(account_id, tunnel, psk, "psk_set")
                stamp = tunnel.last_generated if tunnel.last_generated is not None else time.time()
                applied[tid] = {"ipsec_id": tunnel.ipsec_id, "ipsec_tunnel_id": tid, "psk": psk,
                                "psk_metadata": {"last_generated_on": cf_time(stamp)}}
            seen.add(tid)
        return {"successfully_applied_psks": applied, "unapplied_psks": unapplied}


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("true", "1")


def _envelope(result: Any, errors: list[dict[str, Any]]) -> bytes:
    return json.dumps({"success": not errors, "errors": errors, "messages": [], "result": result},
                      separators=(",", ":")).encode()
