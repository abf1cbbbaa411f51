"""The ``manual`` device: for far ends without an API (pfSense, UniFi, Aruba EdgeConnect, ...).

Nothing is pushed anywhere; an operator types the key into the device and acknowledges it
(``rotator ack``, or the admin API). So:

- ``deliver`` answers WAITING for every tunnel: the key stays pending until acknowledged, and only
  then is it applied at Cloudflare.
- ``verify`` cannot be done by the rotator: ``verify = false`` is forced for this kind (setting it
  true is a configuration error). If it is called anyway it answers OK with a reason saying that
  the operator's acknowledgement stands for the proof.
- ``rollback`` answers WAITING: an operator must put the old key back and acknowledge it; until
  then both keys stay readable in the record (the device may hold either).
- ``ack_timeout``: how long a key may wait for its acknowledgement before the engine gives up on
  it (rolls back and alerts); exposed here for the engine, which owns the clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rotator.adapters.devices._common import DeviceBase, DeviceSpec, Fields, every
from rotator.rotation.ports import DeviceResult, DeviceStatus, DeviceTunnel, KeyRules
from rotator.secret import Secret

DEFAULT_ACK_TIMEOUT = "24h"
KIND = "manual"
KEY_RULES = KeyRules()  # an operator types it in: any printable ASCII key
INTERRUPTS = False
PROOF = "operator_ack"
VERIFIES = False  # the rotator cannot verify: verify = false is forced


@dataclass(frozen=True)
class ManualSettings:
    ack_timeout: float = 86400.0

    def masked(self) -> dict[str, object]:
        return {"ack_timeout": self.ack_timeout}


def parse_settings(f: Fields) -> ManualSettings:
    return ManualSettings(f.duration("ack_timeout", DEFAULT_ACK_TIMEOUT))


def build(spec: DeviceSpec) -> ManualDevice:
    s = spec.settings
    assert isinstance(s, ManualSettings)
    return ManualDevice(spec.name, ack_timeout=s.ack_timeout, timeout=spec.timeout)


def secrets(settings: ManualSettings) -> list[Secret]:
    return []


class ManualDevice(DeviceBase):
    kind = "manual"
    verifies = False  # read by the engine: a manual device is never asked to verify
    proof = PROOF

    def __init__(self, name: str, *, ack_timeout: float = 86400.0, timeout: float = 60.0) -> None:
        self.name = name
        self.ack_timeout: float | None = ack_timeout
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"ManualDevice(name={self.name!r})"

    def deliver(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
                deadline: float) -> dict[str, DeviceResult]:
        return every(tunnels, DeviceStatus.WAITING,
                     f"waiting for an operator to acknowledge that {self.name} holds the new key "
                     f"(rotator ack --account {account_id} --tunnel <id or name> --rotation <id> --holds new)")

    def verify(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
               deadline: float) -> dict[str, DeviceResult]:
        return every(tunnels, DeviceStatus.OK,
                     "not verified: a manual device cannot verify; the operator's acknowledgement stands for it")

    def rollback(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
                 deadline: float) -> dict[str, DeviceResult]:
        return every(tunnels, DeviceStatus.WAITING,
                     f"waiting for an operator to put the previous key back on {self.name} and acknowledge it "
                     f"(rotator ack --account {account_id} --tunnel <id or name> --rotation <id> --holds previous)")
