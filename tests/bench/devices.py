"""Device benchmark pieces: a trivial exec hook, the simulated device at 200 ms per verification, and
a measurement of the device steps alone (deliver + verify of N tunnels, no Cloudflare, no Vault).

    .venv/bin/python tests/bench/devices.py [N]          the device steps alone
    .venv/bin/python tests/bench/devices.py engine [N]   through the engine, against the floor

For the issue's end-to-end figure (1,000 tunnels through the engine with a device), a benchmark
scenario configures ``[[devices]]`` with ``trivial_hook(dir)`` (exec) or with ``sim_device()``
(webhook) and compares the wall time with the Cloudflare-only run and with the floor
``floor_seconds``. Here the device steps are measured the way the engine is expected to drive
them: Cloudflare batch by batch (``batch``), one device call per action and batch; the webhook
device spreads a call over ``concurrency`` parallel POSTs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rotator.adapters.devices.exec import ExecDevice
from rotator.adapters.devices.webhook import WebhookDevice
from rotator.rotation.ports import Device, DeviceTunnel
from rotator.secret import Secret
from rotator.sim.device import DeviceSim, serve

VERIFY_LATENCY, BATCH, CONCURRENCY = 0.2, 100, 16


def trivial_hook(directory: str) -> str:
    """An exec hook that reads its input and succeeds: the cost of the exec machinery alone."""
    path = os.path.join(directory, "trivial-hook")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("#!/bin/sh\ncat >/dev/null\n")
    os.chmod(path, 0o755)
    return path


@contextlib.contextmanager
def sim_device(verify_latency: float = VERIFY_LATENCY) -> Iterator[tuple[DeviceSim, str, str]]:
    """The simulated device on loopback: (sim, webhook url, path of a file holding its signing key)."""
    sim = DeviceSim()
    sim.set_verify_latency(verify_latency)
    with tempfile.TemporaryDirectory(prefix="bench-device-") as tmp, serve(sim) as url:
        secret_file = os.path.join(tmp, "device.key")
        with open(secret_file, "w", encoding="utf-8") as fh:
            fh.write(sim.secret)
        yield sim, url, secret_file


def floor_seconds(n: int, verify_latency: float, concurrency: int) -> float:
    """The device part of the issue's floor: verification time / concurrency."""
    return n * verify_latency / concurrency


def drive(device: Device, tunnels: list[DeviceTunnel], batch: int) -> dict[str, float]:
    """Deliver and verify every tunnel, batch after batch, one call per action and batch, as the engine
    does; the device spreads a call over its own ``concurrency``."""
    timings = {"deliver": 0.0, "verify": 0.0, "failures": 0.0}
    for start in range(0, len(tunnels), batch):
        chunk = tunnels[start:start + batch]
        for action in ("deliver", "verify"):
            t0 = time.perf_counter()
            results = getattr(device, action)("0" * 32, "bench", chunk, deadline=time.monotonic() + 120)
            timings["failures"] += sum(1 for r in results.values() if not r.ok)
            timings[action] += time.perf_counter() - t0
    timings["wall"] = timings["deliver"] + timings["verify"]
    return timings


def tunnels_of(n: int) -> list[DeviceTunnel]:
    return [DeviceTunnel(f"{i:032x}", f"bench-{i}", Secret(os.urandom(16).hex()), Secret(os.urandom(16).hex()))
            for i in range(n)]


def run(n: int = 1000, batch: int = BATCH, concurrency: int = CONCURRENCY,
        verify_latency: float = VERIFY_LATENCY) -> dict[str, dict[str, float]]:
    tunnels = tunnels_of(n)
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-hook-") as tmp:
        # One process per action and batch, as the exec contract says.
        out["exec"] = drive(ExecDevice("bench-exec", [trivial_hook(tmp)]), tunnels, batch)
        out["exec"]["processes"] = 2 * math.ceil(n / batch)
    with sim_device(verify_latency) as (sim, url, _):
        device = WebhookDevice("bench-sim", url, Secret(sim.secret), concurrency=concurrency)
        try:
            out["sim"] = drive(device, tunnels, batch)
        finally:
            device.close()
        out["sim"]["floor"] = floor_seconds(n, verify_latency, concurrency)
        out["sim"]["ratio"] = out["sim"]["wall"] / out["sim"]["floor"]
        out["sim"]["requests"] = sum(sim.request_counts().values())
    return {k: {m: round(v, 3) for m, v in d.items()} for k, d in out.items()}


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)))
