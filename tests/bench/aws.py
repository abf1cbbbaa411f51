"""The aws_vpn benchmark row: N tunnels on N/2 AWS VPN connections (the EC2 fake, a replacement time
per modification) through the engine (a second rotation, as a running daemon does it; the first,
which also loads botocore's EC2 model, is reported beside it), the Vault and Cloudflare simulators, against the floor that
pair ordering allows.

The floor: the two tunnels of one connection are rotated one after the other (one modification per
connection at a time, and a tunnel starts only once its partner is UP again), so a rotation of every
tunnel takes at least two replacement times, one per wave, however many connections there are.

    .venv/bin/python tests/bench/aws.py [N] [REPLACEMENT_S]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rotator import config
from rotator.rotation.engine import RunRequest
from rotator.sim import Simulators
from rotator.wiring import build_runtime, preflight

WAVES = 2  # the two tunnels of a VPN connection


def run(n: int = 200, replacement: float = 2.0) -> dict[str, object]:
    with Simulators(accounts=1, tunnels=n, aws=True, aws_replacement=replacement) as sims, \
            tempfile.TemporaryDirectory(prefix="bench-aws-") as tmp:
        env = sims.env()
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})  # boto3's standard chain
        path = Path(tmp) / "rotator.toml"
        path.write_text('[policies.default]\nevery = "30d"\npsk_charset = "aws"\n'
                        f'[cloudflare]\nbatch_size = {n}\n' + sims.aws_config(verify_timeout="20s") +
                        "concurrency = 32\n")
        rt = build_runtime(config.load(str(path), env=env))
        try:
            preflight(rt)
            acc = next(iter(sims.tunnels_by_account))
            assert sims.aws_sim is not None
            walls = []
            for _ in range(2):  # the first run also loads botocore's EC2 model (a process's one-time cost)
                sims.aws_sim.modifications.clear()
                start = time.perf_counter()
                report = rt.engine.run(RunRequest(acc, **rt.request_options(acc)))
                walls.append(time.perf_counter() - start)
            cold, wall = walls
        finally:
            rt.close()
        mods = sims.aws_sim.modifications_of()
        by_conn: dict[str, list[float]] = {}
        for m in mods:
            by_conn.setdefault(m.connection_id, []).append(m.at)
        together = sum(1 for times in by_conn.values() if len(times) > 1 and max(times) - min(times) < replacement)
        floor = WAVES * replacement
        return {"kind": "aws_vpn", "n": n, "connections": len(sims.aws_sim.connections), "replacement_s": replacement,
                "wall_s": round(wall, 2), "first_run_wall_s": round(cold, 2), "floor_s": round(floor, 2), "over_floor": round(wall / floor, 2),
                "rotated": report.counts()["rotated"], "modifications": len(mods),
                "pairs_modified_together": together, "aws_requests": sum(sims.aws_sim.request_counts().values()),
                "step_seconds": {k: round(v, 2) for k, v in report.step_seconds.items()},
                "load_average": [round(x, 2) for x in os.getloadavg()]}


def markdown(row: dict) -> str:
    return "\n".join([
        "", "| AWS Site-to-Site VPN (EC2 fake) | wall s | floor s (2 waves x replacement) | wall/floor | rotated | "
            "modifications | pairs modified together | EC2 requests |",
        "|---|---|---|---|---|---|---|---|",
        f"| {row['n']} tunnels on {row['connections']} connections, {row['replacement_s']} s replacement | "
        f"{row['wall_s']} | {row['floor_s']} | {row['over_floor']} | {row['rotated']} | {row['modifications']} | "
        f"{row['pairs_modified_together']} | {row['aws_requests']} |"])


if __name__ == "__main__":
    result = run(int(sys.argv[1]) if len(sys.argv) > 1 else 200, float(sys.argv[2]) if len(sys.argv) > 2 else 2.0)
    out = Path(__file__).resolve().parent / "results"
    (out / "aws.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "aws.md").write_text(markdown(result).lstrip("\n") + "\n")
    print(json.dumps(result))
