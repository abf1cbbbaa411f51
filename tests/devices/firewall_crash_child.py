"""A rotator process for the firewall crash tests: one rotation through the engine with a firewall kind,
stopping dead at a crash point to be SIGKILLed there (tests/ike/crash_child.py's ``StopsDead``).

    python tests/devices/firewall_crash_child.py ACCOUNT DEVICE_JSON POINT HOLDER   (Vault/Cloudflare from the environment)

DEVICE_JSON: a file holding one ``[[devices]]`` table as JSON. POINT: ``delivered`` or ``applied``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rotator import config
from rotator.adapters.devices import build_device, parse_devices
from rotator.rotation.engine import RunRequest
from rotator.wiring import build_runtime, preflight
from tests.ike.crash_child import StopsDead


def main() -> None:
    account, device_json, point, holder = sys.argv[1:5]
    (spec,) = parse_devices([json.loads(Path(device_json).read_text())])
    device = StopsDead(build_device(spec), point)
    rt = build_runtime(config.load(None, env=dict(os.environ)), holder=holder)
    preflight(rt)
    rt.engine.run(RunRequest(account, device_for=lambda tunnel: device))
    sys.exit("the crash point was never reached")


if __name__ == "__main__":
    main()
