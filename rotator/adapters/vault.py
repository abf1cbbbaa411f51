"""The Vault record store over an injected ``hvac.Client``: KV v2, check-and-set, a bounded pool, leases.

Record layout (a contract, see README "Vault record layout"): one KV v2 secret per tunnel at
``<mount>/data/<prefix>/<account_id>/<tunnel_id>``. Leases live at
``<prefix>/_leases/<account_id>`` (an account id is 32 hex characters, so it cannot collide).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlencode, urlparse

import hvac
import hvac.exceptions as hx
import requests
import urllib3

from rotator import wire
from rotator.errors import CasConflict, ConfigError, VaultError
from rotator.model import Lease, Record, check_distinct
from rotator.rotation.ports import History, VersionInfo
from rotator.secret import redact

_json_dumps = json.dumps
_HEX32 = re.compile(r"[0-9a-f]{32}")

POLICY_HINT = "check VAULT_TOKEN and that its policy grants create/read/update on the record path (README: Vault policy)"

Observer = Callable[[str, str], None]  # (operation, outcome)


# One table turns every Vault failure into a VaultError: the first row whose status matches and
# whose text (None: any) occurs in Vault's error wins. Transport failures have no status; their
# text is the kind of failure. Columns: status, text, class, what happened, hint, retryable,
# ambiguous when the call was a write (it may have landed).
_Row = tuple[int | None, str | None, type[VaultError], str, str, bool, bool]
ERROR_TABLE: tuple[_Row, ...] = (
    (400, "check-and-set parameter did not match", CasConflict, "the record changed since it was read",
     "another rotator may be acting", False, False),
    (400, None, VaultError, "Vault refused the request", "check vault.mount and vault.prefix", False, False),
    (403, "invalid token", VaultError, "Vault says the token is invalid or expired",
     "set a valid VAULT_TOKEN or configure vault.auth", False, False),
    (403, None, VaultError, "Vault denied permission", POLICY_HINT, False, False),
    (404, None, VaultError, "Vault has no such path", "check vault.mount and vault.prefix", False, False),
    (429, None, VaultError, "Vault's rate limit quota is spent", "wait, or raise the Vault quota", True, False),
    (503, "sealed", VaultError, "Vault is sealed", "unseal Vault or check VAULT_ADDR", True, False),
    (503, None, VaultError, "Vault is unavailable", "check VAULT_ADDR and that Vault is up", True, False),
    (200, "not json", VaultError, "Vault answered with something that is not Vault's JSON",
     "check VAULT_ADDR points at Vault, not a proxy or login page", False, True),
    (None, "refused", VaultError, "cannot reach Vault", "check VAULT_ADDR and that Vault is up", True, False),
    (None, "timeout", VaultError, "no answer from Vault in time", "check VAULT_ADDR and that Vault is up",
     True, True),
    (None, "connection", VaultError, "the connection to Vault broke", "check VAULT_ADDR and that Vault is up",
     True, True),
    (None, "tls", VaultError, "TLS with Vault failed", "check VAULT_ADDR and VAULT_CACERT", False, False),
    (None, "request", VaultError, "the request to Vault failed", "check VAULT_ADDR and VAULT_CACERT", False, False),
)
_SERVER_ERROR: _Row = (None, None, VaultError, "Vault had a server-side problem", "check the Vault server logs",
                       True, True)
_CLIENT_ERROR: _Row = (None, None, VaultError, "Vault refused the request", "check the Vault server logs",
                       False, False)
_OTHER_ERROR: _Row = (None, None, VaultError, "Vault answered an unexpected status", "check the Vault server logs",
                      False, True)
_STATUS_OF: dict[type[hx.VaultError], int] = {
    hx.InvalidRequest: 400, hx.Unauthorized: 401, hx.Forbidden: 403, hx.InvalidPath: 404,
    hx.RateLimitExceeded: 429, hx.InternalServerError: 500, hx.VaultNotInitialized: 501, hx.BadGateway: 502,
    hx.VaultDown: 503,
}


def _key_of(exc: Exception) -> tuple[int | None, str] | None:
    """(status, error text) of a failure from hvac or requests; None for anything else."""
    if isinstance(exc, hx.VaultError):
        text = ", ".join(str(e) for e in exc.errors) if isinstance(exc.errors, list) else str(exc.args[0] or "")
        return _STATUS_OF.get(type(exc), 0), text  # 0: a status hvac does not name
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return None, "refused"
    if isinstance(exc, requests.exceptions.Timeout):
        return None, "timeout"
    if isinstance(exc, requests.exceptions.SSLError):
        return None, "tls"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return None, "refused" if "NewConnectionError" in repr(exc.args) else "connection"
    if isinstance(exc, requests.exceptions.RequestException):
        return None, "request"
    if isinstance(exc, ValueError | RecursionError):  # hvac decoding a 200 that is not JSON (or nests too deep)
        return 200, "not json"
    return None


class Credentials:
    """What this process authenticates to Vault with (every token it used, the AppRole secret id, the
    Kubernetes JWT): redacted from every error text Vault (or a proxy in front of it) sends back, since
    an echo of the request may quote them (docs/design.md section 8: every reason text from Vault is
    redacted). Shared by the store and the login (wiring.py); thread-safe."""

    LIMIT = 32  # tokens renewed or re-issued over a long life: the newest are kept

    def __init__(self, *values: str | None) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, None] = {}
        self.add(*values)

    def add(self, *values: str | None) -> None:
        with self._lock:
            for value in values:
                if isinstance(value, str) and value:
                    self._values.pop(value, None)
                    self._values[value] = None
            while len(self._values) > self.LIMIT:
                del self._values[next(iter(self._values))]

    def values(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._values)

    def with_token(self, client: Any) -> tuple[str, ...]:
        """Every value, after adding ``client``'s current token (a login or renewal may have replaced it)."""
        token = getattr(client, "token", None)
        self.add(token if isinstance(token, str) else None)
        return self.values()

    def __repr__(self) -> str:
        return f"Credentials({len(self._values)} redacted)"


def translate(exc: Exception, what: str, *, write: bool = False, secrets: Iterable[str] = ()) -> VaultError:
    """Turn an hvac/requests failure into a VaultError with a hint (never the token or a PSK: Vault's
    own text is redacted against ``secrets``, this process's credentials, before it is quoted).
    Anything that is neither is not a Vault failure and is re-raised."""
    key = _key_of(exc)
    if key is None:
        raise exc
    status, text = key
    text = redact(text, secrets)
    row = next((r for r in ERROR_TABLE if r[0] == status and (r[1] is None or r[1] in text)), None)
    if row is None:
        code = status or 0
        row = _SERVER_ERROR if code >= 500 else _CLIENT_ERROR if code >= 400 else _OTHER_ERROR
    _, _, cls, happened, hint, retryable, ambiguous = row
    detail = _one_line(text) if status not in (None, 200) else ""
    label = (f"{status or 'status'}" + (f": {detail}" if detail else "")) if status not in (None, 200) else ""
    message = f"{what}: {happened}" + (f" ({label})" if label else "")
    return cls(message, hint, status=status, retryable=retryable, ambiguous=write and ambiguous)


def _one_line(text: str) -> str:
    """Vault's error text as one short line: multierror bullets joined, HTML bodies not quoted."""
    if "<html" in text.lower() or "<!doctype" in text.lower():
        return "a non-JSON page"
    lines = [ln.strip().lstrip("* ").strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not re.fullmatch(r"\d+ errors? occurred:", ln)]
    return "; ".join(lines)[:160]


def check_id(value: str, what: str) -> str:
    """An account or tunnel id that may become part of a Vault path: 32 lowercase hex, or a VaultError."""
    if not (isinstance(value, str) and _HEX32.fullmatch(value)):
        raise VaultError(f"refusing a Vault path for {what} {str(value)[:40]!r}: not 32 lowercase hex",
                         "only Cloudflare's 32-hex-digit ids name Vault records")
    return value


def _garbage(what: str, detail: str, *, write: bool = False) -> VaultError:
    return VaultError(f"{what}: Vault answered with an unexpected body ({detail})",
                      "check VAULT_ADDR points at Vault, not a proxy or login page", ambiguous=write)


class VaultStore:
    def __init__(self, client: hvac.Client, *, mount: str = "secret", prefix: str = "cloudflare/magic-ipsec",
                 concurrency: int = 16, observe: Observer | None = None,
                 credentials: Credentials | None = None) -> None:
        self._client = client
        self.credentials = credentials or Credentials()
        self.mount = mount.strip("/")
        self.prefix = prefix.strip("/")
        self._concurrency = concurrency
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="vault")
        self._observe = observe or (lambda op, outcome: None)

    def __repr__(self) -> str:
        return f"VaultStore(mount={self.mount!r}, prefix={self.prefix!r})"

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def path(self, account_id: str, tunnel_id: str) -> str:
        return f"{self.prefix}/{check_id(account_id, 'account')}/{check_id(tunnel_id, 'tunnel')}"

    # -- checks -------------------------------------------------------------------------------
    def check(self) -> dict[str, Any]:
        """Token valid and mount is KV v2; returns the token's lookup data (ttl, renewable...)."""
        token = self._do("token_lookup", "token lookup", lambda: self._client.auth.token.lookup_self())
        if not isinstance(token, dict) or not isinstance(token.get("data"), dict):
            raise _garbage("token lookup", "no data object")
        mount = self._do("mount_check", f"reading mount '{self.mount}'",
                         lambda: self._client.adapter.get(f"/v1/sys/internal/ui/mounts/{self.mount}"))
        data = mount.get("data") if isinstance(mount, dict) else None
        if not isinstance(data, dict | None):
            raise _garbage(f"reading mount '{self.mount}'", "data is not an object")
        version = ((data or {}).get("options") or {}).get("version")
        if (data or {}).get("type") != "kv" or str(version) != "2":
            raise ConfigError(f"Vault mount '{self.mount}' is not a KV version 2 engine",
                              "set vault.mount to a KV v2 mount (vault secrets enable -version=2 -path=secret kv)")
        return dict(token.get("data") or {})

    # -- records ------------------------------------------------------------------------------
    def _read_latest(self, op: str, what: str, path: str) -> tuple[int, dict[str, Any]]:
        """The latest version's number and data; data is empty when there is no live latest version.

        A 404 names the latest version when it was deleted or destroyed; a plain ``{"errors":[]}``
        means the key never existed (or has metadata only, which a CAS on 0 then reveals).
        """
        def call() -> Any:
            return self._client.secrets.kv.v2.read_secret_version(
                path, mount_point=self.mount, raise_on_deleted_version=False)

        try:
            resp = self._do(op, what, call, missing_ok=True)
        except _Missing as missing:
            return missing.version or 0, {}
        data = resp.get("data") if isinstance(resp, dict) else None
        meta = data.get("metadata") if isinstance(data, dict) else None
        version = meta.get("version") if isinstance(meta, dict) else None
        body = data.get("data") if isinstance(data, dict) else None
        if not isinstance(version, int) or isinstance(version, bool) or version < 1 or not isinstance(body, dict):
            raise _garbage(what, "no KV v2 version and data")
        return version, dict(body)

    def read(self, account_id: str, tunnel_id: str) -> Record:
        path = self.path(account_id, tunnel_id)
        version, data = self._read_latest("read", f"reading {self.mount}/{path}", path)
        return Record.from_data(account_id, tunnel_id, version, data)

    def write(self, record: Record) -> Record:
        """CAS-write ``record`` on ``record.version``; returns it with the new version."""
        path = self.path(record.account_id, record.tunnel_id)
        data = record.to_data()

        def landed() -> bool:
            latest = self.read(record.account_id, record.tunnel_id)
            return latest.version == record.version + 1 and latest.to_data() == data

        record.version = self._cas_write("write", f"writing {self.mount}/{path}", path, data, record.version, landed)
        return record

    def _cas_write(self, op: str, what: str, path: str, data: dict[str, str], cas: int,
                   landed: Callable[[], bool]) -> int:
        """Write ``data`` with check-and-set on ``cas``; returns the new version.

        A write whose answer was lost is settled by reading back: ``landed()`` says whether the
        latest version is exactly what we wrote (tried a few times while Vault recovers).
        """
        def call() -> Any:
            return self._client.secrets.kv.v2.create_or_update_secret(path, secret=data, cas=cas,
                                                                      mount_point=self.mount)

        try:
            resp = self._do(op, what, call, write=True)
            answer = resp.get("data") if isinstance(resp, dict) else None
            version = answer.get("version") if isinstance(answer, dict) else None
            if version != cas + 1 or isinstance(version, bool):
                raise _garbage(what, "no new version number", write=True)
        except VaultError as exc:
            if exc.ambiguous and _read_back(landed):
                return cas + 1
            raise
        return cas + 1

    def read_many(self, account_id: str, tunnel_ids: Iterable[str]) -> dict[str, Record | VaultError]:
        return self._map(lambda tid: self.read(account_id, tid), list(tunnel_ids))

    def _read_version(self, account_id: str, tunnel_id: str, path: str, number: int) -> Record | None:
        """One version's data (``GET <mount>/data/<path>?version=N``, docs/specs/vault-kv2.md 4.2);
        None when it was deleted, destroyed or trimmed."""
        what = f"reading version {number} of {self.mount}/{path}"

        def call() -> Any:
            return self._client.secrets.kv.v2.read_secret_version(
                path, version=number, mount_point=self.mount, raise_on_deleted_version=False)

        try:
            resp = self._do("read", what, call, missing_ok=True)
        except _Missing:
            return None
        data = resp.get("data") if isinstance(resp, dict) else None
        body = data.get("data") if isinstance(data, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("metadata"), dict) or not isinstance(body, dict):
            raise _garbage(what, "no KV v2 version and data")
        return Record.from_data(account_id, tunnel_id, number, body)

    def write_many(self, records: list[Record]) -> dict[str, Record | VaultError]:
        """CAS-write each record; raises model.RepeatedTunnel (a programming error, nothing written)
        for a batch that names a tunnel twice, whose answers could not be told apart."""
        check_distinct((f"{r.account_id}/{r.tunnel_id}" for r in records), "write_many")
        by_id = {r.tunnel_id: r for r in records}
        return self._map(lambda tid: self.write(by_id[tid]), list(by_id))

    def _map(self, fn: Callable[[str], Record], keys: list[str]) -> dict[str, Record | VaultError]:
        """Run ``fn`` over keys on at most ``concurrency`` workers, each taking a share of the keys.

        One task per worker rather than per key: per-key futures cost more CPU than the calls they
        wrap (measured: about 350 us per tunnel at 1,000 tunnels).
        """
        def safe(key: str) -> Record | VaultError:
            try:
                return fn(key)
            except VaultError as exc:
                return exc

        if len(keys) <= 1:
            return {k: safe(k) for k in keys}
        shares = [keys[i::self._concurrency] for i in range(min(self._concurrency, len(keys)))]
        results: dict[str, Record | VaultError] = {}
        for share, done in zip(shares, self._pool.map(lambda ks: [safe(k) for k in ks], shares), strict=True):
            results.update(zip(share, done, strict=True))
        return {k: results[k] for k in keys}

    # -- history (the audit report, service/report.py; docs/specs/vault-kv2.md) ------------------
    # Vault's KV v2 API: "Read secret metadata" (versions with created_time, deletion_time, destroyed;
    # current_version, oldest_version, max_versions) and "Read secret version" (?version=N), see
    # https://developer.hashicorp.com/vault/api-docs/secret/kv/kv-v2
    def list_records(self, account_id: str) -> list[str]:
        """The tunnel ids with a record under the account (LIST on the metadata path); [] when none."""
        folder = f"{self.prefix}/{check_id(account_id, 'account')}"
        what = f"listing {self.mount}/metadata/{folder}"
        try:
            resp = self._do("history_list", what, lambda: self._client.secrets.kv.v2.list_secrets(
                folder, mount_point=self.mount))
        except VaultError as exc:
            if exc.status == 404:  # nothing under the folder
                return []
            raise
        keys = (resp.get("data") or {}).get("keys") if isinstance(resp, dict) else None
        if not isinstance(keys, list):
            raise _garbage(what, "no list of keys")
        return sorted(k for k in keys if isinstance(k, str) and _HEX32.fullmatch(k))

    def record_history(self, account_id: str, tunnel_id: str) -> History:
        """Metadata and every live version's data of one record: read, metadata read (least privilege)."""
        path = self.path(account_id, tunnel_id)
        what = f"reading the metadata of {self.mount}/{path}"
        try:
            resp = self._do("history_metadata", what, lambda: self._client.secrets.kv.v2.read_secret_metadata(
                path, mount_point=self.mount))
        except VaultError as exc:
            if exc.status == 404:  # listed a moment ago, deleted since
                return History(account_id, tunnel_id, f"{self.mount}/{path}", 0, 0, 0, "")
            raise
        meta = resp.get("data") if isinstance(resp, dict) else None
        raw = meta.get("versions") if isinstance(meta, dict) else None
        if not isinstance(meta, dict) or not isinstance(raw, dict):
            raise _garbage(what, "no versions object")
        numbers = {int(k): v for k, v in raw.items() if isinstance(k, str) and k.isdigit() and isinstance(v, dict)}
        if len(numbers) != len(raw) or not all(isinstance(meta.get(f), int) for f in
                                               ("current_version", "oldest_version", "max_versions")):
            raise _garbage(what, "malformed version numbers")
        versions = [self._version(account_id, tunnel_id, path, n, v) for n, v in sorted(numbers.items())]
        return History(account_id, tunnel_id, f"{self.mount}/{path}", meta["current_version"], meta["oldest_version"],
                       meta["max_versions"], str(meta.get("created_time") or ""), tuple(versions))

    def _version(self, account_id: str, tunnel_id: str, path: str, number: int, meta: dict[str, Any]) -> VersionInfo:
        created, deleted = str(meta.get("created_time") or ""), str(meta.get("deletion_time") or "") or None
        destroyed = meta.get("destroyed") is True
        record = None if destroyed else self._read_version(account_id, tunnel_id, path, number)
        return VersionInfo(number, created, deleted, destroyed, record)

    def history_many(self, account_id: str, tunnel_ids: Iterable[str]) -> dict[str, History | VaultError]:
        out: dict[str, History | VaultError] = {}
        ids = list(tunnel_ids)

        def one(tid: str) -> History | VaultError:
            try:
                return self.record_history(account_id, tid)
            except VaultError as exc:
                return exc

        for tid, res in zip(ids, self._pool.map(one, ids), strict=True):
            out[tid] = res
        return out

    # -- leases -------------------------------------------------------------------------------
    def _lease_path(self, account_id: str) -> str:
        return f"{self.prefix}/_leases/{check_id(account_id, 'account')}"

    def read_lease(self, account_id: str) -> Lease:
        path = self._lease_path(account_id)
        what = f"reading lease {path}"
        version, body = self._read_latest("lease_read", what, path)
        holder = body.get("holder", "")
        expires_at, busy_until = _number(body.get("expires_at")), _number(body.get("busy_until"))
        if not isinstance(holder, str) or not math.isfinite(expires_at) or not math.isfinite(busy_until):
            raise VaultError(f"{what}: the lease record is malformed (holder, expires_at or busy_until)",
                             f"inspect it with 'vault kv get {self.mount}/{path}'; 'vault kv put' a free lease "
                             "(holder \"\", expires_at 0) once its holder is stopped")
        admin_url = body.get("admin_url", "")
        return Lease(holder, expires_at, version, busy_until, admin_url if isinstance(admin_url, str) else "")

    def write_lease(self, account_id: str, holder: str, expires_at: float, cas: int, *,
                    busy_until: float = 0.0, note: Mapping[str, str] | None = None) -> int:
        """CAS-write the lease; raises CasConflict when someone else wrote it first.

        ``busy_until``: the latest instant a call made under the lease may still land (rotation/lease.py);
        ``note``: extra fields for the record's history (who cleared it, and whom) and, from a daemon,
        ``admin_url``: where its admin API answers (read back as ``Lease.admin_url``).
        """
        path = self._lease_path(account_id)
        data = {**(note or {}), "holder": holder, "expires_at": f"{expires_at:.3f}", "account_id": account_id}
        if busy_until:
            data["busy_until"] = f"{busy_until:.3f}"

        def landed() -> bool:
            lease = self.read_lease(account_id)
            return lease.version == cas + 1 and lease.holder == holder

        return self._cas_write("lease_write", f"writing lease {path}", path, data, cas, landed)

    # -- plumbing -----------------------------------------------------------------------------
    def _do(self, op: str, what: str, call: Callable[[], Any], *, write: bool = False,
            missing_ok: bool = False) -> Any:
        try:
            result = call()
        except hx.InvalidPath as exc:
            self._observe(op, "missing" if missing_ok else "error")
            if missing_ok:
                raise _Missing(_version_in(getattr(exc, "json", None))) from exc
            raise translate(exc, what, write=write, secrets=self.credentials.with_token(self._client)) from exc
        except Exception as exc:
            error = translate(exc, what, write=write, secrets=self.credentials.with_token(self._client))
            self._observe(op, "conflict" if isinstance(error, CasConflict) else "error")
            raise error from exc
        if missing_ok and isinstance(result, dict) and isinstance(result.get("data"), dict) \
                and result["data"].get("data") is None:
            # hvac hands back a deleted/destroyed latest version's 404 body instead of raising.
            self._observe(op, "missing")
            raise _Missing(_version_in(result))
        self._observe(op, "ok")
        return result


def _read_back(landed: Callable[[], bool], tries: int = 3) -> bool:
    """Whether a write whose answer was lost did land; False when Vault cannot tell us."""
    for attempt in range(tries):
        try:
            return landed()
        except VaultError:
            if attempt + 1 < tries:
                time.sleep(0.2)
    return False


class _Missing(Exception):
    """Internal: the path has no live latest version; ``version`` is the latest's number if known."""

    def __init__(self, version: int | None = None) -> None:
        super().__init__(version)
        self.version = version


def _version_in(body: Any) -> int | None:
    data = body.get("data") if isinstance(body, dict) else None
    meta = data.get("metadata") if isinstance(data, dict) else None
    version = meta.get("version") if isinstance(meta, dict) else None
    return int(version) if isinstance(version, int) else None


class _Response:
    """The part of ``requests.Response`` hvac reads."""

    __slots__ = ("content", "headers", "status_code", "url")

    def __init__(self, status: int, headers: Any, content: bytes, url: str) -> None:
        self.status_code, self.headers, self.content, self.url = status, headers, content, url

    @property
    def ok(self) -> bool:
        return self.status_code < 400

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return wire.loads(self.content)  # deep nesting too is a ValueError: hvac then hands back the response


class PooledSession:
    """A lean stand-in for ``requests.Session`` under hvac, built on urllib3's pool.

    Kept over hvac's own ``requests.Session`` with a tuned ``HTTPAdapter`` on a measurement
    (``tests/bench/vault_transport.py``: 3,000 KV reads from 16 threads against the simulator in
    its own process, two rounds, this 2-core machine under load): client CPU per read 880-1,110 us
    here, 1,640-2,390 us with requests' defaults, 1,470-1,900 us with ``trust_env`` off; wall time
    per read 3.0-3.7 ms here against 3.5-6.1 ms. Its fragility (hvac's call signature) is covered by
    every store and conformance test going through it; failures are raised as requests' exception
    types so hvac and the one error table (``ERROR_TABLE``) see what they expect.

    Profiling a 1,000-tunnel rotation showed requests spending most of each Vault call's CPU on
    per-request environment scans and hooks (about 520 us per call, against about 150 us here).
    hvac only needs ``request()`` and a response with ``status_code``, ``ok``, ``headers``,
    ``text`` and ``json()``; failures are raised as requests' exception types so hvac's callers and
    ``translate`` see what they expect.
    """

    def __init__(self, addr: str, *, maxsize: int, verify: bool | str = True, timeout: float = 15.0) -> None:
        self.verify, self.cert, self.proxies = verify, None, requests.utils.get_environ_proxies(addr)
        pool_kwargs: dict[str, Any] = {"maxsize": maxsize, "block": False, "retries": False,
                                       "timeout": urllib3.Timeout(connect=min(timeout, 5.0), read=timeout)}
        if verify is False:
            pool_kwargs["cert_reqs"] = "CERT_NONE"
        elif isinstance(verify, str):
            pool_kwargs["ca_certs"] = verify
        proxy = self.proxies.get(urlparse(addr).scheme)
        self._pool: urllib3.PoolManager = (urllib3.ProxyManager(proxy, **pool_kwargs) if proxy
                                           else urllib3.PoolManager(**pool_kwargs))

    def request(self, method: str, url: str, headers: dict[str, str] | None = None, allow_redirects: bool = True,
                json: Any = None, params: dict[str, Any] | None = None, **_ignored: Any) -> _Response:
        headers = dict(headers or {})
        body = None
        if json is not None:
            body = _json_dumps(json).encode()
            headers["Content-Type"] = "application/json"
        if params:
            url = f"{url}?{urlencode(params)}"
        try:
            resp = self._pool.request(method.upper(), url, body=body, headers=headers, redirect=allow_redirects,
                                      retries=False)
        except urllib3.exceptions.NewConnectionError as exc:
            raise requests.exceptions.ConnectionError(f"NewConnectionError: {exc}") from exc
        except urllib3.exceptions.ConnectTimeoutError as exc:
            raise requests.exceptions.ConnectTimeout(str(exc)) from exc
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise requests.exceptions.ReadTimeout(str(exc)) from exc
        except urllib3.exceptions.SSLError as exc:
            raise requests.exceptions.SSLError(str(exc)) from exc
        except urllib3.exceptions.HTTPError as exc:
            raise requests.exceptions.ConnectionError(f"Connection aborted: {type(exc).__name__}") from exc
        return _Response(resp.status, resp.headers, resp.data, url)

    def close(self) -> None:
        self._pool.clear()


def build_hvac_client(addr: str, token: str | None, *, namespace: str | None = None, cacert: str | None = None,
                      concurrency: int = 16, timeout: float = 15.0) -> hvac.Client:
    """An hvac client over a pooled session sized for the store's concurrency."""
    verify: bool | str = cacert if cacert else True
    session = PooledSession(addr, maxsize=max(concurrency, 4), verify=verify, timeout=timeout)
    return hvac.Client(url=addr, token=token, namespace=namespace or None, verify=verify, timeout=timeout,
                       session=session)


def _number(value: Any) -> float:
    """A number field of a lease as stored (a string or a number; absent or empty is 0); NaN otherwise."""
    if value is None or value == "":
        return 0.0
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return math.nan
    try:
        return float(value)
    except ValueError:
        return math.nan
