"""Every metric, defined once against an injected registry. Prefix ``psk_rotator_``.

Timestamps, not ages (Prometheus computes ages with ``time()``); counters end in ``_total``.
Labels carry account and tunnel ids, never a key.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from rotator import __version__
from rotator.adapters.devices._common import DeviceWrapper
from rotator.model import Outcome
from rotator.rotation.ports import Device, DeviceResult, DeviceStatus, DeviceTunnel

if TYPE_CHECKING:
    from rotator.service.inventory import TunnelView

TUNNEL = ["account", "tunnel", "tunnel_name"]
CALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# The label values known before anything happens (see Metrics.known).
TRIGGERS = ("schedule", "api")
DEVICE_ACTIONS = ("deliver", "verify", "rollback")
CLOUDFLARE_ENDPOINTS = ("list", "psk_validate", "psk_apply")


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        p = "psk_rotator_"
        self.rotations = Counter(p + "rotations", "Tunnel rotation outcomes (dry runs not counted)",
                                 ["account", "result"], registry=registry)
        self.runs = Counter(p + "runs", "Rotation runs by trigger and whether all was done",
                            ["account", "trigger", "ok"], registry=registry)
        self.last_success = Gauge(p + "last_success_timestamp_seconds",
                                  "When the tunnel's PSK last became current (UNIX time)", TUNNEL,
                                  registry=registry)
        self.next_due = Gauge(p + "next_rotation_timestamp_seconds", "When the tunnel is next due (UNIX time)",
                              TUNNEL, registry=registry)
        self.max_age = Gauge(p + "policy_max_age_seconds", "The longest a tunnel's PSK may live under its policy",
                             TUNNEL, registry=registry)
        self.step_duration = Histogram(p + "step_duration_seconds", "Duration of each rotation step", ["step"],
                                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
                                       registry=registry)
        self.cloudflare_requests = Counter(p + "cloudflare_requests", "Cloudflare API requests",
                                           ["endpoint", "status"], registry=registry)
        self.vault_operations = Counter(p + "vault_operations", "Vault operations", ["operation", "outcome"],
                                        registry=registry)
        self.pending = Gauge(p + "tunnels_pending", "Tunnels whose Vault record holds a pending key",
                             ["account"], registry=registry)
        self.ratelimit_remaining = Gauge(p + "cloudflare_ratelimit_remaining",
                                         "Requests left in Cloudflare's rate-limit window, as last reported",
                                         registry=registry)
        self.leader = Gauge(p + "leader", "1 when this replica holds the account lease", ["account"],
                            registry=registry)
        self.vault_up = Gauge(p + "vault_up", "1 when Vault answered the last check with a valid token",
                              registry=registry)
        self.cloudflare_up = Gauge(p + "cloudflare_up", "1 when Cloudflare accepted the token on the last call",
                                   registry=registry)
        self.drift_detected = Counter(p + "drift_detected", "Tunnels found with a key set outside the rotator",
                                      ["account"], registry=registry)
        self.drifted = Gauge(p + "tunnel_drifted", "1 while Cloudflare reports a key newer than the one we applied",
                             TUNNEL, registry=registry)
        self.device_calls = Counter(p + "device_calls", "Far-end device calls by action (deliver, verify, "
                                    "rollback) and result (ok, failed, unknown, waiting)",
                                    ["device", "action", "result"], registry=registry)
        self.device_call_duration = Histogram(p + "device_call_duration_seconds", "Duration of far-end device calls",
                                              ["device", "action"], buckets=CALL_BUCKETS, registry=registry)
        self.waiting_ack = Gauge(p + "tunnels_waiting_ack",
                                 "Tunnels whose pending key waits for an operator's acknowledgement (manual devices)",
                                 ["account"], registry=registry)
        self.partner_down = Gauge(p + "partner_down_tunnels",
                                  "Tunnels whose rotation waits because their redundant partner is not up "
                                  "(their deliver would take them down)", ["account"], registry=registry)
        self.build_info = Gauge(p + "build_info", "Build information", ["version"], registry=registry)
        self.build_info.labels(version=__version__).set(1)
        self.cloudflare_ok: bool | None = None  # the token's standing on the last call, for readiness

    def known(self, accounts: Sequence[str], devices: Sequence[str]) -> None:
        """Export every label set known at start at 0: accounts x results, runs by trigger and ok, drift,
        devices x actions x results, Cloudflare's 429s. A counter whose series first appears at 1 has no
        earlier sample, so ``increase()`` over it stays 0 and an alert on the first failure after a
        restart never fires (issue 20, item 7; Prometheus docs, "Avoid missing metrics":
        https://prometheus.io/docs/practices/instrumentation/#avoid-missing-metrics)."""
        for account in accounts:
            for result in Outcome:
                self.rotations.labels(account=account, result=str(result))
            for trigger in TRIGGERS:
                for ok in ("true", "false"):
                    self.runs.labels(account=account, trigger=trigger, ok=ok)
            self.drift_detected.labels(account=account)
            self.pending.labels(account=account).set(0)
            self.waiting_ack.labels(account=account).set(0)
            self.partner_down.labels(account=account).set(0)
            self.leader.labels(account=account).set(0)
        for device in devices:
            for action in DEVICE_ACTIONS:
                for status in DeviceStatus:
                    self.device_calls.labels(device=device, action=action, result=str(status))
        for endpoint in CLOUDFLARE_ENDPOINTS:
            self.cloudflare_requests.labels(endpoint=endpoint, status="429")

    def observe_cloudflare(self, endpoint: str, status: str) -> None:
        self.cloudflare_requests.labels(endpoint=endpoint, status=status).inc()
        if status in ("401", "403"):
            self.cloudflare_ok = False
            self.cloudflare_up.set(0)
        elif status.startswith("2"):
            self.cloudflare_ok = True
            self.cloudflare_up.set(1)

    def observe_tunnel(self, account: str, view: TunnelView) -> None:
        """Per-tunnel series from the one view of a tunnel (service/inventory.py)."""
        labels = {"account": account, "tunnel": view.tunnel_id, "tunnel_name": view.name}
        if view.next_due is not None:
            self.next_due.labels(**labels).set(view.next_due)
        if view.last_rotated is not None:
            self.last_success.labels(**labels).set(view.last_rotated)
        if view.max_age:
            self.max_age.labels(**labels).set(view.max_age)
        self.drifted.labels(**labels).set(1 if view.drifted else 0)

    def measure_device(self, device: Device) -> Device:
        return MeasuredDevice(device, self)

    def observe_ratelimit(self, remaining: float) -> None:
        self.ratelimit_remaining.set(remaining)

    def observe_vault(self, operation: str, outcome: str) -> None:
        self.vault_operations.labels(operation=operation, outcome=outcome).inc()

    def observe_step(self, account: str, step: str, seconds: float) -> None:
        self.step_duration.labels(step=step).observe(seconds)


class MeasuredDevice(DeviceWrapper):
    """A Device (rotation/ports.py) that counts each tunnel's result and times each call.

    Wiring wraps every configured device in one, so the engine and the device adapters stay
    free of metrics. Every other attribute is the wrapped device's (DeviceWrapper forwards each
    one the port names).
    """

    def __init__(self, device: Device, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(device)
        self.metrics, self.clock = metrics, clock

    def _measured(self, action: str, call: Callable[..., dict[str, DeviceResult]], account_id: str,
                  rotation_id: str, tunnels: Sequence[DeviceTunnel], deadline: float) -> dict[str, DeviceResult]:
        started = self.clock()
        try:
            results = call(account_id, rotation_id, tunnels, deadline=deadline)
        finally:
            self.metrics.device_call_duration.labels(device=self.name, action=action).observe(self.clock() - started)
        for tunnel in tunnels:
            result = results.get(tunnel.tunnel_id)
            status = result.status.value if result is not None else "unknown"
            self.metrics.device_calls.labels(device=self.name, action=action, result=status).inc()
        return results

    def deliver(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
                deadline: float) -> dict[str, DeviceResult]:
        return self._measured("deliver", self.device.deliver, account_id, rotation_id, tunnels, deadline)

    def verify(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
               deadline: float) -> dict[str, DeviceResult]:
        return self._measured("verify", self.device.verify, account_id, rotation_id, tunnels, deadline)

    def rollback(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
                 deadline: float) -> dict[str, DeviceResult]:
        return self._measured("rollback", self.device.rollback, account_id, rotation_id, tunnels, deadline)
