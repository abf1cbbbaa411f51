"""`rotator demo` as the README's first command: it starts, rotates, its printed instructions work, and
the keys reach the far end: the simulated device holds the record's psk, as Cloudflare does."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
from typing import Any

import httpx

from tests.helpers import OUTPUTS, PREFIX, SECRETS, start_cli, wait_for


def _fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _read_instructions(proc: subprocess.Popen[str]) -> tuple[dict[str, Any], str]:
    """The ready line, then the text up to 'Ctrl-C stops it.' (bounded: the demo prints ~20 lines)."""
    ready = json.loads(proc.stdout.readline())
    lines: list[str] = []
    for _ in range(60):
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("Ctrl-C"):
            break
    return ready, "\n".join(lines)


def _ends(ready: dict[str, Any], device_state_url: str) -> dict[str, dict[str, tuple[str | None, ...]]]:
    """Per account and tunnel: (record psk fingerprint, pending?, record device, Cloudflare's, the device's)."""
    vault = ready["simulators"]["vault"]
    cf_root = ready["simulators"]["cloudflare"].removesuffix("/client/v4")
    cloudflare = httpx.get(cf_root + "/_sim/state").json()["result"]["accounts"]
    device = httpx.get(device_state_url).json()["result"]["tunnels"]
    out: dict[str, dict[str, tuple[str | None, ...]]] = {}
    for acc in ready["accounts"]:
        out[acc] = {}
        for tid, tunnel in cloudflare[acc].items():
            rec = httpx.post(vault + "/_sim/control", json={"op": "read_data", "path": f"{PREFIX}/{acc}/{tid}"}) \
                .json()["result"] or {}
            SECRETS.update(k for k in (rec.get("psk"), rec.get("pending_psk"), tunnel["psk"]) if k)
            out[acc][tid] = (rec.get("psk") and _fingerprint(rec["psk"]), "pending" if rec.get("pending_psk") else None,
                             rec.get("device"), tunnel["psk"] and _fingerprint(tunnel["psk"]),
                             device.get(f"{acc}/{tid}"))
    return out


def test_demo_rotates_both_ends_and_its_instructions_work() -> None:
    proc = start_cli(["demo", "--listen", "127.0.0.1:0"], {})
    text, ready = "", {}
    try:
        ready, text = _read_instructions(proc)
        metrics = ready["metrics_url"]
        far_end = ready["far_end"]
        device_acc = far_end["account"]
        (plain_acc,) = [a for a in ready["accounts"] if a != device_acc]

        # The printed "Device : curl -s URL" is where a newcomer watches the far end's keys.
        device_url = shlex.split(text.split("Device    :", 1)[1].split("(", 1)[0])[-1]
        assert device_url == far_end["state_url"] and httpx.get(device_url).status_code == 200

        def rotated() -> float:
            text = httpx.get(metrics).text
            return sum(float(v) for v in re.findall(r'psk_rotator_rotations_total\{[^}]*result="rotated"\} (\S+)', text))

        wait_for(lambda: rotated() >= 8, timeout=30, what="the demo's first rotations")

        def settled() -> dict[str, dict[str, tuple[str | None, ...]]] | None:
            """Both ends of every tunnel of the device's account hold the record's psk (nothing pending);
            the other account's tunnels hold it at Cloudflare and the device knows nothing of them."""
            ends = _ends(ready, device_url)
            with_device = all(rec and not pending and dev_name == far_end["device"] and rec == cf == dev
                              for rec, pending, dev_name, cf, dev in ends[device_acc].values())
            without = all(rec and not pending and dev_name is None and rec == cf and dev is None
                          for rec, pending, dev_name, cf, dev in ends[plain_acc].values())
            return ends if with_device and without else None

        wait_for(lambda: settled() is not None, timeout=30, what="both ends holding the record's psk")
        before = settled()
        assert before is not None

        # "Rotate now: curl -s -X POST -H "Authorization: Bearer $(cat FILE)" -d 'BODY' URL"
        command = text.split("Rotate now:", 1)[1].split("Status", 1)[0].replace("\\\n", " ")
        args = shlex.split(command)
        token_file = re.search(r"\$\(cat (\S+)\)", command).group(1)  # type: ignore[union-attr]
        with open(token_file) as fh:
            token = fh.read().strip()
        body = json.loads(args[args.index("-d") + 1])
        assert body["account"] == device_acc
        r = httpx.post(args[-1], json=body, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 202
        run = r.json()["href"]
        wait_for(lambda: httpx.get(ready["admin_url"] + run, headers={"Authorization": f"Bearer {token}"})
                 .json()["state"] == "done")

        # The run rotated the device's account: new keys, delivered to the device, applied, agreed.
        def rotated_again() -> bool:
            after = settled()
            return after is not None and all(after[device_acc][t][0] != before[device_acc][t][0]
                                             for t in before[device_acc])

        wait_for(rotated_again, timeout=30, what="the requested rotation reaching the device")
        assert token not in text and token not in json.dumps(ready)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=40)
        OUTPUTS.extend([text, json.dumps(ready), out, err])
    assert proc.returncode == 0 and "Traceback" not in err
    assert not os.path.exists(os.path.dirname(token_file)), "the demo removes its temporary directory"
