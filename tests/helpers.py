"""Test helpers: build a runtime against simulators, run the CLI, assert the invariant, collect secrets."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from rotator import config
from rotator.sim import Simulators
from rotator.wiring import Runtime, build_runtime, preflight

# Output and secrets the automatic capture cannot see (subprocesses, keys made by hand); the session-wide
# scan (tests/secret_scan.py, run from tests/conftest.py) adds them to what it collects itself.
OUTPUTS: list[str] = []
SECRETS: set[str] = set()

PREFIX = "cloudflare/magic-ipsec"


def remember_secrets(sims: Simulators) -> None:
    SECRETS.update({sims.vault_token, sims.vault.root_token, sims.cloudflare_api_token})
    SECRETS.update(h.psk for h in sims.cloudflare.applied_history())
    for acc in sims.tunnels_by_account:
        SECRETS.update(p for p in sims.cloudflare.psks(acc).values() if p)


def write_config(tmp_path, text: str) -> str:
    path = tmp_path / "rotator.toml"
    path.write_text(text)
    return str(path)


def runtime(sims: Simulators, config_text: str = "", tmp_path=None, holder: str | None = None,
            **env_overrides: str) -> Runtime:
    env = {**sims.env(), **env_overrides}
    path = write_config(tmp_path, config_text) if config_text else None
    settings = config.load(path, env=env)
    rt = build_runtime(settings, holder=holder)
    preflight(rt)
    return rt


@contextlib.contextmanager
def custom_runtime(sims: Simulators, config_text: str, tmp_path, holder: str | None = None) -> Iterator[Runtime]:
    """A logged-in runtime with its own config file, closed afterwards."""
    rt = runtime(sims, config_text, tmp_path, holder=holder)
    try:
        yield rt
    finally:
        rt.close()


def run_cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "rotator", *args], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)
    OUTPUTS.extend([proc.stdout, proc.stderr])
    return proc


def run_on_a_terminal(args: list[str], env: dict[str, str], timeout: float = 120) -> tuple[int, str, str]:
    """The CLI with stderr on a pseudo-terminal and stdout on a pipe: (exit code, stdout, terminal text)."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "rotator", *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    out, _ = proc.communicate(timeout=timeout)
    chunks = []
    for _ in range(10000):  # bounded: the child has exited, the terminal holds what it wrote
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data.decode(errors="replace"))
    os.close(master)
    tty = "".join(chunks)
    OUTPUTS.extend([out, tty])
    return proc.returncode, out, tty


def start_cli(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "rotator", *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition: Any, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll a condition (synchronisation on observable state, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def record(sims: Simulators, account: str, tunnel: str) -> dict[str, Any] | None:
    return sims.vault.read_data(f"{PREFIX}/{account}/{tunnel}")


def assert_invariant(sims: Simulators, account: str, strict: bool = False) -> int:
    """docs/design.md section 2. Returns how many managed tunnels were checked.

    Non-strict: for every managed tunnel, Cloudflare's PSK is the latest record's psk or pending_psk.
    Strict (no rotation in flight): it is psk, and nothing is pending.
    """
    checked = 0
    for tunnel in sims.tunnels_by_account[account]:
        data = record(sims, account, tunnel)
        if not data or not (data.get("psk") or data.get("pending_psk")):
            continue  # never rotated by us: not managed yet
        checked += 1
        held = sims.cloudflare.psk_of(account, tunnel)
        if strict:
            assert held == data.get("psk"), f"{tunnel}: Cloudflare holds a key that is not the record's psk"
            assert "pending_psk" not in data and data["state"] == "active", f"{tunnel}: still pending"
        else:
            assert held in (data.get("psk"), data.get("pending_psk")), \
                f"{tunnel}: Cloudflare holds a key Vault does not have (invariant broken)"
    return checked


def assert_both_ends(sims: Simulators, account: str, held: Any, strict: bool = False) -> int:
    """docs/design.md section 2 for both ends: Cloudflare's key (``assert_invariant``) and the far end's,
    ``held(account, tunnel_id)`` (None: the device holds no key for the tunnel), each readable from the
    latest record, as psk or pending_psk (strictly psk once nothing is in flight)."""
    checked = assert_invariant(sims, account, strict=strict)
    for tid in sims.tunnels_by_account[account]:
        data = record(sims, account, tid) or {}
        key = held(account, tid)
        if key is None or not (data.get("psk") or data.get("pending_psk")):
            continue
        if strict:
            assert key == data.get("psk"), f"{tid}: the device holds a key that is not the record's psk"
        else:
            assert key in (data.get("psk"), data.get("pending_psk")), f"{tid}: the device holds a key Vault lacks"
    return checked


def kill_at_crash_point(argv: list[str], env: dict[str, str], point: str) -> None:
    """Run a crash child (tests/ike/crash_child.py, tests/devices/firewall_crash_child.py) until it prints
    ``CRASH-POINT <point>``, then SIGKILL it; its output goes to the secret scan."""
    proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen: list[str] = []  # the engine logs on stdout too; the child ends by itself within 60 s (EOF)
        while not (seen and seen[-1].startswith("CRASH-POINT")) and len(seen) < 1000:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line:
                break
            seen.append(line)
        assert seen and seen[-1].strip() == f"CRASH-POINT {point}", (seen[-3:], proc.stderr and proc.stderr.read())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        OUTPUTS.extend([proc.stdout.read() if proc.stdout else "", proc.stderr.read() if proc.stderr else ""])
