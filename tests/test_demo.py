"""`rotator demo` as the README's first command: it starts, rotates, and its printed instructions work."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal

import httpx

from tests.helpers import OUTPUTS, start_cli, wait_for


def test_demo_rotates_within_seconds_and_its_instructions_work():
    proc = start_cli(["demo", "--listen", "127.0.0.1:0"], {})
    lines: list[str] = []
    try:
        ready = json.loads(proc.stdout.readline())
        while not (lines and lines[-1].startswith("Ctrl-C")):
            lines.append(proc.stdout.readline().strip())
        metrics = ready["metrics_url"]

        def rotated() -> float:
            text = httpx.get(metrics).text
            return sum(float(v) for v in re.findall(r'psk_rotator_rotations_total\{[^}]*result="rotated"\} (\S+)', text))

        wait_for(lambda: rotated() >= 8, timeout=30, what="the demo's first rotations")
        text = "\n".join(lines)
        # "Rotate now: curl -s -X POST -H "Authorization: Bearer $(cat FILE)" -d 'BODY' URL"
        command = text.split("Rotate now:", 1)[1].split("Status", 1)[0].replace("\\\n", " ")
        args = shlex.split(command)
        token_file = re.search(r"\$\(cat (\S+)\)", command).group(1)
        with open(token_file) as fh:
            token = fh.read().strip()
        body = json.loads(args[args.index("-d") + 1])
        url = args[-1]
        r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 202
        run = r.json()["href"]
        wait_for(lambda: httpx.get(ready["admin_url"] + run, headers={"Authorization": f"Bearer {token}"})
                 .json()["state"] == "done")
        assert token not in text and token not in json.dumps(ready)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=40)
        OUTPUTS.extend(["\n".join(lines), out, err])
    assert proc.returncode == 0 and "Traceback" not in err
    assert not os.path.exists(os.path.dirname(token_file)), "the demo removes its temporary directory"
