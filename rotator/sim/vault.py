"""A HashiCorp Vault simulator: KV v2, token/AppRole/Kubernetes auth and sys endpoints.

Faithful to ``docs/specs/vault-kv2.md`` (section numbers in comments); the conformance tests in
``tests/sim/test_vault_conformance.py`` drive it through hvac. Route names used for counting and
fault injection: ``kv.read``, ``kv.write``, ``kv.patch``, ``kv.delete``, ``kv.delete_versions``,
``kv.undelete``, ``kv.destroy``, ``kv.metadata.read``, ``kv.metadata.write``,
``kv.metadata.patch``, ``kv.metadata.delete``, ``kv.list``, ``kv.config``, ``kv.subkeys``,
``kv.invalid``, ``sys.health``, ``sys.seal_status``, ``sys.init``, ``sys.mounts``,
``sys.ui_mounts``, ``auth.lookup_self``, ``auth.renew_self``, ``auth.approle.login``,
``auth.kubernetes.login``, ``other``.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rotator.sim.base import Fault, Request, Response, SimApp

JSON_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]

PERMISSION_DENIED = "1 error occurred:\n\t* permission denied\n\n"
INVALID_TOKEN = "2 errors occurred:\n\t* permission denied\n\t* invalid token\n\n"
CAS_MISMATCH = "check-and-set parameter did not match the current version"
CAS_REQUIRED = "check-and-set parameter required for this call"
CAS_PARSE = "error parsing check-and-set parameter"
CAS_WARNING = (
    '"cas_required" set to false, but is mandated by backend config. This value will be ignored.'
)
INVALID_PATH_WARNING = (
    "Invalid path for a versioned K/V secrets engine. See the API docs for the appropriate API "
    "endpoints to use. If using the Vault CLI, use 'vault kv {verb}' for this operation."
)
ROOT_OP_WARNING = "Non-listing operations on the root of a K/V v2 mount are not supported."
GO_BOOL = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
           "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}
KV_OPS = ("data", "metadata", "delete", "undelete", "destroy", "subkeys", "config")
STATUS_PATHS = ("sys/health", "sys/seal-status", "sys/init", "sys/leader")


# -- encoding helpers ---------------------------------------------------------------------------

def go_json(obj: Any) -> str:
    """Compact JSON as Go's encoder writes it: map keys sorted, <>& escaped."""
    text = json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def rfc3339nano(ns: int) -> str:
    """Go time.RFC3339Nano in UTC: up to 9 fractional digits, trailing zeros trimmed (2.1)."""
    seconds, frac = divmod(ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if frac:
        return f"{base}.{frac:09d}".rstrip("0") + "Z"
    return base + "Z"


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def parse_duration(value: Any) -> float:
    """A Go duration string (``1h30m``) or integer seconds, as Vault accepts for TTL fields."""
    if isinstance(value, bool):
        raise ValueError("duration must be a string or a number")
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    if re.fullmatch(r"-?\d+", text):
        return float(text)
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    if body == "0":
        return 0.0
    parts = _DURATION_RE.findall(body)
    if not parts or "".join(n + u for n, u in parts) != body:
        raise ValueError(f"invalid duration {value!r}")
    return sign * sum(float(n) * _UNITS[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    """Go's Duration.String() for whole and fractional seconds (``0s``, ``30m0s``, ``1h0m0s``)."""
    if seconds == 0:
        return "0s"
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    sec_text = f"{secs:.9f}".rstrip("0").rstrip(".") if secs != int(secs) else str(int(secs))
    if hours:
        return f"{sign}{int(hours)}h{int(minutes)}m{sec_text}s"
    if minutes:
        return f"{sign}{int(minutes)}m{sec_text}s"
    return f"{sign}{sec_text}s"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# -- state --------------------------------------------------------------------------------------

@dataclass(slots=True)
class Version:
    created_ns: int
    deletion_ns: int | None = None
    destroyed: bool = False

    def deleted(self, now_ns: int) -> bool:
        return self.deletion_ns is not None and self.deletion_ns <= now_ns

    def meta(self, custom: dict[str, str] | None, number: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "created_time": rfc3339nano(self.created_ns),
            "deletion_time": rfc3339nano(self.deletion_ns) if self.deletion_ns is not None else "",
            "destroyed": self.destroyed,
        }
        if number is not None:
            out["custom_metadata"] = custom
            out["version"] = number
        return out


@dataclass(slots=True)
class Key:
    created_ns: int
    updated_ns: int
    current_version: int = 0
    oldest_version: int = 0
    max_versions: int = 0
    cas_required: bool = False
    delete_version_after: float = 0.0
    custom_metadata: dict[str, str] | None = None
    versions: dict[int, Version] = field(default_factory=dict)
    data: dict[int, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Mount:
    path: str
    kv_version: str = "2"
    max_versions: int = 0
    cas_required: bool = False
    delete_version_after: float = 0.0
    keys: dict[str, Key] = field(default_factory=dict)
    accessor: str = field(default_factory=lambda: "kv_" + secrets.token_hex(4))
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass(slots=True)
class Token:
    id: str
    policies: list[str]
    ttl: int = 0
    max_ttl: int = 0
    renewable: bool = True
    root: bool = False
    created: float = field(default_factory=time.time)
    expires: float | None = None
    display_name: str = "token"
    path: str = "auth/token/create"
    meta: dict[str, str] | None = None
    accessor: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    entity_id: str = field(default_factory=lambda: str(uuid.uuid4()))


class VaultError(Exception):
    def __init__(self, status: int, errors: list[str]) -> None:
        super().__init__(status, errors)
        self.status = status
        self.errors = errors


def new_token_id() -> str:
    return "hvs." + secrets.token_urlsafe(18)


# Policies: name -> list of (path pattern, capabilities). A pattern ending in * is a prefix.
DEFAULT_POLICIES: dict[str, list[tuple[str, set[str]]]] = {
    "none": [],
    "readonly": [("secret/data/*", {"read"}), ("secret/metadata/*", {"read", "list"})],
    "rotator": [
        ("secret/data/cloudflare/magic-ipsec/*", {"create", "read", "update"}),
        ("secret/metadata/cloudflare/magic-ipsec/*", {"read", "list"}),
    ],
}


class VaultSim(SimApp):
    """The Vault server. Python methods below double as the fault and inspection API."""

    http_parser = "h11"  # hvac's list_secrets sends the LIST verb, which llhttp rejects

    def __init__(self, root_token: str | None = None) -> None:
        super().__init__()
        self.root_token = root_token or new_token_id()
        self.tokens: dict[str, Token] = {}
        self.policies = copy.deepcopy(DEFAULT_POLICIES)
        self.namespaces: dict[str, dict[str, Mount]] = {}
        self.sealed = False
        self.initialized = True
        self.mode = "active"  # active | standby | perfstandby | drsecondary
        self.refuse_writes_status: int | None = None
        self.approle: dict[str, dict[str, Any]] = {}
        self.k8s_roles: dict[str, dict[str, Any]] = {}
        self.k8s_jwts: dict[str, dict[str, str]] = {}
        self.default_token_ttl = 3600
        # The clock of KV versions (created_time, deletion_time): tests that run rotations on a virtual
        # clock set it to the same clock, so Vault's history and the records' times agree.
        self.kv_clock: Callable[[], float] | None = None
        self.tokens[self.root_token] = Token(
            self.root_token, ["root"], root=True, renewable=False, display_name="root",
            path="auth/token/root",
        )
        self.add_mount("secret")

    def kv_now_ns(self) -> int:
        return time.time_ns() if self.kv_clock is None else int(self.kv_clock() * 1e9)

    # -- setup & inspection (Python API) -------------------------------------------------------
    def add_mount(self, path: str, kv_version: str = "2", namespace: str = "") -> None:
        with self.lock:
            self.namespaces.setdefault(namespace, {})[path.strip("/")] = Mount(path.strip("/"), kv_version)

    def create_token(
        self, policies: list[str], ttl: int = 0, renewable: bool = True, max_ttl: int = 0,
        token_id: str | None = None, display_name: str = "token", path: str = "auth/token/create",
        meta: dict[str, str] | None = None,
    ) -> str:
        tid = token_id or new_token_id()
        with self.lock:
            self.tokens[tid] = Token(
                tid, sorted(policies), ttl=ttl, max_ttl=max_ttl, renewable=renewable,
                expires=time.time() + ttl if ttl else None, display_name=display_name, path=path,
                meta=meta,
            )
        return tid

    def revoke_token(self, token: str) -> None:
        with self.lock:
            self.tokens.pop(token, None)

    def add_approle(self, role_name: str, policies: list[str], ttl: int = 3600) -> tuple[str, str]:
        role_id, secret_id = str(uuid.uuid4()), str(uuid.uuid4())
        with self.lock:
            self.approle[role_id] = {"name": role_name, "secret_ids": {secret_id}, "policies": policies,
                                     "ttl": ttl}
        return role_id, secret_id

    def add_kubernetes_role(
        self, role: str, policies: list[str], service_account: str = "psk-rotator",
        namespace: str = "default", ttl: int = 3600,
    ) -> str:
        """Register a role and return a JWT the simulated TokenReview accepts for it."""
        jwt = "eyJhbGciOiJSUzI1NiJ9." + secrets.token_urlsafe(24) + "." + secrets.token_urlsafe(16)
        with self.lock:
            self.k8s_roles[role] = {"policies": policies, "ttl": ttl, "sa": service_account, "ns": namespace}
            self.k8s_jwts[jwt] = {"sa": service_account, "ns": namespace, "uid": str(uuid.uuid4())}
        return jwt

    def seal(self) -> None:
        with self.lock:
            self.sealed = True

    def unseal(self) -> None:
        with self.lock:
            self.sealed = False

    def echo_token_next(self, route: str = "*", status: int = 403, count: int = 1) -> None:
        """Answer the next request(s) with an error that quotes the request's token, as a proxy or an
        audit plugin that echoes the request does (nothing takes effect)."""
        with self.lock:
            self.faults.arm(Fault(route, "status", count, status=status, echo_header="x-vault-token",
                                  message='permission denied for request with X-Vault-Token "{echo}"'))

    def refuse_writes(self, status: int | None = 403) -> None:
        """Refuse every KV data write (403 permission denied by default); None lifts it."""
        with self.lock:
            self.refuse_writes_status = status

    def read_data(self, path: str, mount: str = "secret", namespace: str = "") -> dict[str, Any] | None:
        """The latest live version's data at ``path`` (for tests), or None."""
        with self.lock:
            key = self.namespaces.get(namespace, {}).get(mount, Mount(mount)).keys.get(path)
            if key is None or key.current_version == 0:
                return None
            ver = key.versions.get(key.current_version)
            if ver is None or ver.destroyed or ver.deleted(self.kv_now_ns()):
                return None
            return copy.deepcopy(key.data.get(key.current_version))

    def latest_under(self, prefix: str, mount: str = "secret", namespace: str = "") -> dict[str, dict[str, Any]]:
        """Every live latest version's data under ``prefix``, read under one lock (an invariant
        monitor's consistent view of Vault)."""
        with self.lock:
            out = {}
            for path in self.keys_under(prefix, mount, namespace):
                data = self.read_data(path, mount, namespace)
                if data is not None:
                    out[path] = data
            return out

    def keys_under(self, prefix: str, mount: str = "secret", namespace: str = "") -> list[str]:
        with self.lock:
            mnt = self.namespaces.get(namespace, {}).get(mount)
            return sorted(k for k in (mnt.keys if mnt else {}) if k.startswith(prefix))

    def version_of(self, path: str, mount: str = "secret", namespace: str = "") -> int:
        with self.lock:
            mnt = self.namespaces.get(namespace, {}).get(mount)
            key = mnt.keys.get(path) if mnt else None
            return key.current_version if key else 0

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "sealed": self.sealed,
                "request_counts": dict(self.counts),
                "mounts": {ns or "root": {m: len(mnt.keys) for m, mnt in mounts.items()}
                           for ns, mounts in self.namespaces.items()},
            }

    def control(self, op: str, args: dict[str, Any]) -> Any:
        own: dict[str, Callable[..., Any]] = {
            "seal": self.seal, "unseal": self.unseal, "refuse_writes": self.refuse_writes,
            "echo_token_next": self.echo_token_next,
            "version_of": self.version_of, "read_data": self.read_data, "latest_under": self.latest_under,
        }
        if op in own:
            return own[op](**args)
        return self._shared_control(op, args)

    # -- HTTP ---------------------------------------------------------------------------------
    def fault_response(self, fault: Fault) -> Response:
        if fault.html:
            return Response(fault.status, b"<html><body><h1>Bad Gateway</h1></body></html>",
                            [(b"content-type", b"text/html")])
        messages = {
            403: [PERMISSION_DENIED], 429: ['request path "sim": rate limit quota exceeded'],
            503: ["Vault is sealed"] if self.sealed else ["service unavailable"],
        }
        headers = list(JSON_HEADERS)
        if fault.retry_after is not None:
            headers.append((b"retry-after", str(fault.retry_after).encode()))
        errors = [fault.message] if fault.message is not None else messages.get(fault.status, ["internal error"])
        body = go_json({"errors": errors}) + "\n"
        return Response(fault.status, body.encode(), headers)

    def garbage_response(self, fault: Fault, route: str) -> Response:
        if fault.variant != "types":
            return super().garbage_response(fault, route)
        if route == "kv.read":
            data: Any = {"data": ["not", "an", "object"], "metadata": {"version": "seven", "destroyed": "no"}}
        elif route == "kv.write":
            data = {"version": "eight", "created_time": 0}
        else:
            data = ["not", "an", "object"]
        return Response(200, (go_json({**self._envelope_dict(None), "data": data}) + "\n").encode(),
                        list(JSON_HEADERS))

    def route_of(self, req: Request) -> str:
        path = req.path[4:] if req.path.startswith("/v1/") else req.path
        if path.startswith("sys/"):
            for name, prefix in (("sys.health", "sys/health"), ("sys.seal_status", "sys/seal-status"),
                                 ("sys.init", "sys/init"), ("sys.ui_mounts", "sys/internal/ui/mounts"),
                                 ("sys.mounts", "sys/mounts")):
                if path.startswith(prefix):
                    return name
            return "other"
        if path.startswith("auth/"):
            for name, prefix in (("auth.lookup_self", "auth/token/lookup-self"),
                                 ("auth.renew_self", "auth/token/renew-self"),
                                 ("auth.approle.login", "auth/approle/login"),
                                 ("auth.kubernetes.login", "auth/kubernetes/login")):
                if path == prefix:
                    return name
            return "other"
        parts = path.split("/", 2)
        op = parts[1] if len(parts) > 1 else ""
        method = req.method
        if op == "data":
            return {"GET": "kv.read", "PATCH": "kv.patch", "DELETE": "kv.delete"}.get(method, "kv.write")
        if op == "metadata":
            if method == "LIST" or (method == "GET" and "list" in req.query):
                return "kv.list"
            return {"GET": "kv.metadata.read", "PATCH": "kv.metadata.patch",
                    "DELETE": "kv.metadata.delete"}.get(method, "kv.metadata.write")
        return {"delete": "kv.delete_versions", "undelete": "kv.undelete", "destroy": "kv.destroy",
                "config": "kv.config", "subkeys": "kv.subkeys"}.get(op, "kv.invalid")

    def handle(self, req: Request, route: str) -> Response:
        try:
            return self._dispatch(req)
        except VaultError as exc:
            body = go_json({"errors": exc.errors}) + "\n"
            return Response(exc.status, body.encode(), list(JSON_HEADERS))

    # -- dispatch -----------------------------------------------------------------------------
    def _dispatch(self, req: Request) -> Response:
        method = req.method
        if method not in ("GET", "HEAD", "LIST", "POST", "PUT", "PATCH", "DELETE"):
            raise VaultError(405, [])
        if not req.path.startswith("/v1/"):
            raise VaultError(404, [])
        path = req.path[4:]
        if method in ("POST", "PUT", "PATCH") and path.endswith("/"):
            raise VaultError(400, ["cannot write to a path ending in '/'"])
        if "list" in req.query and method == "GET":
            flag = GO_BOOL.get(req.query["list"])
            if flag is None:
                raise VaultError(400, [])
            if flag:
                method = "LIST"
        if path == "sys/health":
            return self._health(req)
        if path in STATUS_PATHS:
            return self._status_path(path)
        if self.sealed:
            raise VaultError(503, ["Vault is sealed"])
        body = self._parse_body(req)
        if path in ("auth/approle/login", "auth/kubernetes/login"):
            return self._login(path, body)
        namespace = req.headers.get("x-vault-namespace", "").strip("/")
        token = self._authenticate(req)
        if path == "auth/token/lookup-self":
            return self._lookup_self(token)
        if path == "auth/token/renew-self":
            return self._renew_self(token, body)
        if path == "sys/mounts":
            self._authorize(token, "sys/mounts", "read")
            return self._mounts(namespace)
        if path.startswith("sys/internal/ui/mounts/"):
            return self._ui_mount(token, namespace, path[len("sys/internal/ui/mounts/"):])
        mounts = self.namespaces.get(namespace, {})
        mount_name, _, rest = path.partition("/")
        mount = mounts.get(mount_name)
        if mount is None:
            if not token.root:
                raise VaultError(403, [PERMISSION_DENIED])
            raise VaultError(404, [f'no handler for route "{path}". route entry not found.'])
        if mount.kv_version != "2":
            raise VaultError(404, [])
        return self._kv(token, mount, method, rest, req, body)

    @staticmethod
    def _parse_body(req: Request) -> dict[str, Any]:
        if req.method not in ("POST", "PUT", "PATCH") or not req.body.strip():
            return {}
        try:
            body = json.loads(req.body)
        except ValueError:
            raise VaultError(400, ["error parsing JSON"]) from None
        return body if isinstance(body, dict) else {}

    def _authenticate(self, req: Request) -> Token:
        tid = req.headers.get("x-vault-token")
        if not tid:
            auth = req.headers.get("authorization", "")
            tid = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not tid:
            # UNCONFIRMED (spec 5.1): modern Vault most likely sends the bare message for no token.
            raise VaultError(403, ["permission denied"])
        token = self.tokens.get(tid)
        if token is None or (token.expires is not None and token.expires <= time.time()):
            raise VaultError(403, [INVALID_TOKEN])
        return token

    def _capabilities(self, token: Token, path: str) -> set[str]:
        if token.root:
            return {"create", "read", "update", "patch", "delete", "list", "sudo"}
        caps: set[str] = set()
        for name in token.policies:
            for pattern, granted in self.policies.get(name, []):
                if (pattern.endswith("*") and path.startswith(pattern[:-1])) or pattern == path:
                    caps |= granted
        return caps

    def _authorize(self, token: Token, path: str, *needed: str) -> None:
        if not self._capabilities(token, path) & set(needed):
            raise VaultError(403, [PERMISSION_DENIED])

    # -- sys ----------------------------------------------------------------------------------
    def _health(self, req: Request) -> Response:
        q = req.query
        head = req.method == "HEAD"

        def code(name: str, default: int) -> int:
            if name not in q:
                return default
            try:
                return int(q[name])
            except ValueError:
                raise VaultError(400, []) from None

        try:
            for flag in ("standbyok", "perfstandbyok"):
                if flag in q and q[flag] not in GO_BOOL:
                    raise VaultError(400, [])
            standby_default = 200 if GO_BOOL.get(q.get("standbyok", "false")) else 429
            perf_default = 200 if GO_BOOL.get(q.get("perfstandbyok", "false")) else 473
            if not self.initialized:
                status = code("uninitcode", 501)
            elif self.sealed:
                status = code("sealedcode", 503)
            elif self.mode == "drsecondary":
                status = code("drsecondarycode", 472)
            elif self.mode == "perfstandby":
                status = code("performancestandbycode", perf_default)
            elif self.mode == "standby":
                status = code("standbycode", standby_default)
            else:
                status = code("activecode", 200)
        except VaultError:
            if head:
                return Response(400, b"", list(JSON_HEADERS))
            raise
        if head:
            return Response(status, b"", list(JSON_HEADERS))
        payload: dict[str, Any] = {
            "initialized": self.initialized, "sealed": self.sealed or not self.initialized,
            "standby": self.sealed or self.mode != "active",
            "performance_standby": self.mode == "perfstandby",
            "replication_performance_mode": "unknown" if self.sealed else "disabled",
            "replication_dr_mode": "unknown" if self.sealed else "disabled",
            "server_time_utc": int(time.time()), "version": "1.17.3", "enterprise": False,
            "echo_duration_ms": 0, "clock_skew_ms": 0, "replication_primary_canary_age_ms": 0,
        }
        if not self.sealed:
            payload["cluster_name"] = "vault-cluster-sim"
            payload["cluster_id"] = "00000000-0000-4000-8000-000000000000"
        return Response(status, (json.dumps(payload, separators=(",", ":")) + "\n").encode(),
                        list(JSON_HEADERS))

    def _status_path(self, path: str) -> Response:
        if path == "sys/seal-status":
            payload: dict[str, Any] = {
                "type": "shamir", "initialized": self.initialized, "sealed": self.sealed, "t": 1, "n": 1,
                "progress": 0, "nonce": "", "version": "1.17.3", "build_date": "2024-08-28T00:00:00Z",
                "migration": False, "recovery_seal": False, "storage_type": "raft",
            }
        elif path == "sys/init":
            payload = {"initialized": self.initialized}
        else:
            payload = {"ha_enabled": False, "is_self": True, "leader_address": "", "active_time": ""}
        return Response(200, (json.dumps(payload, separators=(",", ":")) + "\n").encode(),
                        list(JSON_HEADERS))

    def _mount_entry(self, mount: Mount) -> dict[str, Any]:
        return {
            "accessor": mount.accessor,
            "config": {"default_lease_ttl": 0, "force_no_cache": False, "max_lease_ttl": 0},
            "description": "key/value secret storage", "external_entropy_access": False,
            "local": False, "options": {"version": mount.kv_version}, "seal_wrap": False,
            "type": "kv", "uuid": mount.uuid,
        }

    def _mounts(self, namespace: str) -> Response:
        entries = {m + "/": self._mount_entry(mnt) for m, mnt in self.namespaces.get(namespace, {}).items()}
        # sys/mounts puts every entry both under data and at the top level (6.4).
        body = {**entries, **self._envelope_dict(entries, mount_type="system")}
        return Response(200, (go_json(body) + "\n").encode(), list(JSON_HEADERS))

    def _ui_mount(self, token: Token, namespace: str, path: str) -> Response:
        """The preflight the Vault CLI makes (6.4); needs any capability under the mount."""
        mount_name = path.strip("/").split("/", 1)[0]
        mount = self.namespaces.get(namespace, {}).get(mount_name)
        if mount is None:
            # UNCONFIRMED: status for a path under no mount; 404 is what Vault's router answers.
            raise VaultError(404, [])
        if not token.root and not any(
            p.startswith(mount_name + "/") for name in token.policies for p, _ in self.policies.get(name, [])
        ):
            raise VaultError(403, [PERMISSION_DENIED])
        entry = {**self._mount_entry(mount), "path": mount_name + "/"}
        return self._ok(entry, mount_type="system")

    # -- auth ---------------------------------------------------------------------------------
    def _auth_block(self, token: Token, metadata: dict[str, str] | None) -> dict[str, Any]:
        return {
            "client_token": token.id, "accessor": token.accessor, "policies": token.policies,
            "token_policies": token.policies, "metadata": metadata, "lease_duration": token.ttl,
            "renewable": token.renewable, "entity_id": token.entity_id, "token_type": "service",
            "orphan": True, "mfa_requirement": None, "num_uses": 0,
        }

    def _login(self, path: str, body: dict[str, Any]) -> Response:
        if path == "auth/approle/login":
            role_id = str(body.get("role_id") or "").strip()
            if not role_id:
                raise VaultError(400, ["missing role_id"])
            role = self.approle.get(role_id)
            secret_id = body.get("secret_id")
            if role is not None and not secret_id:
                raise VaultError(400, ["missing secret_id"])
            if role is None or secret_id not in role["secret_ids"]:
                raise VaultError(400, ["invalid role or secret ID"])
            tid = self.create_token(["default", *role["policies"]], ttl=role["ttl"],
                                    display_name="approle", path="auth/approle/login",
                                    meta={"role_name": role["name"]})
            token = self.tokens[tid]
            return self._ok(None, auth=self._auth_block(token, {"role_name": role["name"]}), mount_type="")
        role_name = body.get("role")
        if not role_name:
            raise VaultError(400, ["missing role"])
        if not body.get("jwt"):
            raise VaultError(400, ["missing jwt"])
        role = self.k8s_roles.get(role_name)
        if role is None:
            raise VaultError(400, [f'invalid role name "{role_name}"'])
        claims = self.k8s_jwts.get(body["jwt"])
        if claims is None:
            raise VaultError(403, ["permission denied"])
        if claims["sa"] != role["sa"]:
            raise VaultError(403, ["service account name not authorized"])
        if claims["ns"] != role["ns"]:
            raise VaultError(403, ["namespace not authorized"])
        meta = {"role": role_name, "service_account_name": claims["sa"],
                "service_account_namespace": claims["ns"],
                "service_account_secret_name": "", "service_account_uid": claims["uid"]}
        tid = self.create_token(["default", *role["policies"]], ttl=role["ttl"],
                                display_name="kubernetes-" + claims["ns"] + "-" + claims["sa"],
                                path="auth/kubernetes/login", meta=meta)
        return self._ok(None, auth=self._auth_block(self.tokens[tid], meta), mount_type="")

    def _lookup_self(self, token: Token) -> Response:
        now = time.time()
        data: dict[str, Any] = {
            "accessor": token.accessor, "creation_time": int(token.created), "creation_ttl": token.ttl,
            "display_name": token.display_name, "entity_id": "" if token.root else token.entity_id,
            "expire_time": None if token.expires is None else rfc3339nano(int(token.expires * 1e9)),
            "explicit_max_ttl": 0, "id": token.id, "meta": token.meta, "num_uses": 0, "orphan": True,
            "path": token.path, "policies": token.policies,
            "ttl": 0 if token.expires is None else max(0, int(token.expires - now)), "type": "service",
        }
        if not token.root:
            data["renewable"] = token.renewable
            data["issue_time"] = rfc3339nano(int(token.created * 1e9))
        return self._ok(data, mount_type="token")

    def _renew_self(self, token: Token, body: dict[str, Any]) -> Response:
        if token.root or not token.renewable or token.expires is None:
            raise VaultError(400, ["lease is not renewable"])
        increment = body.get("increment")
        ttl = int(parse_duration(increment)) if increment else self.default_token_ttl
        if token.max_ttl:
            ttl = min(ttl, int(token.created + token.max_ttl - time.time()))
            if ttl <= 0:
                raise VaultError(400, ["lease expired"])  # UNCONFIRMED wording (5.3)
        token.ttl = ttl
        token.expires = time.time() + ttl
        return self._ok(None, auth=self._auth_block(token, token.meta), mount_type="token")

    # -- envelopes ----------------------------------------------------------------------------
    @staticmethod
    def _envelope_dict(data: Any, mount_type: str = "kv", warnings: list[str] | None = None,
                       auth: Any = None) -> dict[str, Any]:
        return {"request_id": str(uuid.uuid4()), "lease_id": "", "renewable": False, "lease_duration": 0,
                "data": data, "wrap_info": None, "warnings": warnings, "auth": auth,
                "mount_type": mount_type}

    def _ok(self, data: Any, status: int = 200, mount_type: str = "kv", warnings: list[str] | None = None,
            auth: Any = None, raw: bool = False) -> Response:
        """The logical envelope of 1.5 with fields in Vault's order; ``raw`` drops mount_type (4.2)."""
        parts = [
            f'"request_id":"{uuid.uuid4()}"', '"lease_id":""', '"renewable":false', '"lease_duration":0',
            '"data":' + go_json(data), '"wrap_info":null', '"warnings":' + go_json(warnings),
            '"auth":' + go_json(auth),
        ]
        if not raw:
            parts.append(f'"mount_type":"{mount_type}"')
        return Response(status, ("{" + ",".join(parts) + "}\n").encode(), list(JSON_HEADERS))

    @staticmethod
    def _no_content() -> Response:
        return Response(204, b"", list(JSON_HEADERS))

    # -- KV v2 --------------------------------------------------------------------------------
    def _kv(self, token: Token, mount: Mount, method: str, rest: str, req: Request,
            body: dict[str, Any]) -> Response:
        op, _, sub = rest.partition("/")
        acl_path = f"{mount.path}/{rest}".rstrip("/") if method != "LIST" else f"{mount.path}/{rest}"
        if op == "config" and not sub:
            return self._kv_config(token, mount, method, body, acl_path)
        if op == "metadata" and method == "LIST":
            self._authorize(token, acl_path if acl_path.endswith("/") else acl_path + "/", "list")
            return self._kv_list(mount, sub)
        if op not in KV_OPS or op == "config":
            verb = {"POST": "put", "PUT": "put", "PATCH": "patch", "LIST": "list", "DELETE": "delete"}
            return self._ok(None, status=404, warnings=[INVALID_PATH_WARNING.format(verb=verb.get(method, "get"))],
                            raw=True)
        if not sub:
            if op == "metadata":
                raise VaultError(405, [])
            return self._ok(None, status=404, warnings=[ROOT_OP_WARNING], raw=True)
        if sub.endswith("/") and method in ("GET", "DELETE"):
            return self._ok(None, status=404, warnings=[INVALID_PATH_WARNING.format(verb="get")], raw=True)
        key = mount.keys.get(sub)
        if op == "data":
            if method == "GET":
                self._authorize(token, acl_path, "read")
                return self._kv_read(mount, key, req)
            if method in ("POST", "PUT"):
                self._authorize(token, acl_path, "update" if key and key.current_version else "create")
                if self.refuse_writes_status is not None:
                    status = self.refuse_writes_status
                    raise VaultError(status, [PERMISSION_DENIED if status == 403 else "internal error"])
                return self._kv_write(mount, sub, key, body)
            if method == "PATCH":
                self._authorize(token, acl_path, "patch")
                return self._kv_patch(mount, key, req, body)
            if method == "DELETE":
                self._authorize(token, acl_path, "delete")
                return self._kv_delete_latest(key)
        if op == "metadata":
            if method == "GET":
                self._authorize(token, acl_path, "read")
                return self._kv_metadata_read(key)
            if method in ("POST", "PUT", "PATCH"):
                self._authorize(token, acl_path, "patch" if method == "PATCH" else ("update" if key else "create"))
                return self._kv_metadata_write(mount, sub, key, req, body)
            if method == "DELETE":
                self._authorize(token, acl_path, "delete")
                mount.keys.pop(sub, None)
                return self._no_content()
        if op in ("delete", "undelete", "destroy") and method in ("POST", "PUT"):
            self._authorize(token, acl_path, "update")
            return self._kv_versions(mount, op, key, body)
        if op == "subkeys" and method == "GET":
            self._authorize(token, acl_path, "read")
            return self._kv_subkeys(mount, key, req)
        raise VaultError(405, [])

    def _kv_config(self, token: Token, mount: Mount, method: str, body: dict[str, Any],
                   acl_path: str) -> Response:
        if method == "GET":
            self._authorize(token, acl_path, "read")
            return self._ok({"cas_required": mount.cas_required,
                             "delete_version_after": format_duration(mount.delete_version_after),
                             "max_versions": mount.max_versions})
        if method in ("POST", "PUT"):
            self._authorize(token, acl_path, "update", "create")
            if "max_versions" in body:
                mount.max_versions = int(body["max_versions"])
            if "cas_required" in body:
                mount.cas_required = bool(body["cas_required"])
            if "delete_version_after" in body:
                mount.delete_version_after = self._duration_field(body["delete_version_after"])
            return self._no_content()
        raise VaultError(405, [])

    @staticmethod
    def _duration_field(value: Any) -> float:
        try:
            return parse_duration(value)
        except ValueError:
            raise VaultError(400, [f"error converting input {value} for field \"delete_version_after\""]) from None

    def _kv_list(self, mount: Mount, folder: str) -> Response:
        prefix = folder if not folder or folder.endswith("/") else folder + "/"
        children = set()
        for name in mount.keys:
            if name.startswith(prefix):
                head, sep, _ = name[len(prefix):].partition("/")
                children.add(head + "/" if sep else head)
        if not children:
            raise VaultError(404, [])
        return self._ok({"keys": sorted(children)})

    @staticmethod
    def _version_param(req: Request) -> int:
        raw = req.query.get("version", "0") or "0"
        try:
            return int(raw)
        except ValueError:
            raise VaultError(400, [f'error converting input {raw} for field "version"']) from None

    def _kv_read(self, mount: Mount, key: Key | None, req: Request) -> Response:
        number = self._version_param(req)
        if key is None or key.current_version == 0:
            raise VaultError(404, [])
        if number <= 0:
            number = key.current_version
        ver = key.versions.get(number)
        if ver is None:
            raise VaultError(404, [])
        now = self.kv_now_ns()
        meta = ver.meta(key.custom_metadata, number)
        if ver.destroyed or ver.deleted(now):
            return self._ok({"data": None, "metadata": meta}, status=404, raw=True)
        return self._ok({"data": key.data[number], "metadata": meta})

    @staticmethod
    def _cas(body: dict[str, Any]) -> int | None:
        options = body.get("options")
        if not isinstance(options, dict) or "cas" not in options:
            return None
        cas = options["cas"]
        if isinstance(cas, bool) or isinstance(cas, float):
            raise VaultError(400, [CAS_PARSE])
        if isinstance(cas, int):
            return cas
        try:
            return int(str(cas))
        except ValueError:
            raise VaultError(400, [CAS_PARSE]) from None

    def _check_cas(self, mount: Mount, key: Key | None, body: dict[str, Any]) -> None:
        cas = self._cas(body)
        current = key.current_version if key else 0
        if cas is not None:
            if cas != current:
                raise VaultError(400, [CAS_MISMATCH])
        elif mount.cas_required or (key is not None and key.cas_required):
            raise VaultError(400, [CAS_REQUIRED])

    def _new_version(self, mount: Mount, name: str, key: Key | None, data: Any) -> Response:
        now = self.kv_now_ns()
        if key is None:
            key = mount.keys[name] = Key(created_ns=now, updated_ns=now)
        number = key.current_version + 1
        key.current_version = number
        key.updated_ns = now
        ver = Version(created_ns=now)
        after = self._effective_delete_after(mount, key)
        if after:
            ver.deletion_ns = now + int(after * 1e9)
        key.versions[number] = ver
        key.data[number] = data
        limit = max(key.max_versions, mount.max_versions) or 10
        if number - key.oldest_version >= limit:
            for old in range(key.oldest_version, number - limit + 1):
                key.versions.pop(old, None)
                key.data.pop(old, None)
            key.oldest_version = number - limit + 1
        return self._ok(ver.meta(key.custom_metadata, number))

    @staticmethod
    def _effective_delete_after(mount: Mount, key: Key) -> float:
        if mount.delete_version_after < 0:
            return 0.0
        values = [v for v in (mount.delete_version_after, key.delete_version_after) if v > 0]
        return min(values) if values else 0.0

    def _kv_write(self, mount: Mount, name: str, key: Key | None, body: dict[str, Any]) -> Response:
        if "data" not in body:
            raise VaultError(400, ["no data provided"])
        if not isinstance(body["data"], dict):
            raise VaultError(400, ['error converting input for field "data"'])  # UNCONFIRMED text
        self._check_cas(mount, key, body)
        return self._new_version(mount, name, key, body["data"])

    def _kv_patch(self, mount: Mount, key: Key | None, req: Request, body: dict[str, Any]) -> Response:
        ctype = req.headers.get("content-type", "")
        media = ctype.split(";", 1)[0].strip().lower()
        if media != "application/merge-patch+json":
            raise VaultError(415, [f"PATCH requires Content-Type of application/merge-patch+json, provided {media}"])
        if "data" not in body:
            raise VaultError(400, ["no data provided"])
        if key is None:
            return Response(404, b"", list(JSON_HEADERS))
        self._check_cas(mount, key, body)
        ver = key.versions.get(key.current_version)
        if ver is None:
            return Response(404, b"", list(JSON_HEADERS))
        if ver.destroyed or ver.deleted(self.kv_now_ns()):
            return self._ok(ver.meta(key.custom_metadata, key.current_version), status=404, raw=True)
        merged = merge_patch(key.data[key.current_version], body["data"])
        name = next(n for n, k in mount.keys.items() if k is key)
        return self._new_version(mount, name, key, merged)

    def _kv_delete_latest(self, key: Key | None) -> Response:
        now = self.kv_now_ns()
        if key is not None:
            ver = key.versions.get(key.current_version)
            if ver is not None and not ver.destroyed and not ver.deleted(now):
                ver.deletion_ns = now
        return self._no_content()

    def _kv_versions(self, mount: Mount, op: str, key: Key | None, body: dict[str, Any]) -> Response:
        versions = body.get("versions")
        if isinstance(versions, str):
            versions = [int(v) for v in versions.split(",") if v.strip()]
        if not versions:
            raise VaultError(400, ["no version number provided" if op == "destroy" else "No version number provided"])
        if key is None:
            return self._no_content()
        now = self.kv_now_ns()
        for number in versions:
            ver = key.versions.get(int(number))
            if ver is None or ver.destroyed:
                continue
            if op == "delete" and not ver.deleted(now):
                ver.deletion_ns = now
            elif op == "undelete":
                after = self._effective_delete_after(mount, key)
                ver.deletion_ns = now + int(after * 1e9) if after else None
            elif op == "destroy":
                ver.destroyed = True
                key.data.pop(int(number), None)
        return self._no_content()

    def _kv_metadata_read(self, key: Key | None) -> Response:
        if key is None:
            raise VaultError(404, [])
        return self._ok({
            "cas_required": key.cas_required, "created_time": rfc3339nano(key.created_ns),
            "current_version": key.current_version, "custom_metadata": key.custom_metadata,
            "delete_version_after": format_duration(key.delete_version_after),
            "max_versions": key.max_versions, "oldest_version": key.oldest_version,
            "updated_time": rfc3339nano(key.updated_ns),
            "versions": {str(n): v.meta(None) for n, v in sorted(key.versions.items())},
        })

    @staticmethod
    def _validate_custom(custom: Any) -> dict[str, str]:
        if not isinstance(custom, dict):
            raise VaultError(400, ['error converting input for field "custom_metadata"'])
        values = {str(k): "" if v is None else str(v) for k, v in custom.items()}
        if len(values) > 64:
            raise VaultError(400, ["1 error occurred:\n\t* custom_metadata validation failed: payload must "
                                   f"contain at most 64 keys, provided {len(values)}\n\n"])
        problems = []
        for k, v in values.items():
            kq = json.dumps(k)
            if not 0 < len(k.encode()) <= 128:
                problems.append(f"custom_metadata validation failed: length of key {kq} is "
                                f"{len(k.encode())} but must be 0 < len(key) <= 128")
            if not 0 < len(v.encode()) <= 512:
                problems.append(f"custom_metadata validation failed: length of value for key {kq} is "
                                f"{len(v.encode())} but must be 0 < len(value) <= 512")
            if not k.isprintable():
                problems.append(f"custom_metadata validation failed: key {kq} ({kq}) contains unprintable characters")
            if not v.isprintable():
                problems.append(f"custom_metadata validation failed: value for key {kq} contains unprintable characters")
        if problems:
            noun = "error" if len(problems) == 1 else "errors"
            lines = "".join(f"\t* {p}\n" for p in problems)
            raise VaultError(400, [f"{len(problems)} {noun} occurred:\n{lines}\n"])
        return values

    def _kv_metadata_write(self, mount: Mount, name: str, key: Key | None, req: Request,
                           body: dict[str, Any]) -> Response:
        if req.method == "PATCH":
            media = req.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/merge-patch+json":
                raise VaultError(415, ["PATCH requires Content-Type of application/merge-patch+json, "
                                       f"provided {media}"])
            if key is None:
                return Response(404, b"", list(JSON_HEADERS))
        fields = ("max_versions", "cas_required", "delete_version_after", "custom_metadata")
        if not any(f in body for f in fields):
            return self._no_content()
        custom = None
        if "custom_metadata" in body:
            if req.method == "PATCH":
                merged = merge_patch(key.custom_metadata if key else {}, body["custom_metadata"])
                custom = self._validate_custom(merged)
            else:
                custom = self._validate_custom(body["custom_metadata"])
        after = self._duration_field(body["delete_version_after"]) if "delete_version_after" in body else None
        now = self.kv_now_ns()
        if key is None:
            key = mount.keys[name] = Key(created_ns=now, updated_ns=now)
        if "max_versions" in body:
            key.max_versions = int(body["max_versions"])
        if "cas_required" in body:
            key.cas_required = bool(body["cas_required"])
        if after is not None:
            key.delete_version_after = after
        if custom is not None:
            key.custom_metadata = custom
        if body.get("cas_required") is False and mount.cas_required:
            return self._ok(None, warnings=[CAS_WARNING])
        return self._no_content()

    def _kv_subkeys(self, mount: Mount, key: Key | None, req: Request) -> Response:
        number = self._version_param(req)
        if key is None or key.current_version == 0:
            raise VaultError(404, [])
        number = number if number > 0 else key.current_version
        ver = key.versions.get(number)
        if ver is None or ver.destroyed or ver.deleted(self.kv_now_ns()):
            raise VaultError(404, [])

        def strip(obj: Any) -> Any:
            return {k: strip(v) for k, v in obj.items()} if isinstance(obj, dict) else None

        return self._ok({"subkeys": strip(key.data[number]), "metadata": ver.meta(key.custom_metadata, number)})
