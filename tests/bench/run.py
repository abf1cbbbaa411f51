"""All benchmarks in one command; writes tests/bench/results/latest.{md,json}.

    make bench            (or: .venv/bin/python tests/bench/run.py [--quick])

Scenarios run in fresh processes against simulators in their own process, with injected latency
(Cloudflare 50 ms per request, Vault 2 ms). Figures are reported side by side with their targets.
A run that did not rotate every tunnel it was asked to fails the benchmark (exit 1, the row says
FAILED and why) instead of printing a ratio of work that was not done.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench import aws, ike, sim_throughput  # noqa: E402
from tests.bench.common import env_of, machine, simulators  # noqa: E402

CF_LATENCY, VAULT_LATENCY, BATCH, CONCURRENCY = 0.05, 0.002, 100, 16
# Targets (issue 16 item 7), one account of 10,000 tunnels: wall within 1.25x Cloudflare's round trips alone,
# client CPU per tunnel at most 600 us.
TARGET_N, TARGET_OVER_CF_FLOOR, TARGET_CPU_US = 10_000, 1.25, 600.0
PY = sys.executable


VERIFY_LATENCY, DEVICE_CONCURRENCY, IKE_TUNNELS = 0.2, 16, 200


FAILURES: list[str] = []  # rows whose run did not do everything it was asked to


def scenario(kind: str, n: int, accounts: int) -> dict:
    out = subprocess.run([PY, str(ROOT / "tests/bench/scale.py"), kind, str(n), str(accounts), str(CF_LATENCY),
                          str(VAULT_LATENCY), str(VERIFY_LATENCY)], capture_output=True, text=True, check=True)
    return complete(json.loads(out.stdout.strip().splitlines()[-1]), f"{kind} N={n} accounts={accounts}", n)


def complete(row: dict, what: str, asked: int) -> dict:
    """Marks a row that rotated fewer tunnels than asked as failed (``failed``: why); its ratios are
    not shown, and the benchmark exits 1."""
    if row.get("rotated") != asked:
        row["failed"] = f"rotated {row.get('rotated', 0)} of {asked}"
        FAILURES.append(f"{what}: {row['failed']}")
    return row


def ratio(row: dict, value: object) -> str:
    return f"FAILED ({row['failed']})" if "failed" in row else str(value)


def cf_floor_seconds(n: int, accounts: int) -> float:
    """Cloudflare's round trips alone: per account 1 list + 2 calls per batch, accounts one after another."""
    return accounts * (1 + 2 * math.ceil(n // accounts / BATCH)) * CF_LATENCY


def device_rows(n: int = 1000) -> list[dict]:
    """N tunnels with a far-end device for every one: a trivial exec hook, and the simulated device
    at VERIFY_LATENCY per verification. Floor: Cloudflare round trips (plus Vault's) and, with the
    simulated device, verification time / the device's concurrency. The Cloudflare-only run they are
    compared with is measured right before them (the machine's load changes over a whole bench)."""
    print(f"device baseline (Cloudflare only) N={n} ...", flush=True)
    cloudflare_only = scenario("ours", n, 1)
    rows = [{**cloudflare_only, "floor_s": round(floor_seconds(n, 1), 2),
             "over_floor": round(cloudflare_only["wall_s"] / floor_seconds(n, 1), 2), "over_cloudflare_only": 1.0,
             "device_s": 0.0, "device_floor_s": 0.0}]
    for kind, verify in (("exec", 0.0), ("simdev", VERIFY_LATENCY)):
        print(f"device {kind} N={n} ...", flush=True)
        r = scenario(kind, n, 1)
        r["floor_s"] = round(floor_seconds(n, 1) + n * verify / DEVICE_CONCURRENCY, 2)
        r["over_floor"] = round(r["wall_s"] / r["floor_s"], 2)
        r["over_cloudflare_only"] = round(r["wall_s"] / cloudflare_only["wall_s"], 2)
        # The device's own share against the floor's: wall time beyond the Cloudflare-only run.
        r["device_s"] = round(r["wall_s"] - cloudflare_only["wall_s"], 2)
        r["device_floor_s"] = round(n * verify / DEVICE_CONCURRENCY, 2)
        rows.append(r)
    return rows


def ike_row(tunnels: int) -> dict:
    """200 real tunnels end to end through the IKE lab (tests/bench/ike.py); skipped without root and
    strongSwan, with the reason."""
    print(f"IKE lab N={tunnels} ...", flush=True)
    out = subprocess.run([PY, str(ROOT / "tests/bench/ike.py"), "--tunnels", str(tunnels)], capture_output=True,
                         text=True, timeout=900)
    lines = out.stdout.strip().splitlines()
    if not lines:
        FAILURES.append(f"IKE lab: tests/bench/ike.py failed (exit {out.returncode})")
        return {"skipped": f"tests/bench/ike.py failed (exit {out.returncode}): "
                           f"{(out.stderr.strip().splitlines() or ['no output'])[-1][:200]}"}
    result = json.loads(lines[-1])
    FAILURES.extend(f"IKE lab: {f}" for f in result.get("failures", []))
    return result


def floor_seconds(n: int, accounts: int) -> float:
    """Round trips alone: per account 1 list + 2 per batch to Cloudflare, and 3 Vault calls per tunnel
    (read, stage, promote) at the configured concurrency; accounts one after another."""
    per_account = n // accounts
    vault = accounts * 3 * math.ceil(per_account / CONCURRENCY) * VAULT_LATENCY
    return cf_floor_seconds(n, accounts) + vault


def psk_rate() -> float:
    from rotator.psk import PskGenerator, PskPolicy

    gen = PskGenerator(PskPolicy())
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        gen.generate(200_000)
        best = max(best, 200_000 / (time.perf_counter() - start))
    return best


def help_startup_ms() -> float:
    times = []
    for _ in range(15):
        start = time.perf_counter()
        subprocess.run([str(Path(PY).parent / "rotator"), "--help"], capture_output=True, check=True)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def idle_daemon(seconds: float) -> dict:
    import psutil

    with simulators(2, 20, 0.0, 0.0) as info:
        workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-idle-{os.getpid()}"
        workdir.mkdir(exist_ok=True)
        cfg = workdir / "rotator.toml"
        cfg.write_text('[admin]\nlisten = "127.0.0.1:0"\n[policies.default]\nevery = "30d"\n' +
                       "".join(f'[[accounts]]\nid = "{a}"\n' for a in info["accounts"]))
        env = {**os.environ, **env_of(info), "ROTATOR_ADMIN_TOKEN": "b" * 32}
        proc = subprocess.Popen([str(Path(PY).parent / "rotator"), "--config", str(cfg), "run"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ps = psutil.Process(proc.pid)
        time.sleep(8)  # start-up and the first rotation of every tunnel
        cpu0 = sum(ps.cpu_times()[:2])
        time.sleep(seconds)
        cpu = sum(ps.cpu_times()[:2]) - cpu0
        rss = ps.memory_info().rss / 2**20
        start = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        stop_s = time.perf_counter() - start
    return {"rss_mb": round(rss, 1), "cpu_percent": round(100 * cpu / seconds, 2), "sigterm_to_exit_s": round(stop_s, 2),
            "exit_code": proc.returncode}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="skip N=10,000, the peer at 1,000 and shorten idle")
    parser.add_argument("--devices", action="store_true",
                        help="only the far-end device and IKE lab rows, merged into the last results")
    args = parser.parse_args()
    out_dir = ROOT / "tests/bench/results"
    if args.devices:
        results = json.loads((out_dir / "latest.json").read_text())
        results["devices"] = device_rows()
        results["ike"] = ike_row(IKE_TUNNELS)
        results["aws"] = aws.run()
        results["devices_load_average"] = [round(x, 2) for x in os.getloadavg()]
        results["failures"] = [f for f in results.get("failures", []) if not f.startswith(("exec", "simdev", "IKE"))] + FAILURES
        (out_dir / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
        (out_dir / "latest.md").write_text(markdown(results))
        print(markdown(results))
        sys.exit(1 if FAILURES else 0)
    results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "cf_latency_s": CF_LATENCY,
                     "vault_latency_s": VAULT_LATENCY, "batch": BATCH, "vault_concurrency": CONCURRENCY,
                     "load_average": [round(x, 2) for x in os.getloadavg()]}
    print("simulator throughput ...", flush=True)
    results["simulators"] = sim_throughput.measure()
    rows = []
    sizes = [(100, 1), (1000, 1), (1000, 10)] + ([] if args.quick else [(10000, 1), (10000, 10)])
    for n, accounts in sizes:
        print(f"ours N={n} accounts={accounts} ...", flush=True)
        r = scenario("ours", n, accounts)
        r["floor_s"] = round(floor_seconds(n, accounts), 2)
        r["ours_over_floor"] = round(r["wall_s"] / r["floor_s"], 2)
        r["cf_floor_s"] = round(cf_floor_seconds(n, accounts), 2)
        r["ours_over_cf_floor"] = round(r["wall_s"] / r["cf_floor_s"], 3)
        r["expected_cf_calls"] = accounts * (1 + 2 * math.ceil(n // accounts / BATCH))
        rows.append(r)
    results["ours"] = rows
    peers = []
    for n in [100] + ([] if args.quick else [1000]):
        print(f"peer N={n} ...", flush=True)
        p = scenario("peer", n, 1)
        mine = next(r for r in rows if r["n"] == n and r["accounts"] == 1)
        p["peer_over_ours"] = round(p["wall_s"] / mine["wall_s"], 1)
        if "failed" in mine:
            p["failed"] = f"ours: {mine['failed']}"
        peers.append(p)
    results["peer"] = peers
    results["devices"] = device_rows()
    results["ike"] = ike_row(IKE_TUNNELS)
    print("aws_vpn N=200 ...", flush=True)
    results["aws"] = aws.run()
    print("micro ...", flush=True)
    results["micro"] = {"psks_per_s": round(psk_rate()), "help_ms": round(help_startup_ms(), 1),
                        "idle": idle_daemon(15 if args.quick else 60)}
    results["devices_load_average"] = [round(x, 2) for x in os.getloadavg()]
    results["failures"] = FAILURES
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "latest.md").write_text(markdown(results))
    print(markdown(results))
    if FAILURES:
        print("benchmark FAILED: " + "; ".join(FAILURES), file=sys.stderr)
        sys.exit(1)


def markdown(r: dict) -> str:
    lines = [f"Machine: {r['machine']}; {r['date']}. Injected latency: Cloudflare {r['cf_latency_s'] * 1000:.0f} ms, "
             f"Vault {r['vault_latency_s'] * 1000:.0f} ms; batch {r['batch']}, Vault concurrency {r['vault_concurrency']}."
             + (f" Load average at start: {r['load_average']}." if "load_average" in r else ""),
             "", "| N | accounts | wall s | floor s | ours/floor | Cloudflare calls (expected) | Vault calls | "
             "CPU µs/tunnel | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for x in r["ours"]:
        lines.append(f"| {x['n']:,} | {x['accounts']} | {x['wall_s']} | {x['floor_s']} | {ratio(x, x['ours_over_floor'])} | "
                     f"{x['cloudflare_calls']} ({x['expected_cf_calls']}) | {x['vault_calls']} | "
                     f"{x['cpu_us_per_tunnel']} | {x['peak_rss_mb']} |")
    lines += targets_markdown(r)
    lines += ["", "| peer script (psk_generate + hvac, one by one) | wall s | Cloudflare calls | peer/ours wall |",
              "|---|---|---|---|"]
    for p in r["peer"]:
        lines.append(f"| N = {p['n']:,} | {p['wall_s']} | {p['cloudflare_calls']} | {ratio(p, p['peer_over_ours'])}x |")
    lines += devices_markdown(r)
    m, s = r["micro"], r["simulators"]
    lines += ["", "| micro | measured | target |", "|---|---|---|",
              f"| PSKs generated per second | {m['psks_per_s']:,} | ≥ 200,000 |",
              f"| `rotator --help` start-up | {m['help_ms']} ms | < 300 ms |",
              f"| idle daemon RSS | {m['idle']['rss_mb']} MB | < 80 MB |",
              f"| idle daemon CPU | {m['idle']['cpu_percent']} % | |",
              f"| SIGTERM to exit | {m['idle']['sigterm_to_exit_s']} s (exit {m['idle']['exit_code']}) | |",
              f"| Vault simulator KV writes/s | {s['kv_writes_per_s']:,} | ≥ 1,500 |",
              f"| Cloudflare simulator bulk sets of 1,000/s | {s['bulk_psk_set_1000_per_s']} | |", ""]
    return "\n".join(lines)


def targets_markdown(r: dict) -> list[str]:
    """The targets of one account of TARGET_N tunnels, measured, side by side; and the simulators' share."""
    row = next((x for x in r["ours"] if x["n"] == TARGET_N and x["accounts"] == 1), None)
    lines = ["", "| simulators' CPU during the run (one process) | " + " | ".join(
        f"N={x['n']:,}/{x['accounts']}" for x in r["ours"]) + " |", "|---|" + "---|" * len(r["ours"]),
        "| share of one core | " + " | ".join(
            f"{round(100 * x['sim_share_of_wall'])} %" if x.get("sim_share_of_wall") is not None else "n/a"
            for x in r["ours"]) + " |"]
    if row is None:
        return [*lines, "", f"Targets at N = {TARGET_N:,}: not measured in this run (--quick)."]
    def verdict(ok: bool) -> str:
        return "FAILED" if "failed" in row else ("met" if ok else "**not met**")
    over, cpu = row["ours_over_cf_floor"], row["cpu_us_per_tunnel"]
    return [*lines, "", f"| target, {TARGET_N:,} tunnels, one account | measured | target | |", "|---|---|---|---|",
            f"| wall / Cloudflare round-trip floor ({row['cf_floor_s']} s) | {ratio(row, over)} "
            f"({row['wall_s']} s) | ≤ {TARGET_OVER_CF_FLOOR} | {verdict(over <= TARGET_OVER_CF_FLOOR)} |",
            f"| client CPU per tunnel | {cpu} µs | ≤ {TARGET_CPU_US:.0f} µs | {verdict(cpu <= TARGET_CPU_US)} |",
            f"| simulators' CPU, share of one core | {row.get('sim_cpu_s')} s, "
            f"{round(100 * (row.get('sim_share_of_wall') or 0))} % | well below 100 % (not the bottleneck) | "
            f"{verdict((row.get('sim_share_of_wall') or 0) < 0.8)} |"]


def devices_markdown(r: dict) -> list[str]:
    load = r.get("devices_load_average")
    lines = ["", f"Far-end devices (load average {load} when measured; the machine is shared):" if load else "",
             "", "| 1,000 tunnels, far-end device for each | wall s | floor s | wall/floor (target ≤ 1.5) | "
                 "wall/Cloudflare-only | device time s (its floor) | Cloudflare calls | device calls |",
             "|---|---|---|---|---|---|---|---|"]
    names = {"ours": "Cloudflare only (no device), the baseline", "exec": "exec, trivial hook", "simdev": f"simulated device, {VERIFY_LATENCY * 1000:.0f} ms per verification"}
    for x in r.get("devices", []):
        lines.append(f"| {names[x['kind']]} | {x['wall_s']} | {x['floor_s']} | {ratio(x, x['over_floor'])} | "
                     f"{ratio(x, x['over_cloudflare_only'])} | {x['device_s']} ({x['device_floor_s']}) | {x['cloudflare_calls']} | "
                     f"{x.get('device_calls', '')} |")
    if "ike" in r:
        lines += ["", *ike.markdown(r["ike"]).splitlines()]
    if "aws" in r:
        lines += aws.markdown(r["aws"]).splitlines()
    return lines


if __name__ == "__main__":
    main()
