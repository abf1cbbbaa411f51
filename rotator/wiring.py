"""Builds the parts from Settings: clients, store, engine. Shared by the CLI and the daemon.

Nothing here decides anything; it only connects. Vault authentication beyond a plain token
(AppRole, Kubernetes) and token renewal live here because both entry points need them.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import httpx
import hvac
import hvac.exceptions
import requests
import structlog

from rotator.adapters.cloudflare import CloudflareClient, RetryPolicy
from rotator.adapters.vault import VaultStore, build_hvac_client, translate
from rotator.config import Settings
from rotator.errors import ConfigError, VaultError
from rotator.model import TunnelInfo
from rotator.psk import PskGenerator, PskPolicy
from rotator.rotation.engine import Engine
from rotator.rotation.lease import LeaseManager, LocalProcesses


@dataclass
class Runtime:
    settings: Settings
    hvac: hvac.Client
    http: httpx.Client
    store: VaultStore
    cloudflare: CloudflareClient
    leases: LeaseManager
    engine: Engine
    generators: dict[str, PskGenerator]
    vault_auth: VaultAuthenticator

    def psk_for(self, account_id: str) -> Callable[[TunnelInfo], PskGenerator]:
        account = next((a for a in self.settings.accounts if a.id == account_id), None)

        def choose(tunnel: TunnelInfo) -> PskGenerator:
            policy = account.policy_for(tunnel.id, tunnel.name) if account else None
            return self.generators[policy or "default"]

        return choose

    def close(self) -> None:
        self.store.close()
        self.http.close()


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

    def __init__(self, client: hvac.Client, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.client, self.settings, self.clock = client, settings, clock
        self.expires_at: float | None = None
        self.ttl = 0
        self.renewable = False
        self._lock = threading.Lock()

    def login(self) -> None:
        auth = self.settings.vault_auth
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
            raise translate(exc, f"Vault login ({auth.method})") from exc

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
                    return "renewed"
                except (hvac.exceptions.VaultError, requests.exceptions.RequestException, KeyError, TypeError):
                    pass  # the token is gone or not renewable after all: log in afresh below
            if self.settings.vault_auth.method == "token":
                return "none"  # a plain token cannot log in again; readiness reports it
            self.login()
            return "relogin"


def build_runtime(settings: Settings, *, log: Any = None, observe_cf: Any = None, observe_vault: Any = None,
                  on_ratelimit: Any = None, on_step: Any = None, holder: str | None = None) -> Runtime:
    log = log or structlog.get_logger("rotator")
    warn_plain_http(settings.vault_addr, log)
    client = build_hvac_client(
        settings.vault_addr, settings.vault_token.reveal() if settings.vault_token else None,
        namespace=settings.vault_namespace, cacert=settings.vault_cacert, concurrency=settings.vault_concurrency,
        timeout=settings.vault_timeout,
    )
    authenticator = VaultAuthenticator(client, settings)
    http = httpx.Client(timeout=httpx.Timeout(settings.cloudflare_timeout, connect=5.0),
                        limits=httpx.Limits(max_connections=8, max_keepalive_connections=8))
    cloudflare = CloudflareClient(
        http, base_url=settings.cloudflare_base_url,
        api_token=settings.cloudflare_token.reveal() if settings.cloudflare_token else None,
        email=settings.cloudflare_email or None,
        api_key=settings.cloudflare_key.reveal() if settings.cloudflare_key else None,
        retry=RetryPolicy(attempts=settings.retry_attempts, timeout=settings.retry_timeout,
                          rate_limit_ceiling=settings.rate_limit_ceiling),
        observe=observe_cf, on_ratelimit=on_ratelimit,
    )
    store = VaultStore(client, mount=settings.vault_mount, prefix=settings.vault_prefix,
                       concurrency=settings.vault_concurrency, observe=observe_vault)
    generators = {name: PskGenerator(p.psk) for name, p in settings.policies.items()}
    generators.setdefault("default", PskGenerator(PskPolicy()))
    leases = LeaseManager(store, holder or holder_id(), ttl=settings.lease_ttl)
    engine = Engine(cloudflare, store, generators["default"], leases, batch_size=settings.batch_size,
                    on_step=on_step, log=log, apply_guard=settings.cloudflare_timeout)
    return Runtime(settings, client, http, store, cloudflare, leases, engine, generators, authenticator)


def preflight(runtime: Runtime) -> None:
    """Log in and check the mount before doing anything; raises a one-line RotatorError."""
    runtime.vault_auth.login()
    runtime.store.check()
