"""A Cloudflare API v4 simulator: Magic IPsec tunnels, bulk PSK set, auth, envelope, rate limits.

Faithful to ``docs/specs/cloudflare-magic-ipsec.md`` (section numbers in comments); the
conformance tests in ``tests/sim/test_cloudflare_conformance.py`` drive it with the official
``cloudflare`` SDK. It keeps, per tunnel, the PSK really in force, so tests can check the
invariant against what "Cloudflare" holds. Route names for counting and faults: ``cf.list``,
``cf.get``, ``cf.psk_validate``, ``cf.psk_apply``, ``cf.psk_generate``, ``cf.graphql``, ``cf.other``.

Beyond the shared faults (status, drop, late, trickle, garbage; see ``sim/base.py``), each also a
``/_sim/control`` op: ``refuse_tunnels``, ``contradict`` (a contradictory PSK-set answer),
``add_tunnel`` (with any id, e.g. ``../<other>/<t>``, to test id checks), ``set_endpoints``,
``change_psk_out_of_band`` (drift), ``set_health``/``add_health_sample`` (GraphQL tunnel health),
``set_rate_limit``. ``edge_hook`` sees every key applied for real; ``health_source`` can replace
the health timelines (an IKE lab feeds both from real SAs).
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
    customer_endpoint: str | None = None  # None: a documentation address derived from the index
    cloudflare_endpoint: str = "162.159.66.164"

    def view(self, new_hc_target: bool) -> dict[str, Any]:
        endpoint = self.customer_endpoint or f"203.0.113.{self.index % 250 + 1}"
        target: Any = {"effective": endpoint, "saved": endpoint} if new_hc_target else endpoint
        octet = (self.index * 2) % 256
        out: dict[str, Any] = {
            "id": self.id, "name": self.name, "cloudflare_endpoint": self.cloudflare_endpoint,
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


EdgeHook = Callable[[str, str, str], None]  # (account_id, tunnel_id, psk) when a key is applied for real
# (account_id, tunnel_name, since, until) -> tunnelState samples (0, 0.5, 1) in [since, until)
HealthSource = Callable[[str, str, float, float], list[float]]

CONTRADICTIONS = ("echo_other_key", "both_maps")
HEALTH_DATASET = "magicTransitTunnelHealthChecksAdaptiveGroups"
MAX_HEALTH_WINDOW = 7 * 24 * 3600.0  # at most one week per query (spec 11)


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

    def __init__(self, base_path: str = "/client/v4", rate_limit: RateLimit | None = None,
                 edge_hook: EdgeHook | None = None, health_source: HealthSource | None = None) -> None:
        super().__init__()
        # Called (under the state lock) whenever a tunnel's key changes for real: bulk set without
        # validate_only, psk_generate, or an out-of-band change. An IKE lab loads it into its edge.
        self.edge_hook = edge_hook
        # Where GraphQL tunnel health comes from: the timelines set below unless a source is plugged in.
        self.health_source = health_source
        self.health: dict[str, dict[str, list[tuple[float, float]]]] = {}  # account -> tunnel id -> samples
        self.contradictions: dict[str, tuple[str, str]] = {}  # tunnel -> (stage, kind)
        self.base_path = base_path.rstrip("/")
        self.rate = rate_limit or RateLimit()
        self.accounts: dict[str, dict[str, Tunnel]] = {}
        self.tokens: dict[str, Credential] = {}
        self.legacy: dict[tuple[str, str], Credential] = {}
        self.budgets: dict[str, Budget] = {}
        self.history: list[HistoryEntry] = []
        self.refusals: dict[str, tuple[str, str]] = {}  # tunnel -> (stage, reason)
        self.listed_twice: dict[str, dict[str, str]] = {}  # account -> tunnel -> the second name it is listed under
        self._next_index = 0

    # -- setup & inspection (Python API) -------------------------------------------------------
    def add_account(self, account_id: str | None = None) -> str:
        acc = account_id or new_id()
        with self.lock:
            self.accounts.setdefault(acc, {})
        return acc

    def add_tunnel(self, account_id: str, name: str | None = None, tunnel_id: str | None = None,
                   with_psk: bool = True, customer_endpoint: str | None = None,
                   cloudflare_endpoint: str | None = None) -> str:
        """Add a tunnel. ``tunnel_id`` may be any string, as a hostile or broken API could list
        (``../<other>/<t>``, ``sub/dir``, ``..``): the listing shows it as given."""
        now = time.time()
        with self.lock:
            self._next_index += 1
            idx = self._next_index
            tid = tunnel_id or new_id()
            psk = "".join(secrets.choice(ALNUM) for _ in range(32)) if with_psk else None
            tunnel = Tunnel(tid, name or f"tun{idx:05d}", idx, psk, now, now, now if with_psk else None,
                            f"{100000 + idx}_{secrets.token_hex(16)}", customer_endpoint)
            if cloudflare_endpoint:
                tunnel.cloudflare_endpoint = cloudflare_endpoint
            self.accounts[account_id][tid] = tunnel
        return tid

    def set_endpoints(self, account_id: str, tunnel_id: str, customer_endpoint: str | None = None,
                      cloudflare_endpoint: str | None = None) -> None:
        """Set where a tunnel's ends live (an IKE lab uses its namespace addresses)."""
        with self.lock:
            tunnel = self.accounts[account_id][tunnel_id]
            if customer_endpoint is not None:
                tunnel.customer_endpoint = customer_endpoint
            if cloudflare_endpoint is not None:
                tunnel.cloudflare_endpoint = cloudflare_endpoint

    def set_edge_hook(self, hook: EdgeHook | None) -> None:
        with self.lock:
            self.edge_hook = hook

    def change_psk_out_of_band(self, account_id: str, tunnel_id: str, psk: str | None = None) -> str:
        """Set a tunnel's key as the dashboard, Terraform or ``psk_generate`` would: the key changes,
        ``last_generated_on`` moves on, nothing in Vault knows. Returns the key now in force."""
        with self.lock:
            tunnel = self.accounts[account_id][tunnel_id]
            key = psk or "".join(secrets.choice(ALNUM) for _ in range(32))
            self._apply(account_id, tunnel, key, "out_of_band")
            return key

    def contradict(self, tunnel_ids: list[str], kind: str = "echo_other_key", stage: str = "apply") -> None:
        """Answer the PSK set for these tunnels with a contradiction, until cleared.

        ``echo_other_key``: the tunnel is listed in ``successfully_applied_psks`` with a key other
        than the one sent; ``both_maps``: it is listed as applied and in ``unapplied_psks``. On
        ``apply`` the key sent really is applied (the worst case: unstaging it would lose it); on
        ``validate`` nothing changes, as for any validation.
        """
        if kind not in CONTRADICTIONS:
            raise ValueError(f"kind must be one of {', '.join(CONTRADICTIONS)}")
        self._mark(self.contradictions, tunnel_ids, stage, kind)

    def _mark(self, book: dict[str, tuple[str, str]], tunnel_ids: list[str], stage: str, value: str) -> None:
        if stage not in ("apply", "validate"):
            raise ValueError("stage must be 'apply' or 'validate'")
        with self.lock:
            for tid in tunnel_ids:
                book[tid] = (stage, value)

    def clear_contradictions(self) -> None:
        with self.lock:
            self.contradictions.clear()

    def list_twice(self, account_id: str, tunnel_id: str, name: str | None = None) -> None:
        """A broken listing (issue 20 item 1), until cleared: the tunnel appears a second time, with the
        same id, under ``name`` (default: its own name), at the end of the account's listing."""
        with self.lock:
            tunnel = self.accounts[account_id][tunnel_id]
            self.listed_twice.setdefault(account_id, {})[tunnel_id] = name or tunnel.name

    def clear_listed_twice(self) -> None:
        with self.lock:
            self.listed_twice.clear()

    def set_health(self, account_id: str, tunnel_id: str, samples: list[tuple[float, float]]) -> None:
        """Give a tunnel a health timeline: (UNIX time, tunnelState) samples, 0 down, 0.5 degraded, 1 up."""
        with self.lock:
            if tunnel_id not in self.accounts[account_id]:
                raise KeyError(f"no tunnel {tunnel_id} in account {account_id}")
            for _, state in samples:
                if state not in (0, 0.5, 1):
                    raise ValueError("tunnelState is 0, 0.5 or 1")
            self.health.setdefault(account_id, {})[tunnel_id] = sorted((float(t), float(v)) for t, v in samples)

    def add_health_sample(self, account_id: str, tunnel_id: str, state: float, at: float | None = None) -> None:
        with self.lock:
            timeline = self.health.setdefault(account_id, {}).setdefault(tunnel_id, [])
            timeline.append((time.time() if at is None else at, float(state)))
            timeline.sort()

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
        self._mark(self.refusals, tunnel_ids, stage, reason)

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
                                        "last_generated_on": t.last_generated and cf_time(t.last_generated),
                                        "customer_endpoint": t.view(False)["customer_endpoint"],
                                        "cloudflare_endpoint": t.cloudflare_endpoint}
                                 for t in ts.values()} for a, ts in self.accounts.items()},
                "history": [dataclasses.asdict(h) for h in self.history],
            }

    def control(self, op: str, args: dict[str, Any]) -> Any:
        own: dict[str, Callable[..., Any]] = {
            "refuse_tunnels": self.refuse_tunnels, "clear_refusals": self.clear_refusals,
            "set_rate_limit": self.set_rate_limit, "psk_of": self.psk_of,
            "add_tunnel": self.add_tunnel, "set_endpoints": self.set_endpoints,
            "change_psk_out_of_band": self.change_psk_out_of_band, "contradict": self.contradict,
            "clear_contradictions": self.clear_contradictions, "set_health": self.set_health,
            "list_twice": self.list_twice, "clear_listed_twice": self.clear_listed_twice,
            "add_health_sample": self.add_health_sample,
        }
        if op in own:
            return own[op](**args)
        return self._shared_control(op, args)

    # -- HTTP ---------------------------------------------------------------------------------
    def route_of(self, req: Request) -> str:
        path = req.path
        if path == self.base_path + "/graphql":
            return "cf.graphql" if req.method == "POST" else "cf.other"
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
        if fault.message is not None:
            error["message"] = fault.message
        return Response(fault.status, _envelope(None, [error]), [JSON_CT, *headers])

    def garbage_response(self, fault: Fault, route: str) -> Response:
        if fault.variant != "types":
            return super().garbage_response(fault, route)
        if route == "cf.list":
            result: Any = {"ipsec_tunnels": {"id": 7, "name": ["not", "a", "list"]}}
        elif route in ("cf.psk_validate", "cf.psk_apply"):
            result = {"successfully_applied_psks": ["not", "an", "object"], "unapplied_psks": 42}
        elif route == "cf.graphql":
            body = json.dumps({"data": {"viewer": {"accounts": {"not": "a list"}}}, "errors": None})
            return Response(200, body.encode(), [JSON_CT])
        else:
            result = "not an object"
        return Response(200, _envelope(result, []), [JSON_CT])

    def handle(self, req: Request, route: str) -> Response:
        rl_headers: list[tuple[bytes, bytes]] = []
        try:
            cred_key, cred = self._authenticate(req)
            if route == "cf.graphql":
                return self._graphql(req, cred)
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
            listed = [t.view(new_hc) for t in tunnels.values()]
            for tid, name in self.listed_twice.get(account_id, {}).items():
                if tid in tunnels:
                    listed.append({**tunnels[tid].view(new_hc), "name": name})
            result: Any = {"ipsec_tunnels": listed}
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
        if self.edge_hook is not None:
            self.edge_hook(account_id, tunnel.id, psk)

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
                contradiction = self.contradictions.get(tid)
                if contradiction is not None and contradiction[0] == ("validate" if validate else "apply"):
                    if contradiction[1] == "echo_other_key":
                        applied[tid]["psk"] = "".join(secrets.choice(ALNUM) for _ in range(32))
                    else:
                        unapplied[tid] = "tunnel is being modified"
            seen.add(tid)
        return {"successfully_applied_psks": applied, "unapplied_psks": unapplied}


    # -- GraphQL tunnel health (spec 11) -------------------------------------------------------
    def _graphql(self, req: Request, cred: Credential | None) -> Response:
        """The ``magicTransitTunnelHealthChecksAdaptiveGroups`` subset, variables form only:
        ``accounts(filter: {accountTag: $accountTag})`` and the dataset's ``filter: $filter`` with
        ``datetime_geq``, ``datetime_lt`` and optionally ``tunnelName_in``. Answers 200 with
        ``errors`` for a bad query, as GraphQL does."""
        try:
            body = json.loads(req.body)
        except ValueError:
            return _gql_error("failed to parse the request body as JSON")
        query = body.get("query") if isinstance(body, dict) else None
        variables = body.get("variables") if isinstance(body, dict) else None
        if not isinstance(query, str) or HEALTH_DATASET not in query or not isinstance(variables, dict):
            return _gql_error(f"the simulator answers only {HEALTH_DATASET} queries with variables")
        account_id, window = variables.get("accountTag"), variables.get("filter")
        if not isinstance(account_id, str) or not isinstance(window, dict):
            return _gql_error("accountTag and filter are required")
        if cred is None or account_id not in self.accounts or (
                cred.accounts is not None and account_id not in cred.accounts):
            return _gql_error("not authorized for that account", code="authz")
        try:
            since = _parse_time(window["datetime_geq"])
            until = _parse_time(window["datetime_lt"])
        except (KeyError, TypeError, ValueError):
            return _gql_error("filter needs datetime_geq and datetime_lt as RFC 3339 times")
        if not 0 <= until - since <= MAX_HEALTH_WINDOW:
            return _gql_error("the time range must be at most one week and not negative")
        names = window.get("tunnelName_in")
        wanted = set(names) if isinstance(names, list) else None
        groups = []
        for tunnel in self.accounts[account_id].values():
            if wanted is not None and tunnel.name not in wanted:
                continue
            if self.health_source is not None:
                samples = list(self.health_source(account_id, tunnel.name, since, until))
            else:
                timeline = self.health.get(account_id, {}).get(tunnel.id, [])
                samples = [v for t, v in timeline if since <= t < until]
            if samples:
                dims: dict[str, Any] = {"tunnelName": tunnel.name}
                if "edgeColoName" in query:
                    dims["edgeColoName"] = "sim"
                groups.append({"avg": {"tunnelState": sum(samples) / len(samples)}, "dimensions": dims})
        data = {"viewer": {"accounts": [{HEALTH_DATASET: groups}]}}
        return Response(200, json.dumps({"data": data, "errors": None}).encode(), [JSON_CT])


def _gql_error(message: str, code: str = "bad_request") -> Response:
    body = {"data": None, "errors": [{"message": message, "path": None, "extensions": {"code": code}}]}
    return Response(200, json.dumps(body).encode(), [JSON_CT])


def _parse_time(value: Any) -> float:
    if not isinstance(value, str):
        raise TypeError("time must be a string")
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("true", "1")


def _envelope(result: Any, errors: list[dict[str, Any]]) -> bytes:
    return json.dumps({"success": not errors, "errors": errors, "messages": [], "result": result},
                      separators=(",", ":")).encode()
