"""A rotator process for the crash tests: one rotation through the engine with the strongswan device
on the lab's site, which stops dead at a crash point and waits there to be SIGKILLed.

    python tests/ike/crash_child.py ACCOUNT VICI_SOCKET POINT HOLDER   (Vault/Cloudflare from the environment)

POINT: ``delivered`` (the device holds the new keys, Cloudflare has not been asked to apply them) or
``applied`` (Cloudflare and the edge hold them, verification has not started). At the point it prints
``CRASH-POINT <point>`` and sleeps at most 60 s.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rotator import config
from rotator.adapters.devices._common import DeviceWrapper
from rotator.rotation.engine import RunRequest
from rotator.wiring import build_runtime, preflight


class StopsDead(DeviceWrapper):
    def __init__(self, device, point: str) -> None:
        super().__init__(device)
        self.point = point

    def _crash(self) -> None:
        print(f"CRASH-POINT {self.point}", flush=True)
        time.sleep(60)
        sys.exit("not killed within 60 s")

    def deliver(self, account_id, rotation_id, tunnels, *, deadline):
        out = self.device.deliver(account_id, rotation_id, tunnels, deadline=deadline)
        if self.point == "delivered":
            self._crash()
        return out

    def verify(self, account_id, rotation_id, tunnels, *, deadline):
        if self.point == "applied":
            self._crash()
        return self.device.verify(account_id, rotation_id, tunnels, deadline=deadline)


def main() -> None:
    from rotator.adapters.devices.strongswan import StrongSwanDevice  # lands with the devices track

    account, socket_path, point, holder = sys.argv[1:5]
    device = StopsDead(StrongSwanDevice("lab-site", socket_path, owners=["{tunnel_id}.site.lab"], timeout=5.0,
                                        concurrency=16), point)
    rt = build_runtime(config.load(None, env=dict(os.environ)), holder=holder)
    preflight(rt)
    rt.engine.run(RunRequest(account, device_for=lambda tunnel: device))
    sys.exit("the crash point was never reached")


if __name__ == "__main__":
    main()
