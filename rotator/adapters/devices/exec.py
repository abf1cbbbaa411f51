"""The ``exec`` device: one process per action and batch, the JSON of docs/design.md section 9 on stdin,
optional results on stdout.

- The key travels on stdin only: never in argv, never in the environment. The hook gets a minimal
  environment (PATH, LANG and the names listed in ``pass_env``), so nothing secret-looking that the
  rotator holds (VAULT_TOKEN, CLOUDFLARE_API_TOKEN, ...) reaches it.
- Total deadline: the hook runs in its own session; past the deadline its whole process group is
  killed and every tunnel of the call is UNKNOWN (it may have pushed the key before it hung).
- A tunnel missing from ``results`` takes the exit status: 0 ok, anything else failed, with the last
  line of stderr (redacted against the batch's keys) as the reason. A hook killed by a signal it was
  not sent by us also leaves the outcome unknown: it may have died half-way.
- An unreadable stdout makes every tunnel without a usable answer UNKNOWN, with the reason.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import structlog

from rotator.adapters.devices._common import (
    ActionDevice,
    DeviceSpec,
    Fields,
    Garbage,
    batch_keys,
    every,
    last_line,
    one_line,
    parse_results,
    request_body,
    strangers_note,
    with_note,
)
from rotator.rotation.ports import DeviceResult, DeviceStatus, DeviceTunnel, KeyRules
from rotator.secret import Secret

log = structlog.get_logger("rotator.devices.exec")
STDERR_LINES = 20  # the last lines of a hook's stderr that are logged
STDERR_LOG_MAX = 2000

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|PSK|KEY|CREDENTIAL|AUTH", re.IGNORECASE)
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
KILL_GRACE = 2.0  # seconds to reap a killed group before giving up on it
MAX_OUTPUT = 1 << 20  # bytes of stdout kept; stderr keeps its last MAX_OUTPUT bytes (the reason is its last line)


KIND = "exec"
KEY_RULES = KeyRules()  # the hook's business: any printable ASCII key
INTERRUPTS = False
PROOF = "ike_reauth"


@dataclass(frozen=True)
class ExecSettings:
    command: tuple[str, ...]
    pass_env: tuple[str, ...] = ()

    def masked(self) -> dict[str, object]:
        return {"command": list(self.command), "pass_env": list(self.pass_env)}


def parse_settings(f: Fields) -> ExecSettings:
    command = f.texts("command", required=True)
    if not command:
        raise f.fail("command", "is empty", "give the hook's argv, e.g. [\"/usr/local/bin/push-psk\"]")
    program = command[0]
    found = shutil.which(program) if os.sep not in program else (program if os.access(program, os.X_OK) else None)
    if found is None or not os.path.isfile(found):
        raise f.fail("command", f"{program!r} is not an executable file",
                     "give the absolute path of the hook and make it executable (chmod +x)")
    pass_env = f.texts("pass_env")
    for i, name in enumerate(pass_env):
        if not ENV_NAME.match(name):
            raise f.fail(f"pass_env[{i}]", f"{name!r} is not an environment variable name", "e.g. HTTPS_PROXY")
        if SECRET_NAME.search(name):
            raise f.fail(f"pass_env[{i}]", f"{name} looks like a secret and is never passed to a hook",
                         "let the hook read its credentials from a file it owns")
    return ExecSettings(tuple(command), tuple(pass_env))


def build(spec: DeviceSpec) -> ExecDevice:
    s = spec.settings
    assert isinstance(s, ExecSettings)
    return ExecDevice(spec.name, s.command, timeout=spec.timeout, verify=spec.verify, pass_env=s.pass_env)


def secrets(settings: ExecSettings) -> list[Secret]:
    return []


class ExecDevice(ActionDevice):
    kind = "exec"

    def __init__(self, name: str, command: Sequence[str], *, timeout: float = 60.0, verify: bool = True,
                 pass_env: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.command = tuple(command)
        self.timeout = timeout
        self.verifies = verify
        source = os.environ if environ is None else environ
        env = {"PATH": source.get("PATH") or DEFAULT_PATH, "LANG": "C.UTF-8"}
        env.update({n: source[n] for n in pass_env if n in source and not SECRET_NAME.search(n)})
        self.env = env

    def __repr__(self) -> str:
        return f"ExecDevice(name={self.name!r}, command={self.command[0]!r})"

    def call(self, action: str, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel],
             deadline: float) -> dict[str, DeviceResult]:
        if not tunnels:
            return {}
        keys = batch_keys(tunnels)
        started = time.monotonic()
        budget = min(deadline, started + self.timeout) - started
        if budget <= 0:
            return every(tunnels, DeviceStatus.FAILED, "not started: no time left before the deadline")
        body = request_body(action, self.name, account_id, rotation_id, tunnels)
        try:
            proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=self.env, start_new_session=True, close_fds=True)
        except OSError as exc:
            return every(tunnels, DeviceStatus.FAILED, f"cannot run {self.command[0]}: {exc.strerror or exc}")
        try:
            stdout, stderr, overflow = _exchange(proc, body, started + budget)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            log.warning("device_hook_killed", device=self.name, action=action, tunnels=len(tunnels),
                        timeout=round(budget, 3))
            return every(tunnels, DeviceStatus.UNKNOWN,
                         f"the hook did not finish within {budget:.0f}s and was killed: the device may hold the key")
        except OSError as exc:  # its pipes failed under us: what it did is unknown
            self._kill(proc)
            return every(tunnels, DeviceStatus.UNKNOWN,
                         f"lost the hook's pipes ({exc.strerror or type(exc).__name__}): the device may hold the key")
        finally:
            if proc.returncode is None:  # an exception other than the timeout: never leave it behind
                self._kill(proc)
            _close_pipes(proc)
        if overflow:
            log.warning("device_hook_flood", device=self.name, action=action, limit=MAX_OUTPUT)
            return every(tunnels, DeviceStatus.UNKNOWN, f"the hook wrote more than {MAX_OUTPUT} bytes on stdout, "
                                                        f"exit status {proc.returncode}: the device may hold the key")
        return self._judge(action, proc.returncode, stdout, stderr, tunnels, keys)

    def _judge(self, action: str, code: int, stdout: bytes, stderr: bytes, tunnels: Sequence[DeviceTunnel],
               keys: list[str]) -> dict[str, DeviceResult]:
        note = None
        try:
            answered, strangers = parse_results(stdout, tunnels, keys)
        except Garbage as exc:
            log.warning("device_hook_garbage", device=self.name, action=action, problem=str(exc), exit_status=code)
            return every(tunnels, DeviceStatus.UNKNOWN,
                         f"unreadable answer on stdout ({exc}), exit status {code}: the device may hold the key")
        if strangers:
            note = strangers_note(strangers)
            log.warning("device_hook_strangers", device=self.name, action=action, ignored=len(strangers))
        if code < 0:
            fallback = DeviceResult(DeviceStatus.UNKNOWN,
                                    f"the hook was killed by signal {-code}: the device may hold the key")
        elif code == 0:
            fallback = DeviceResult(DeviceStatus.OK)
        else:
            err = one_line(last_line(stderr), keys)
            fallback = DeviceResult(DeviceStatus.FAILED, f"exit status {code}" + (f": {err}" if err else ""))
        results = {t.tunnel_id: with_note(answered.get(t.tunnel_id, fallback), note) for t in tunnels}
        self._log_stderr(action, code, stderr, keys, results)
        return results

    def _log_stderr(self, action: str, code: int, stderr: bytes, keys: list[str],
                    results: Mapping[str, DeviceResult]) -> None:
        """What the hook wrote on stderr, redacted against the batch's keys, whatever its exit status:
        a hook that refuses some tunnels but exits 0 says why only there (issue 20 item 11)."""
        lines = [ln for ln in stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
        if not lines:
            return
        failed = sum(1 for r in results.values() if r.status is not DeviceStatus.OK)
        (log.warning if failed or code else log.info)(
            "device_hook_stderr", device=self.name, action=action, exit_status=code, failed=failed,
            stderr=one_line(" | ".join(lines[-STDERR_LINES:]), keys, limit=STDERR_LOG_MAX))

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=KILL_GRACE)
        _close_pipes(proc)


def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def _exchange(proc: subprocess.Popen[bytes], body: bytes, end: float) -> tuple[bytes, bytes, bool]:
    """``communicate`` with bounded memory: write ``body`` to stdin, read stdout (at most MAX_OUTPUT
    bytes; the rest is drained and dropped, ``overflow`` says so) and the tail of stderr, until both
    close and the process exits. Raises TimeoutExpired at ``end``; a hook that floods its output
    cannot exhaust the rotator's memory before then."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out, err, overflow = bytearray(), bytearray(), False
    sent = 0
    with selectors.DefaultSelector() as sel:
        for pipe, event in ((proc.stdin, selectors.EVENT_WRITE), (proc.stdout, selectors.EVENT_READ),
                            (proc.stderr, selectors.EVENT_READ)):
            os.set_blocking(pipe.fileno(), False)
            sel.register(pipe, event)
        if not body:
            sel.unregister(proc.stdin)
            proc.stdin.close()
        while sel.get_map():
            left = end - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(proc.args, 0)
            for key, _ in sel.select(left):
                src = key.fileobj
                if src is proc.stdin:
                    try:
                        sent += os.write(key.fd, body[sent:sent + 65536])
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # the hook does not read its input: judged by what it says
                        sent = len(body)
                    if sent >= len(body):
                        sel.unregister(src)
                        proc.stdin.close()
                    continue
                try:
                    data = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(src)
                elif src is proc.stdout:
                    room = MAX_OUTPUT - len(out)
                    overflow = overflow or len(data) > room
                    out += data[:max(room, 0)]
                else:
                    err = (err + data)[-MAX_OUTPUT:]
    proc.wait(timeout=max(end - time.monotonic(), 0.001))
    return bytes(out), bytes(err), overflow
