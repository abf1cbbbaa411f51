"""Shared pieces of the benchmarks: simulators in their own process, request counts, resource use."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Any

import httpx


@contextmanager
def simulators(accounts: int, tunnels: int, cf_latency: float, vault_latency: float):
    """`rotator sim --json` in a subprocess, so the simulators never share our CPU time or GIL."""
    proc = subprocess.Popen([sys.executable, "-m", "rotator", "sim", "--json", "--accounts", str(accounts),
                             "--tunnels", str(tunnels), "--cloudflare-latency", str(cf_latency),
                             "--vault-latency", str(vault_latency)], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        info["pid"] = proc.pid  # its CPU time is the simulators' share of a run (sim_cpu_seconds)
        info["vault_root"] = info["vault_addr"]
        info["cf_root"] = info["cloudflare_base_url"].removesuffix("/client/v4")
        # Benchmarks measure cost, not the rate limit: lift it so scenarios do not throttle each other.
        httpx.post(info["cf_root"] + "/_sim/control", json={"op": "set_rate_limit", "limit": 10**9, "window": 300})
        yield info
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@contextmanager
def device_process(workdir: str, verify_latency: float):
    """The simulated device (rotator/sim/device.py) in its own process, as the simulators are:
    yields (webhook url, path of its signing key, url of its state). Stops when its stdin closes."""
    code = ("import json, sys; from rotator.sim import device\n"
            f"dev = device.start({workdir!r}, verify_latency={verify_latency!r})\n"
            "print(json.dumps({'url': dev.url, 'key': dev.secret_file, 'state': dev.server.url + '/_sim/state'}),"
            " flush=True)\n"
            "sys.stdin.read(); dev.stop()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        yield info["url"], info["key"], info["state"]
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def counts(info: dict[str, Any]) -> tuple[int, int]:
    """Total requests served so far by (Cloudflare, Vault)."""
    cf, vault = routes(info)
    return sum(cf.values()), sum(vault.values())


def routes(info: dict[str, Any]) -> tuple[dict[str, int], dict[str, int]]:
    """Requests served so far by (Cloudflare, Vault), per route."""
    cf = httpx.get(info["cf_root"] + "/_sim/state").json()["result"]["request_counts"]
    vault = httpx.get(info["vault_root"] + "/_sim/state").json()["result"]["request_counts"]
    return cf, vault


def sim_cpu_seconds(info: dict[str, Any]) -> float:
    """CPU time (user + system) the simulators' process has used so far."""
    import psutil

    times = psutil.Process(info["pid"]).cpu_times()
    return float(times.user + times.system)


def env_of(info: dict[str, Any]) -> dict[str, str]:
    return {"VAULT_ADDR": info["vault_addr"], "VAULT_TOKEN": info["vault_token"],
            "CLOUDFLARE_API_TOKEN": info["cloudflare_api_token"], "CLOUDFLARE_BASE_URL": info["cloudflare_base_url"]}


class Meter:
    """Wall time, this process's CPU time and peak RSS over a block."""

    def __enter__(self) -> Meter:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0
        self.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {sys.version.split()[0]}"
