"""Builds the parts from Settings: clients, store, engine. Shared by the CLI and the daemon.

Nothing here decides anything; it only connects. Vault authentication beyond a plain token
(AppRole, Kubernetes) and token renewal live here because both entry points need them.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlparse

import httpx
import hvac
import hvac.exceptions
import requests
import structlog

from rotator.adapters.cloudflare import CloudflareClient, RateBudget, RetryPolicy
from rotator.adapters.devices import DeviceRegistry
from rotator.adapters.devices.manual import ManualSettings
from rotator.adapters.vault import Credentials, VaultStore, build_hvac_client, translate
from rotator.config import Settings
from rotator.errors import CloudflareError, ConfigError, VaultError
from rotator.model import PskSetResult, TunnelInfo
from rotator.psk import PskGenerator, PskPolicy
from rotator.rotation.engine import Engine
from rotator.rotation.lease import LeaseManager, LocalProcesses
from rotator.rotation.ports import Device, RecordStore, TunnelApi
from rotator.schedule import Policy
from rotator.secret import Secret


class Observer(Protocol):
    """Every callback the parts make, in one place (the daemon's Metrics implements it)."""

    def observe_cloudflare(self, endpoint: str, status: str) -> None: ...

    def observe_vault(self, operation: str, outcome: str) -> None: ...

    def observe_ratelimit(self, remaining: float) -> None: ...

    def observe_step(self, account: str, step: str, seconds: float) -> None: ...

    def measure_device(self, device: Device) -> Device: ...


@dataclass(frozen=True)
class RunOptions:
    """How the engine behaves for this process, fixed at construction."""

    keep_leases: bool = False  # a daemon keeps its lease between runs (leadership); a one-shot command releases it
    should_stop: Callable[[], bool] | None = None  # checked between batches (shutdown)
    on_progress: Callable[[int, int], None] | None = None  # tunnels settled, of those selected


@dataclass(frozen=True)
class Runtime:
    """The connected parts. The engine and the commands see ports (TunnelApi, RecordStore), never
    the Vault or HTTP client libraries."""

    settings: Settings
    cloudflare: TunnelApi
    store: RecordStore
    leases: LeaseManager
    engine: Engine
    generators: dict[str, PskGenerator]
    vault_auth: VaultAuthenticator
    check_vault: Callable[[], object]  # raises a one-line VaultError when Vault cannot be used
    close: Callable[[], None]
    devices: DeviceRegistry
    measured: dict[str, Device]  # the registry's devices as the engine calls them (with metrics when observed)
    rate_budget: Callable[[], RateBudget | None]  # Cloudflare's rate budget as last reported, if it was

    def budget_view(self) -> dict[str, Any] | None:
        budget = self.rate_budget()
        if budget is None:
            return None
        return {"remaining": budget.remaining, "limit": budget.limit, "reserved": budget.reserve,
                "usable": budget.usable, "resets_in_seconds": round(budget.resets_in, 1)}

    def request_options(self, account_id: str) -> dict[str, Any]:
        """What every RunRequest for the account carries: PSK policy, far-end devices, drift handling."""
        def device_for(tunnel: TunnelInfo) -> Device | None:
            spec = self.devices.spec_for(account_id, tunnel)
            return self.measured[spec.name] if spec is not None else None

        manual = [s.settings.ack_timeout for s in self.settings.devices if isinstance(s.settings, ManualSettings)]
        return {"psk_for": self.psk_for(account_id), "device_for": device_for if self.measured else None,
                "ack_timeout": min(manual) if manual else None, "on_drift": self.settings.rotation.on_drift}

    def is_manual(self, device: str | None) -> bool:
        """Whether the device of this name is a manual one (its keys wait for an operator's ack)."""
        spec = self.devices.spec_named(device) if device else None
        return spec is not None and spec.kind == "manual"

    def schedule_for(self, account_id: str) -> Callable[[TunnelInfo], Policy | None]:
        """A tunnel's schedule: the policy its account's selections name (None: no selection covers
        it); an account the config does not list runs every tunnel on the ``default`` policy."""
        account = next((a for a in self.settings.accounts if a.id == account_id), None)

        def choose(tunnel: TunnelInfo) -> Policy | None:
            name = account.policy_for(tunnel.id, tunnel.name) if account else "default"
            return self.settings.policies[name] if name else None
        return choose

    def psk_for(self, account_id: str) -> Callable[[TunnelInfo], PskGenerator]:
        account = next((a for a in self.settings.accounts if a.id == account_id), None)

        def choose(tunnel: TunnelInfo) -> PskGenerator:
            policy = account.policy_for(tunnel.id, tunnel.name) if account else None
            return self.generators[policy or "default"]

        return choose


class AccountHint:
    """A TunnelApi whose 403 on a tunnel listing asks whether the account id is right: a mistyped id
    and a token without access to the account look the same from here."""

    def __init__(self, api: CloudflareClient) -> None:
        self.api = api

    def list_tunnels(self, account_id: str) -> list[TunnelInfo]:
        try:
            return self.api.list_tunnels(account_id)
        except CloudflareError as exc:
            if exc.status != 403:
                raise
            raise CloudflareError(f"{exc.message}; is the account id {account_id} right?", exc.hint,
                                  status=exc.status, code=exc.code) from exc

    def set_psks(self, account_id: str, psks: Mapping[str, Secret], *, validate_only: bool,
                 deadline: float | None = None) -> PskSetResult:
        return self.api.set_psks(account_id, psks, validate_only=validate_only, deadline=deadline)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.api, name)  # the client's own attributes (rate_budget, rate_reserve) as before


def holder_id() -> str:
    return LocalProcesses().new_holder()


def warn_plain_http(addr: str, log: Any) -> None:
    parsed = urlparse(addr)
    if parsed.scheme != "http":
        return
    host = parsed.hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log.warning("vault_plain_http", addr=addr,
                    message="VAULT_ADDR uses plain HTTP to a non-loopback host: PSKs would cross the network "
                            "unencrypted; use https")


class VaultAuthenticator:
    """Logs in (token, AppRole or Kubernetes), renews the token before expiry, re-logs in when it is gone."""

    def __init__(self, client: hvac.Client, settings: Settings, clock: Callable[[], float] = time.time,
                 credentials: Credentials | None = None) -> None:
        self.client, self.settings, self.clock = client, settings, clock
        auth = settings.vault.auth
        # Redacted from every Vault error text, the login's and the store's (which share this object).
        self.credentials = credentials or Credentials()
        self.credentials.add(settings.vault.token.reveal() if settings.vault.token else None,
                             auth.secret_id.reveal() if auth.secret_id else None)
        self.expires_at: float | None = None
        self.ttl = 0
        self.renewable = False
        self._lock = threading.Lock()

    def login(self) -> None:
        auth = self.settings.vault.auth
        try:
            if auth.method == "approle":
                assert auth.secret_id is not None
                resp = self.client.auth.approle.login(auth.role_id, auth.secret_id.reveal(), mount_point=auth.mount)
                self._note(resp["auth"]["lease_duration"], resp["auth"]["renewable"])
            elif auth.method == "kubernetes":
                try:
                    with open(auth.jwt_file, encoding="utf-8") as fh:
                        jwt = fh.read().strip()
                except OSError as exc:
                    raise ConfigError(f"vault.auth.jwt_file: cannot read {auth.jwt_file} ({exc.strerror})",
                                      "mount the service account token or set vault.auth.jwt_file") from None
                self.credentials.add(jwt)
                resp = self.client.auth.kubernetes.login(auth.role, jwt, mount_point=auth.mount)
                self._note(resp["auth"]["lease_duration"], resp["auth"]["renewable"])
            else:
                data = self.client.auth.token.lookup_self()["data"]
                ttl = int(data.get("ttl") or 0)
                self._note(ttl, bool(data.get("renewable")) and ttl > 0)
        except (KeyError, TypeError, ValueError) as exc:
            raise VaultError(f"Vault login ({auth.method}) answered without the expected auth data",
                             "check VAULT_ADDR points at Vault and the auth mount name") from exc
        except (hvac.exceptions.VaultError, requests.exceptions.RequestException) as exc:
            raise translate(exc, f"Vault login ({auth.method})", secrets=self.credentials.with_token(self.client)) \
                from exc
        self.credentials.with_token(self.client)  # the token the login issued

    def _note(self, ttl: int, renewable: bool) -> None:
        self.ttl = ttl
        self.expires_at = self.clock() + ttl if ttl else None
        self.renewable = renewable

    def maintain(self) -> str:
        """Renew when two thirds of the TTL are gone; log in again when the token is invalid.

        Returns what it did: ``none``, ``renewed`` or ``relogin``.
        """
        with self._lock:
            if self.expires_at is None:
                return "none"
            remaining = self.expires_at - self.clock()
            if remaining > max(60.0, self.ttl / 3):
                return "none"
            if self.renewable:
                try:
                    resp = self.client.auth.token.renew_self()
                    self._note(int(resp["auth"]["lease_duration"]), bool(resp["auth"]["renewable"]))
                    self.credentials.with_token(self.client)
                    return "renewed"
                except (hvac.exceptions.VaultError, requests.exceptions.RequestException, KeyError, TypeError):
                    pass  # the token is gone or not renewable after all: log in afresh below
            if self.settings.vault.auth.method == "token":
                return "none"  # a plain token cannot log in again; readiness reports it
            self.login()
            return "relogin"


def build_vault(settings: Settings, *, log: Any = None,
                observer: Observer | None = None) -> tuple[VaultStore, VaultAuthenticator]:
    """The Vault record store and its authenticator alone (``rotator report`` reads nothing else)."""
    warn_plain_http(settings.vault.addr, log or structlog.get_logger("rotator"))
    client = build_hvac_client(
        settings.vault.addr, settings.vault.token.reveal() if settings.vault.token else None,
        namespace=settings.vault.namespace, cacert=settings.vault.cacert, concurrency=settings.vault.concurrency,
        timeout=settings.vault.timeout,
    )
    authenticator = VaultAuthenticator(client, settings)
    store = VaultStore(client, mount=settings.vault.mount, prefix=settings.vault.prefix,
                       concurrency=settings.vault.concurrency, observe=observer.observe_vault if observer else None,
                       credentials=authenticator.credentials)
    return store, authenticator


def build_runtime(settings: Settings, *, log: Any = None, observer: Observer | None = None,
                  options: RunOptions = RunOptions(), holder: str | None = None) -> Runtime:
    log = log or structlog.get_logger("rotator")
    store, authenticator = build_vault(settings, log=log, observer=observer)
    http = httpx.Client(timeout=httpx.Timeout(settings.cloudflare.timeout, connect=5.0),
                        limits=httpx.Limits(max_connections=8, max_keepalive_connections=8))
    client_cf = CloudflareClient(
        http, base_url=settings.cloudflare.base_url,
        api_token=settings.cloudflare.token.reveal() if settings.cloudflare.token else None,
        email=settings.cloudflare.email or None,
        api_key=settings.cloudflare.key.reveal() if settings.cloudflare.key else None,
        retry=RetryPolicy(attempts=settings.cloudflare.retry_attempts, timeout=settings.cloudflare.retry_timeout,
                          rate_limit_ceiling=settings.cloudflare.rate_limit_ceiling),
        observe=observer.observe_cloudflare if observer else None,
        on_ratelimit=observer.observe_ratelimit if observer else None, rate_reserve=settings.cloudflare.rate_reserve,
    )
    cloudflare = AccountHint(client_cf)
    generators = {name: PskGenerator(p.psk) for name, p in settings.policies.items()}
    generators.setdefault("default", PskGenerator(PskPolicy()))
    leases = LeaseManager(store, holder or holder_id(), ttl=settings.rotation.lease_ttl)
    engine = Engine(cloudflare, store, generators["default"], leases, batch_size=settings.cloudflare.batch_size,
                    on_step=observer.observe_step if observer else None, log=log,
                    apply_guard=settings.cloudflare.timeout, release_lease=not options.keep_leases,
                    should_stop=options.should_stop, on_progress=options.on_progress)

    registry = DeviceRegistry(settings.devices)
    measured = {name: observer.measure_device(d) if observer else d for name, d in registry.devices.items()}

    def close() -> None:
        store.close()
        http.close()
        registry.close()

    return Runtime(settings, cloudflare, store, leases, engine, generators, authenticator, store.check, close,
                   registry, measured, lambda: cloudflare.api.rate_budget)


def preflight(runtime: Runtime) -> None:
    """Log in and check the mount before doing anything; raises a one-line RotatorError."""
    runtime.vault_auth.login()
    runtime.check_vault()
