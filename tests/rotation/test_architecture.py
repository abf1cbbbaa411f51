"""rotation/ stays the protocol: no I/O libraries, small functions (docs/design.md section 6)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROTATION = Path(__file__).resolve().parents[2] / "rotator" / "rotation"
FORBIDDEN = {"httpx", "hvac", "vici", "apscheduler", "prometheus_client", "uvicorn", "starlette"}
MODULES = sorted(ROTATION.glob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_rotation_imports_no_io_library(path: Path) -> None:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    bad = {name for name in names if name.split(".")[0] in FORBIDDEN}
    bad |= {name for name in names if name.startswith(("rotator.adapters", "rotator.service", "rotator.wiring"))}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_function_in_rotation_is_over_40_lines(path: Path) -> None:
    tree = ast.parse(path.read_text())
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno
            and n.end_lineno - n.lineno + 1 > 40]
    assert not long, f"{path.name}: {long}"
