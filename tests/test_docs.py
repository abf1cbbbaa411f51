"""The repository explains itself: every document the code, tests and docs cite is in the repository,
and every cited section of docs/design.md exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED = re.compile(r"\b((?:docs/)[\w./-]+\.md)\b")
SECTION = re.compile(r"docs/design\.md,? sections? ([0-9]+(?:(?:,| and) [0-9]+)*)")


def tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / p for p in out.split() if p.endswith((".py", ".md", ".toml", ".yml", ".yaml", ".sh"))
            or p in ("Makefile", "Dockerfile")]


def test_every_cited_document_is_in_the_repository() -> None:
    missing, outside = [], []
    for path in tracked():
        text = path.read_text(encoding="utf-8", errors="replace")
        for ref in set(CITED.findall(text)):
            if not (ROOT / ref).is_file():
                missing.append(f"{path.relative_to(ROOT)} cites {ref}")
        if re.search(r"\bshared/(specs|DESIGN)", text) or re.search(r"(?<![\w/])DESIGN\.md", text):
            outside.append(str(path.relative_to(ROOT)))
    assert not missing, missing
    assert not outside, f"cite docs/design.md and docs/specs/ instead: {outside}"


def test_every_cited_section_of_the_design_exists() -> None:
    sections = set(re.findall(r"^## ([0-9]+)\.", (ROOT / "docs/design.md").read_text(), flags=re.M))
    assert {"2", "4", "9", "10"} <= sections
    bad = []
    for path in tracked():
        for group in SECTION.findall(path.read_text(encoding="utf-8", errors="replace")):
            bad += [f"{path.relative_to(ROOT)}: section {n}" for n in re.findall(r"[0-9]+", group) if n not in sections]
    assert not bad, bad
