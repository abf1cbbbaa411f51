"""Evidence for auditors (issue 19): per tunnel, how old its key was at every moment of a period, each
rotation and how both ends were shown to hold the key, each rollback and drift, and where the policy's
``max_age`` was exceeded, built only from the records' KV v2 version history (docs/specs/vault-kv2.md)
and the configured policies.

``build`` is a pure function from histories + policies + period to a report dict; ``seal`` adds the
SHA-256 digest of its canonical JSON; ``differences`` compares two reports for ``rotator report
--check``; ``render_csv`` and ``render_html`` present one. Nothing here ever holds a key in its output:
keys are compared in memory (``Secret.__eq__``), never copied.

Definitions (docs/design.md section 3, the record):
- a version *promotes* a key when it carries ``verified_by`` (written by the promote step), or, for
  records written before that field existed, when it is active with no pending key and its ``psk``
  differs from the version before it (its proof is then ``not recorded``);
- the key's *age* at instant t is t minus the ``rotated_at`` of the version current at t (the latest
  version created at or before t, by Vault's ``created_time``); while a record has no ``psk`` the
  tunnel is *unmanaged*; where the version is pruned, deleted or destroyed the age is *unknown*;
- a *rollback* is a version entering ``state = rolling_back`` (its ``last_error`` says why), completed
  by the next version that is active with no pending key;
- a *drift* is a version whose ``drift_generated_on`` (Cloudflare's ``last_generated_on`` that showed
  a key set outside the rotator, written when the re-key is staged) differs from the version before.
Nothing is inferred across a gap: an event whose version or predecessor is not readable is not
reported, the gap is, with its version numbers and times.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import html
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rotator.errors import VaultError
from rotator.model import VERIFIED_BY, Record
from rotator.rotation.ports import History, HistoryStore, VersionInfo
from rotator.schedule import parse_time

FORMAT = "psk-rotator-report/1"
NOT_RECORDED = "not recorded"
PROOF_ORDER = (*VERIFIED_BY, NOT_RECORDED)
PolicyFor = Callable[[str, str, str], tuple[str | None, float | None]]  # account, tunnel, name -> (policy, max_age)


def rfc3339(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def vault_time(text: str | None) -> float | None:
    """Vault's RFC 3339 with nanoseconds (``2026-12-02T17:38:51.123456789Z``) as a UNIX time."""
    if not text:
        return None
    head, dot, frac = text.partition(".")
    if dot:
        digits = "".join(c for c in frac if c.isdigit())
        zone = frac[len(digits):]
        text = f"{head}.{digits[:6]}{zone}"
    return parse_time(text)


@dataclass
class _Seg:
    start: float
    end: float
    kind: str  # known | unmanaged | unknown
    since: float | None = None
    version: int | None = None


def _segments(h: History, start: float, end: float) -> list[_Seg]:
    """Who held which key over [start, end], by Vault's created_time of each version."""
    listed = [(v, vault_time(v.created_time)) for v in h.versions]
    timed = [(v, t) for v, t in listed if t is not None and t <= end]
    segs: list[_Seg] = []
    first_t = timed[0][1] if timed else end
    first_n = timed[0][0].number if timed else h.current_version + 1
    if first_t > start:  # before the first retained version: no record yet, or pruned versions
        created = vault_time(h.created_time)
        if first_n == 1 or not h.versions or created is None:
            segs.append(_Seg(start, first_t, "unmanaged" if first_n == 1 or not h.versions else "unknown"))
        else:  # the record's metadata says when version 1 was written: unmanaged before, unknown after
            if created > start:
                segs.append(_Seg(start, min(created, first_t), "unmanaged"))
            if first_t > max(start, created):
                segs.append(_Seg(max(start, created), first_t, "unknown"))
    for i, (v, t) in enumerate(timed):
        nxt = timed[i + 1][1] if i + 1 < len(timed) else end
        a, b = max(t, start), min(nxt, end)
        if b <= a and not (i + 1 == len(timed) and a == b == end):
            continue
        rec = v.record
        if rec is None:
            segs.append(_Seg(a, b, "unknown", version=v.number))
        elif rec.psk is None:
            segs.append(_Seg(a, b, "unmanaged", version=v.number))
        else:
            since = parse_time(rec.rotated_at)
            segs.append(_Seg(a, b, "known" if since is not None else "unknown", since, v.number))
    merged: list[_Seg] = []
    for seg in segs:
        last = merged[-1] if merged else None
        if last and last.kind == seg.kind and last.since == seg.since and last.end == seg.start:
            last.end = seg.end
        else:
            merged.append(seg)
    return merged


def _proof(rec: Record) -> dict[str, Any]:
    by = rec.verified_by or NOT_RECORDED
    out: dict[str, Any] = {"verified_by": by, "verified_at": rec.verified_at, "device": rec.device}
    if by == "operator_ack":
        out["acked_rotation_id"] = rec.acked_rotation_id
    return out


def _events(h: History, end: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Rotations, rollbacks and drifts in the retained history up to ``end`` (all times, not clipped)."""
    rotations: list[dict[str, Any]] = []
    rollbacks: list[dict[str, Any]] = []
    drifts: list[dict[str, Any]] = []
    versions = [v for v in h.versions if (vault_time(v.created_time) or end + 1) <= end]
    by_number = {v.number: v for v in versions}
    for v in versions:
        rec = v.record
        if rec is None:
            continue
        at = rfc3339(vault_time(v.created_time))
        pv = by_number.get(v.number - 1)
        known = v.number == 1 or (pv is not None and pv.record is not None)
        pred = pv.record if pv is not None else None
        settled = rec.state == "active" and rec.pending_psk is None and rec.psk is not None
        # A later write that only copies a promoting version (an operator's patch) promotes nothing.
        copy = pred is not None and pred.state == "active" and pred.pending_psk is None and pred.psk == rec.psk \
            and pred.verified_at == rec.verified_at
        if settled and not copy and (rec.verified_by is not None or (known and (pred is None or pred.psk != rec.psk))):
            entry = {"at": at, "version": v.number, "rotation_id": rec.rotation_id, "rotated_at": rec.rotated_at,
                     **_proof(rec)}
            if pred is not None and pred.previous_psk is not None and pred.previous_psk == rec.psk:
                entry["restores_previous_key"] = True
            if rec.last_error:
                entry["note"] = rec.last_error
            rotations.append(entry)
        if rec.state == "rolling_back" and known and not (pred is not None and pred.state == "rolling_back"
                                                          and pred.rotation_id == rec.rotation_id):
            rollbacks.append({"at": at, "version": v.number, "rotation_id": rec.rotation_id,
                              "reason": rec.last_error, **_completion(versions, v.number)})
        if rec.drift_generated_on and known and (pred is None or pred.drift_generated_on != rec.drift_generated_on):
            drifts.append({"at": at, "version": v.number, "rotation_id": rec.rotation_id,
                           "cloudflare_generated_on": rec.drift_generated_on, "recorded_generated_on":
                           pred.cf_generated_on if pred is not None else None})
    return rotations, rollbacks, drifts


def _completion(versions: Sequence[VersionInfo], number: int) -> dict[str, Any]:
    """When both ends were back on ``psk`` after the rollback started at ``number`` (None: not yet or unknown)."""
    for v in versions:
        if v.number <= number:
            continue
        rec = v.record
        if rec is None or v.number != number + 1:
            return {"completed_at": None, "completed_version": None}
        if rec.state == "rolling_back":
            number = v.number
            continue
        done = rec.state == "active" and rec.pending_psk is None
        return {"completed_at": rfc3339(vault_time(v.created_time)) if done else None,
                "completed_version": v.number if done else None}
    return {"completed_at": None, "completed_version": None}


def _gaps(h: History, start: float, end: float) -> list[dict[str, Any]]:
    """Versions the report could not read for the period: pruned (max_versions), deleted or destroyed."""
    gaps: list[dict[str, Any]] = []
    timed = [(v, vault_time(v.created_time)) for v in h.versions]
    if h.versions and h.versions[0].number > 1:
        first_t = timed[0][1]
        if first_t is None or first_t > start:
            gaps.append({"versions": [1, h.versions[0].number - 1], "reason": "pruned (max_versions)",
                         "from": rfc3339(vault_time(h.created_time)), "to": rfc3339(first_t)})
    for i, (v, t) in enumerate(timed):
        nxt = timed[i + 1][1] if i + 1 < len(timed) else None
        if t is None or t > end or (nxt is not None and nxt <= start):
            continue
        if i and v.number != timed[i - 1][0].number + 1:
            gaps.append({"versions": [timed[i - 1][0].number + 1, v.number - 1], "reason": "not listed by Vault",
                         "from": rfc3339(timed[i - 1][1]), "to": rfc3339(t)})
        if v.record is None:
            reason = "destroyed" if v.destroyed else "deleted"
            last = gaps[-1] if gaps else None
            if last and last["reason"] == reason and last["versions"][1] == v.number - 1:
                last["versions"][1], last["to"] = v.number, rfc3339(nxt)
            else:
                gaps.append({"versions": [v.number, v.number], "reason": reason, "from": rfc3339(t),
                             "to": rfc3339(nxt)})
    return gaps


def _in(entry: Mapping[str, Any], start: float, end: float) -> bool:
    at = parse_time(entry["at"])
    return at is not None and start < at <= end


def _tunnel(h: History, policy: str | None, max_age: float | None, start: float, end: float,
            manual: frozenset[str]) -> dict[str, Any]:
    segs = _segments(h, start, end)
    rotations, rollbacks, drifts = _events(h, end)
    current = None
    for v in h.versions:
        t = vault_time(v.created_time)
        if t is not None and t <= end:
            current = v
    rec = current.record if current else None
    ages = [(s.end - s.since, s.end) for s in segs if s.kind == "known" and s.since is not None]
    max_age_seen = max(ages, default=None)
    over: list[dict[str, Any]] = []
    if max_age is not None:
        for s in segs:
            if s.kind != "known" or s.since is None or s.since + max_age >= s.end:
                continue
            a = max(s.start, s.since + max_age)
            if over and over[-1]["_end"] == a:
                over[-1]["_end"] = s.end
            else:
                over.append({"_start": a, "_end": s.end})
    over_out = [{"from": rfc3339(o["_start"]), "to": rfc3339(o["_end"]), "seconds": int(o["_end"] - o["_start"])}
                for o in over]
    unknown = sum(s.end - s.start for s in segs if s.kind == "unknown")
    unmanaged = sum(s.end - s.start for s in segs if s.kind == "unmanaged")
    last = segs[-1] if segs else None
    age_now = int(end - last.since) if last and last.kind == "known" and last.since is not None else None
    if over_out:
        verdict = "breached"
    elif unknown > 0 or max_age is None:
        verdict = "unprovable" if max_age is not None else "no max_age"
    else:
        verdict = "within"
    last_rot = rotations[-1] if rotations else None
    state = rec.state if rec else ("unknown" if current else "unmanaged")
    open_items = []
    if rec is not None and rec.pending_psk is not None:
        if rec.state == "rolling_back":
            open_items.append("rolling_back")
        elif rec.device in manual and not rec.acked:
            open_items.append("waiting_ack")
        else:
            open_items.append("pending")
        if rec.drift_generated_on:
            open_items.append("drifted")
    return {
        "tunnel_id": h.tunnel_id, "tunnel_name": _name(h), "path": h.path, "policy": policy,
        "max_age_seconds": None if max_age is None else int(max_age),
        "key_age": {
            "max_seconds": None if max_age_seen is None else int(max_age_seen[0]),
            "max_at": None if max_age_seen is None else rfc3339(max_age_seen[1]),
            "at_end_seconds": age_now, "over_policy": over_out,
            "over_policy_seconds": sum(o["seconds"] for o in over_out),
            "unknown_seconds": int(unknown), "unmanaged_seconds": int(unmanaged), "verdict": verdict,
            "segments": [{"from": rfc3339(s.start), "to": rfc3339(s.end), "kind": s.kind,
                          "rotated_at": rfc3339(s.since), "version": s.version} for s in segs],
        },
        "rotations": [r for r in rotations if _in(r, start, end)],
        "rollbacks": [r for r in rollbacks if _in(r, start, end)],
        "drifts": [r for r in drifts if _in(r, start, end)],
        "gaps": _gaps(h, start, end),
        "current": {
            "version": current.number if current else None, "state": state,
            "rotation_id": rec.rotation_id if rec else None, "rotated_at": rec.rotated_at if rec else None,
            "device": rec.device if rec else None, "last_error": rec.last_error if rec else None,
            "last_rotation": None if last_rot is None else {k: last_rot.get(k) for k in
                                                            ("at", "version", "rotation_id", "verified_by")},
            "open": open_items,
        },
        "_sources": _sources(h, start, end),
    }


def _name(h: History) -> str | None:
    for v in reversed(h.versions):
        if v.record is not None and v.record.tunnel_name:
            return v.record.tunnel_name
    return None


def _sources(h: History, start: float, end: float) -> list[int]:
    """The version numbers the figures rest on: from the one current at ``start`` to the last before ``end``."""
    timed = [(v, vault_time(v.created_time)) for v in h.versions]
    timed = [(v, t) for v, t in timed if t is not None and t <= end]
    base = max((i for i, (_, t) in enumerate(timed) if t is not None and t <= start), default=0)
    return [v.number for v, _ in timed[base:] if v.record is not None]


def _summary(tunnels: Sequence[Mapping[str, Any]], accounts: Mapping[str, str] | None = None) -> dict[str, Any]:
    proofs = dict.fromkeys(PROOF_ORDER, 0)
    for t in tunnels:
        for r in t["rotations"]:
            proofs[r["verified_by"]] = proofs.get(r["verified_by"], 0) + 1
    verdicts = [t["key_age"]["verdict"] for t in tunnels]
    with_policy = [v for v in verdicts if v != "no max_age"]
    oldest = max((t for t in tunnels if t["key_age"]["max_seconds"] is not None),
                 key=lambda t: (t["key_age"]["max_seconds"], t["tunnel_id"]), default=None)
    opened: dict[str, list[str]] = {"pending": [], "rolling_back": [], "waiting_ack": [], "drifted": []}
    for t in tunnels:
        for item in t["current"]["open"]:
            opened[item].append(t["tunnel_id"])
    return {
        "tunnels": len(tunnels), "rotations": sum(len(t["rotations"]) for t in tunnels),
        "rotations_by_proof": {k: n for k, n in proofs.items() if n},
        "rollbacks": sum(len(t["rollbacks"]) for t in tunnels), "drifts": sum(len(t["drifts"]) for t in tunnels),
        "gaps": sum(len(t["gaps"]) for t in tunnels),
        "within_policy": verdicts.count("within"), "breached": verdicts.count("breached"),
        "unprovable": verdicts.count("unprovable"), "without_max_age": verdicts.count("no max_age"),
        "share_within_policy": round(verdicts.count("within") / len(with_policy), 4) if with_policy else None,
        "oldest_key": None if oldest is None else {
            "account_id": (accounts or {}).get(oldest["tunnel_id"]), "tunnel_id": oldest["tunnel_id"],
            "tunnel_name": oldest["tunnel_name"], "age_seconds": oldest["key_age"]["max_seconds"],
            "at": oldest["key_age"]["max_at"]},
        "open": opened,
    }


def build(histories: Mapping[str, Sequence[History]], policy_for: PolicyFor, start: float, end: float,
          manual_devices: Iterable[str] = ()) -> dict[str, Any]:
    """The report for accounts -> their records' histories over (start, end], without its digest."""
    manual = frozenset(manual_devices)
    accounts = []
    sources = []
    everyone: list[dict[str, Any]] = []
    owner: dict[str, str] = {}
    for account_id in sorted(histories):
        tunnels = []
        for h in sorted(histories[account_id], key=lambda h: h.tunnel_id):
            name = _name(h) or ""
            policy, max_age = policy_for(account_id, h.tunnel_id, name)
            t = _tunnel(h, policy, max_age, start, end, manual)
            used = t.pop("_sources")
            if used:
                sources.append({"path": h.path, "versions": used})
            tunnels.append(t)
            owner[h.tunnel_id] = account_id
        everyone.extend(tunnels)
        summary = _summary(tunnels)
        if summary["oldest_key"]:
            summary["oldest_key"]["account_id"] = account_id
        accounts.append({"account_id": account_id, "summary": summary, "tunnels": tunnels})
    return {"format": FORMAT, "period": {"from": rfc3339(start), "to": rfc3339(end)},
            "fleet": _summary(everyone, owner), "accounts": accounts, "sources": sources}


# -- integrity ---------------------------------------------------------------------------------------

def canonical(report: Mapping[str, Any]) -> bytes:
    """Sorted keys, no whitespace, the digest field excluded: what the digest covers."""
    return json.dumps({k: v for k, v in report.items() if k != "digest"}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def seal(report: dict[str, Any]) -> dict[str, Any]:
    return {**report, "digest": "sha256:" + hashlib.sha256(canonical(report)).hexdigest()}


def intact(report: Mapping[str, Any]) -> bool:
    return report.get("digest") == "sha256:" + hashlib.sha256(canonical(report)).hexdigest()


def differences(old: Any, new: Any, where: str = "") -> list[str]:
    """One line per difference between two reports (``where``: the JSON path)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            if key == "digest" and not where:
                continue
            path = f"{where}.{key}" if where else key
            if key not in new:
                out.append(f"{path}: in the file, not in Vault's history now")
            elif key not in old:
                out.append(f"{path}: in Vault's history now, not in the file")
            else:
                out.extend(differences(old[key], new[key], path))
        return out
    if isinstance(old, list) and isinstance(new, list):
        out = []
        for i in range(max(len(old), len(new))):
            path = f"{where}[{i}]"
            if i >= len(new):
                out.append(f"{path}: in the file, not in Vault's history now")
            elif i >= len(old):
                out.append(f"{path}: in Vault's history now, not in the file")
            else:
                out.extend(differences(old[i], new[i], path))
        return out
    if old != new:
        return [f"{where}: {json.dumps(old)} in the file, {json.dumps(new)} in Vault's history now"]
    return []


# -- renderers ---------------------------------------------------------------------------------------

def render_json(report: Mapping[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=True) + "\n"


CSV_COLUMNS = ("type", "account_id", "tunnel_id", "tunnel_name", "at", "until", "version", "rotation_id",
               "detail", "value")


def render_csv(report: Mapping[str, Any]) -> str:
    """One row per fact: a tunnel's figures, each rotation, rollback, drift, gap and interval over policy."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    period = report["period"]
    w.writerow(["period", "", "", "", period["from"], period["to"], "", "", FORMAT, ""])
    for acc in report["accounts"]:
        a = acc["account_id"]
        for t in acc["tunnels"]:
            tid, name, age = t["tunnel_id"], t["tunnel_name"] or "", t["key_age"]
            w.writerow(["tunnel", a, tid, name, "", "", t["current"]["version"] or "", t["current"]["rotation_id"] or "",
                        f"policy={t['policy']} max_age_seconds={t['max_age_seconds']} verdict={age['verdict']} "
                        f"state={t['current']['state']} open={'+'.join(t['current']['open']) or '-'}",
                        age["max_seconds"] if age["max_seconds"] is not None else ""])
            for r in t["rotations"]:
                w.writerow(["rotation", a, tid, name, r["at"], r["verified_at"] or "", r["version"], r["rotation_id"],
                            f"verified_by={r['verified_by']} device={r['device'] or '-'}"
                            + (f" acked_rotation_id={r['acked_rotation_id']}" if r.get("acked_rotation_id") else ""),
                            ""])
            for r in t["rollbacks"]:
                w.writerow(["rollback", a, tid, name, r["at"], r["completed_at"] or "", r["version"], r["rotation_id"],
                            r["reason"] or "", ""])
            for r in t["drifts"]:
                w.writerow(["drift", a, tid, name, r["at"], "", r["version"], r["rotation_id"],
                            f"cloudflare_generated_on={r['cloudflare_generated_on']}", ""])
            for g in t["gaps"]:
                w.writerow(["gap", a, tid, name, g["from"] or "", g["to"] or "", f"{g['versions'][0]}-{g['versions'][1]}",
                            "", g["reason"], ""])
            for o in age["over_policy"]:
                w.writerow(["over_policy", a, tid, name, o["from"], o["to"], "", "", "key older than max_age",
                            o["seconds"]])
    fleet = report["fleet"]
    for key in ("tunnels", "rotations", "rollbacks", "drifts", "gaps", "within_policy", "breached", "unprovable",
                "share_within_policy"):
        w.writerow(["summary", "", "", "", "", "", "", "", key, "" if fleet[key] is None else fleet[key]])
    for src in report["sources"]:
        w.writerow(["source", "", "", "", "", "", " ".join(map(str, src["versions"])), "", src["path"], ""])
    w.writerow(["digest", "", "", "", "", "", "", "", report.get("digest", ""), ""])
    return buf.getvalue()


_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22")
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#111}
h1{font-size:20px}h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #bbb;padding:3px 8px;text-align:left}
th{background:#eee}.breached{color:#b00;font-weight:bold}.within{color:#060}.mono{font-family:monospace}
svg{border:1px solid #ccc;background:#fff}.legend span{display:inline-block;margin-right:14px}
@media print{body{margin:0;font-size:11px}h2{page-break-before:auto}section{page-break-inside:avoid}
th{background:#ddd!important;-webkit-print-color-adjust:exact;print-color-adjust:exact}
svg{width:100%;height:auto}}
"""


def _days(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 86400:.1f} d"


def _chart(acc: Mapping[str, Any], start: float, end: float) -> str:
    """Inline SVG: each tunnel's key age over the period (days), and each policy's max_age as a dashed line."""
    width, height, left, bottom, top = 1000, 320, 60, 40, 16
    tunnels = acc["tunnels"]
    limits = sorted({t["max_age_seconds"] for t in tunnels if t["max_age_seconds"]})
    peak = max([t["key_age"]["max_seconds"] or 0 for t in tunnels] + limits + [86400])
    span = max(end - start, 1.0)

    def x(ts: float) -> float:
        return round(left + (ts - start) / span * (width - left - 10), 1)

    def y(age: float) -> float:
        return round(height - bottom - age / (peak * 1.1) * (height - bottom - top), 1)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" class="key-age-chart" data-account="{html.escape(acc["account_id"])}">',
             f'<title>Key age per tunnel, account {html.escape(acc["account_id"])}</title>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - 10}" y2="{height - bottom}" stroke="#000"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#000"/>']
    for frac in (0, 0.25, 0.5, 0.75, 1):
        ts = start + frac * span
        anchor = "start" if frac == 0 else "end" if frac == 1 else "middle"
        parts.append(f'<text x="{x(ts)}" y="{height - bottom + 16}" font-size="11" text-anchor="{anchor}">'
                     f'{time.strftime("%Y-%m-%d", time.gmtime(ts))}</text>')
        age = frac * peak * 1.1
        parts.append(f'<text x="{left - 6}" y="{y(age) + 4}" font-size="11" text-anchor="end">{age / 86400:.0f}d</text>')
    for limit in limits:
        parts.append(f'<line class="max-age" data-seconds="{limit}" x1="{left}" y1="{y(limit)}" x2="{width - 10}" '
                     f'y2="{y(limit)}" stroke="#b00" stroke-dasharray="6 4"/>'
                     f'<text x="{width - 14}" y="{y(limit) - 4}" font-size="11" fill="#b00" text-anchor="end">'
                     f'max_age {limit / 86400:g}d</text>')
    for i, t in enumerate(tunnels):
        color = _PALETTE[i % len(_PALETTE)]
        points: list[tuple[float, float]] = []
        for seg in t["key_age"]["segments"]:
            since = parse_time(seg["rotated_at"])
            a, b = parse_time(seg["from"]), parse_time(seg["to"])
            if seg["kind"] != "known" or since is None or a is None or b is None:
                if points:
                    parts.append(_polyline(t, color, points))
                    points = []
                continue
            points += [(x(a), y(a - since)), (x(b), y(b - since))]
        if points:
            parts.append(_polyline(t, color, points))
    parts.append("</svg>")
    return "".join(parts)


def _polyline(t: Mapping[str, Any], color: str, points: list[tuple[float, float]]) -> str:
    coords = " ".join(f"{px},{py}" for px, py in points)
    return (f'<polyline class="series" data-tunnel="{html.escape(t["tunnel_id"])}" fill="none" stroke="{color}" '
            f'stroke-width="2" points="{coords}"/>')


def render_html(report: Mapping[str, Any]) -> str:
    """One self-contained page: inline CSS and SVG, no scripts, no external assets; readable printed."""
    e = html.escape
    start, end = parse_time(report["period"]["from"]) or 0.0, parse_time(report["period"]["to"]) or 0.0
    fleet = report["fleet"]
    share = fleet["share_within_policy"]
    out = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
           f'<title>PSK rotation evidence {e(report["period"]["from"])} to {e(report["period"]["to"])}</title>',
           f"<style>{_CSS}</style></head><body>",
           f'<h1>PSK rotation evidence, {e(report["period"]["from"])} to {e(report["period"]["to"])}</h1>',
           "<p>Built from the Vault KV v2 version history of each tunnel's record and the configured policies. "
           "No key appears in this document.</p>",
           '<table class="fleet"><tr><th>tunnels</th><th>rotations</th><th>rollbacks</th><th>drifts</th>'
           "<th>within policy</th><th>breached</th><th>unprovable (gaps)</th><th>oldest key</th></tr>",
           f'<tr><td>{fleet["tunnels"]}</td><td>{fleet["rotations"]}</td><td>{fleet["rollbacks"]}</td>'
           f'<td>{fleet["drifts"]}</td><td>{fleet["within_policy"]}'
           f'{"" if share is None else f" ({share:.0%})"}</td><td>{fleet["breached"]}</td>'
           f'<td>{fleet["unprovable"]}</td><td>{_oldest(fleet["oldest_key"])}</td></tr></table>']
    opened = ", ".join(f"{k}: {len(v)}" for k, v in fleet["open"].items() if v) or "none"
    out.append(f"<p>Open items: {e(opened)}. Rotations by proof: "
               f'{e(", ".join(f"{k} {n}" for k, n in fleet["rotations_by_proof"].items()) or "none")}.</p>')
    for acc in report["accounts"]:
        out.append(f'<section><h2>Account <span class="mono">{e(acc["account_id"])}</span></h2>')
        out.append(_chart(acc, start, end))
        out.append('<p class="legend">' + "".join(
            f'<span style="color:{_PALETTE[i % len(_PALETTE)]}">&#9632; {e(t["tunnel_name"] or t["tunnel_id"])}</span>'
            for i, t in enumerate(acc["tunnels"])) + "</p>")
        out.append('<table class="tunnels"><tr><th>tunnel</th><th>policy (max_age)</th><th>max key age</th>'
                   "<th>over policy</th><th>verdict</th><th>rotations (verified by)</th><th>rollbacks</th>"
                   "<th>drifts</th><th>gaps</th><th>state</th></tr>")
        for t in acc["tunnels"]:
            age = t["key_age"]
            proofs = ", ".join(f'{r["at"]} v{r["version"]} {r["verified_by"]}' for r in t["rotations"]) or "-"
            backs = "; ".join(f'{r["at"]} {r["reason"] or ""}' for r in t["rollbacks"]) or "-"
            state = t["current"]["state"] + (f' ({", ".join(t["current"]["open"])})' if t["current"]["open"] else "")
            out.append(
                f'<tr><td>{e(t["tunnel_name"] or "")}<br><span class="mono">{e(t["tunnel_id"])}</span></td>'
                f'<td>{e(str(t["policy"]))} ({_days(t["max_age_seconds"])})</td><td>{_days(age["max_seconds"])}</td>'
                f'<td>{_days(age["over_policy_seconds"]) if age["over_policy"] else "-"}</td>'
                f'<td class="{e(age["verdict"])}">{e(age["verdict"])}</td><td>{e(proofs)}</td>'
                f'<td>{e(backs)}</td>'
                f'<td>{e(", ".join(r["at"] for r in t["drifts"]) or "-")}</td>'
                f'<td>{e("; ".join(_gap(g) for g in t["gaps"]) or "-")}</td>'
                f'<td>{e(state)}</td></tr>')
        out.append("</table></section>")
    out.append("<h2>Sources and integrity</h2><table><tr><th>Vault path</th><th>versions</th></tr>")
    out.extend(f'<tr><td class="mono">{e(s["path"])}</td><td>{e(" ".join(map(str, s["versions"])))}</td></tr>'
               for s in report["sources"])
    out.append(f'</table><p>SHA-256 of the canonical JSON report: <span class="mono">{e(report.get("digest", ""))}'
               "</span> (check with <span class=\"mono\">rotator report --check FILE.json</span>).</p></body></html>\n")
    return "".join(out)


def _oldest(oldest: Mapping[str, Any] | None) -> str:
    if not oldest:
        return "-"
    return html.escape(f'{oldest["tunnel_name"] or oldest["tunnel_id"]}: {_days(oldest["age_seconds"])} '
                       f'at {oldest["at"]}')


def _gap(g: Mapping[str, Any]) -> str:
    return f'versions {g["versions"][0]}-{g["versions"][1]} {g["reason"]} ({g["from"] or "?"} to {g["to"] or "?"})'


RENDERERS: dict[str, Callable[[Mapping[str, Any]], str]] = {"json": render_json, "csv": render_csv,
                                                            "html": render_html}


# -- from Vault and the configuration ----------------------------------------------------------------

def policy_lookup(settings: Any) -> PolicyFor:
    """(policy name, max_age) of a tunnel from the config's accounts and policies (``default`` for an
    account the file does not name, as ``rotator status`` does)."""
    def lookup(account_id: str, tunnel_id: str, name: str) -> tuple[str | None, float | None]:
        account = next((a for a in settings.accounts if a.id == account_id), None)
        chosen = account.policy_for(tunnel_id, name) if account else "default"
        policy = settings.policies.get(chosen) if chosen else None
        return (chosen, policy.max_age) if policy is not None else (None, None)

    return lookup


def collect(store: HistoryStore, account_ids: Sequence[str], policy_for: PolicyFor, start: float, end: float,
            manual_devices: Iterable[str] = ()) -> dict[str, Any]:
    """Read every record's history of the accounts and build the sealed report. A Vault failure for any
    record raises it (a report with a hole nobody asked for would be worse than none)."""
    histories: dict[str, list[History]] = {}
    for account_id in account_ids:
        read = store.history_many(account_id, store.list_records(account_id))
        for result in read.values():
            if isinstance(result, VaultError):
                raise result
        histories[account_id] = [h for h in read.values() if isinstance(h, History)]
    return seal(build(histories, policy_for, start, end, manual_devices))


def file_stem(account_id: str, start: float, end: float) -> str:
    """``psk-report-<account>-<from>-<to>``, times as ``20261101T000000Z``."""
    def stamp(ts: float) -> str:
        return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(ts))

    return f"psk-report-{account_id}-{stamp(start)}-{stamp(end)}"


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename: a reader
    sees the old file or the whole new one, never a part."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".psk-report-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o640)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_files(report: Mapping[str, Any], directory: str, stem: str, formats: Sequence[str]) -> list[str]:
    """The report in each format, written atomically as ``<directory>/<stem>.<format>``."""
    paths = []
    for fmt in formats:
        path = os.path.join(directory, f"{stem}.{fmt}")
        write_atomic(path, RENDERERS[fmt](report))
        paths.append(path)
    return paths
