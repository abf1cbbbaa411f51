"""The Vault record store over an injected ``hvac.Client``: KV v2, check-and-set, a bounded pool, leases.

Record layout (a contract, see README "Vault record layout"): one KV v2 secret per tunnel at
``<mount>/data/<prefix>/<account_id>/<tunnel_id>``. Leases live at
``<prefix>/_leases/<account_id>`` (an account id is 32 hex characters, so it cannot collide).
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterable
from typing import Any

import hvac
import hvac.exceptions as hx
import requests

from rotator.errors import CasConflict, ConfigError, VaultError
from rotator.model import Lease, Record

POLICY_HINT = "check VAULT_TOKEN and that its policy grants create/read/update on the record path (README: Vault policy)"

Observer = Callable[[str, str], None]  # (operation, outcome)


def translate(exc: Exception, what: str, *, write: bool = False) -> VaultError:
    """Turn an hvac/requests failure into a VaultError with a hint (never the token or a PSK)."""
    if isinstance(exc, hx.InvalidRequest) and "check-and-set parameter did not match" in str(exc):
        return CasConflict(f"{what}: the record changed since it was read", "another rotator may be acting")
    if isinstance(exc, hx.Forbidden):
        if "invalid token" in str(exc):
            return VaultError(f"{what}: Vault says the token is invalid or expired",
                              "set a valid VAULT_TOKEN or configure vault.auth", status=403)
        return VaultError(f"{what}: Vault denied permission", POLICY_HINT, status=403)
    if isinstance(exc, hx.VaultDown):
        return VaultError(f"{what}: Vault is sealed or unavailable", "unseal Vault or check VAULT_ADDR",
                          status=503, retryable=True)
    if isinstance(exc, hx.VaultError):
        status = getattr(exc, "status_code", None) or _status_of(exc)
        first_line = str(exc).split(", on ")[0].splitlines()[0][:160] if str(exc) else type(exc).__name__
        return VaultError(f"{what}: Vault answered {type(exc).__name__} ({first_line})",
                          "check the Vault server logs", status=status,
                          retryable=status is not None and status >= 500, ambiguous=write and (status or 0) >= 500)
    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        refused = isinstance(exc, requests.exceptions.ConnectTimeout) or "NewConnectionError" in repr(exc.args)
        return VaultError(f"{what}: cannot reach Vault ({type(exc).__name__})", "check VAULT_ADDR and that Vault is up",
                          retryable=True, ambiguous=write and not refused)
    if isinstance(exc, requests.exceptions.RequestException):
        return VaultError(f"{what}: request to Vault failed ({type(exc).__name__})", "check VAULT_ADDR and VAULT_CACERT")
    raise exc


def _status_of(exc: hx.VaultError) -> int | None:
    mapping = {hx.InvalidRequest: 400, hx.Unauthorized: 401, hx.Forbidden: 403, hx.InvalidPath: 404,
               hx.RateLimitExceeded: 429, hx.InternalServerError: 500, hx.BadGateway: 502, hx.VaultDown: 503}
    for cls, status in mapping.items():
        if isinstance(exc, cls):
            return status
    return None


class VaultStore:
    def __init__(self, client: hvac.Client, *, mount: str = "secret", prefix: str = "cloudflare/magic-ipsec",
                 concurrency: int = 16, observe: Observer | None = None) -> None:
        self._client = client
        self.mount = mount.strip("/")
        self.prefix = prefix.strip("/")
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="vault")
        self._observe = observe or (lambda op, outcome: None)
        self.calls = 0

    def __repr__(self) -> str:
        return f"VaultStore(mount={self.mount!r}, prefix={self.prefix!r})"

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def path(self, account_id: str, tunnel_id: str) -> str:
        return f"{self.prefix}/{account_id}/{tunnel_id}"

    def display_path(self, account_id: str, tunnel_id: str) -> str:
        return f"{self.mount}/{self.path(account_id, tunnel_id)}"

    # -- checks -------------------------------------------------------------------------------
    def check(self) -> dict[str, Any]:
        """Token valid and mount is KV v2; returns the token's lookup data (ttl, renewable...)."""
        token = self._do("token_lookup", "token lookup", lambda: self._client.auth.token.lookup_self())
        mount = self._do("mount_check", f"reading mount '{self.mount}'",
                         lambda: self._client.adapter.get(f"/v1/sys/internal/ui/mounts/{self.mount}"))
        data = mount.get("data") if isinstance(mount, dict) else None
        version = ((data or {}).get("options") or {}).get("version")
        if (data or {}).get("type") != "kv" or str(version) != "2":
            raise ConfigError(f"Vault mount '{self.mount}' is not a KV version 2 engine",
                              "set vault.mount to a KV v2 mount (vault secrets enable -version=2 -path=secret kv)")
        return dict(token.get("data") or {})

    # -- records ------------------------------------------------------------------------------
    def read(self, account_id: str, tunnel_id: str) -> Record:
        path = self.path(account_id, tunnel_id)

        def call() -> Any:
            return self._client.secrets.kv.v2.read_secret_version(
                path, mount_point=self.mount, raise_on_deleted_version=False)

        try:
            resp = self._do("read", f"reading {self.mount}/{path}", call, missing_ok=True)
        except _Missing:
            return Record(account_id, tunnel_id, version=self._current_version(path))
        data = resp.get("data") or {}
        version = int((data.get("metadata") or {}).get("version") or 0)
        return Record.from_data(account_id, tunnel_id, version, data.get("data") or {})

    def _current_version(self, path: str) -> int:
        """Version to CAS against when the latest version is missing, deleted or destroyed."""
        def call() -> Any:
            return self._client.secrets.kv.v2.read_secret_metadata(path, mount_point=self.mount)

        try:
            meta = self._do("metadata_read", f"reading metadata of {self.mount}/{path}", call, missing_ok=True)
        except _Missing:
            return 0
        return int((meta.get("data") or {}).get("current_version") or 0)

    def write(self, record: Record) -> Record:
        """CAS-write ``record`` on ``record.version``; returns it with the new version.

        A write whose answer was lost is settled by reading back: if the latest version holds
        exactly what we wrote, it landed.
        """
        path = self.path(record.account_id, record.tunnel_id)
        data = record.to_data()

        def call() -> Any:
            return self._client.secrets.kv.v2.create_or_update_secret(
                path, secret=data, cas=record.version, mount_point=self.mount)

        try:
            resp = self._do("write", f"writing {self.mount}/{path}", call, write=True)
        except VaultError as exc:
            if not exc.ambiguous:
                raise
            landed = self._landed(record, data)
            if landed is None:
                raise
            record.version = landed
            return record
        record.version = int((resp.get("data") or {}).get("version") or record.version + 1)
        return record

    def _landed(self, record: Record, data: dict[str, str]) -> int | None:
        for _ in range(3):
            try:
                latest = self.read(record.account_id, record.tunnel_id)
            except VaultError:
                time.sleep(0.2)
                continue
            if latest.version == record.version + 1 and latest.to_data() == data:
                return latest.version
            return None
        return None

    def read_many(self, account_id: str, tunnel_ids: Iterable[str]) -> dict[str, Record | VaultError]:
        return self._map(lambda tid: self.read(account_id, tid), list(tunnel_ids))

    def write_many(self, records: list[Record]) -> dict[str, Record | VaultError]:
        by_id = {r.tunnel_id: r for r in records}
        return self._map(lambda tid: self.write(by_id[tid]), list(by_id))

    def _map(self, fn: Callable[[str], Record], keys: list[str]) -> dict[str, Record | VaultError]:
        def safe(key: str) -> Record | VaultError:
            try:
                return fn(key)
            except VaultError as exc:
                return exc

        if len(keys) <= 1:
            return {k: safe(k) for k in keys}
        return dict(zip(keys, self._pool.map(safe, keys), strict=True))

    def list_tunnels(self, account_id: str) -> list[str]:
        path = f"{self.prefix}/{account_id}"

        def call() -> Any:
            return self._client.secrets.kv.v2.list_secrets(path, mount_point=self.mount)

        try:
            resp = self._do("list", f"listing {self.mount}/{path}", call, missing_ok=True)
        except _Missing:
            return []
        return [k for k in (resp.get("data") or {}).get("keys", []) if not k.endswith("/")]

    # -- leases -------------------------------------------------------------------------------
    def _lease_path(self, account_id: str) -> str:
        return f"{self.prefix}/_leases/{account_id}"

    def read_lease(self, account_id: str) -> Lease:
        path = self._lease_path(account_id)

        def call() -> Any:
            return self._client.secrets.kv.v2.read_secret_version(
                path, mount_point=self.mount, raise_on_deleted_version=False)

        try:
            resp = self._do("lease_read", f"reading lease {path}", call, missing_ok=True)
        except _Missing:
            return Lease("", 0.0, self._current_version(path))
        data = resp.get("data") or {}
        body = data.get("data") or {}
        return Lease(str(body.get("holder", "")), float(body.get("expires_at", 0) or 0),
                     int((data.get("metadata") or {}).get("version") or 0))

    def write_lease(self, account_id: str, holder: str, expires_at: float, cas: int) -> int:
        """CAS-write the lease; raises CasConflict when someone else wrote it first."""
        path = self._lease_path(account_id)
        data = {"holder": holder, "expires_at": f"{expires_at:.3f}", "account_id": account_id}

        def call() -> Any:
            return self._client.secrets.kv.v2.create_or_update_secret(path, secret=data, cas=cas,
                                                                      mount_point=self.mount)

        try:
            resp = self._do("lease_write", f"writing lease {path}", call, write=True)
        except VaultError as exc:
            if not exc.ambiguous:
                raise
            landed = self.read_lease(account_id)  # the answer was lost: did the write land?
            if landed.version == cas + 1 and landed.holder == holder:
                return landed.version
            raise
        return int((resp.get("data") or {}).get("version") or cas + 1)

    # -- plumbing -----------------------------------------------------------------------------
    def _do(self, op: str, what: str, call: Callable[[], Any], *, write: bool = False,
            missing_ok: bool = False) -> Any:
        self.calls += 1
        try:
            result = call()
        except hx.InvalidPath as exc:
            self._observe(op, "missing" if missing_ok else "error")
            if missing_ok:
                raise _Missing from exc
            raise translate(exc, what, write=write) from exc
        except Exception as exc:
            error = translate(exc, what, write=write)
            self._observe(op, "conflict" if isinstance(error, CasConflict) else "error")
            raise error from exc
        if missing_ok and isinstance(result, dict) and (result.get("data") or {}).get("data") is None \
                and op in ("read", "lease_read"):
            # hvac hands back a deleted/destroyed latest version's 404 body instead of raising.
            self._observe(op, "missing")
            raise _Missing
        self._observe(op, "ok")
        return result


class _Missing(Exception):
    """Internal: the path has no live latest version."""


def build_hvac_client(addr: str, token: str | None, *, namespace: str | None = None, cacert: str | None = None,
                      concurrency: int = 16, timeout: float = 15.0) -> hvac.Client:
    """An hvac client whose connection pool matches the store's concurrency."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=max(concurrency, 4))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    verify: bool | str = cacert if cacert else True
    return hvac.Client(url=addr, token=token, namespace=namespace or None, verify=verify, timeout=timeout,
                       session=session)
