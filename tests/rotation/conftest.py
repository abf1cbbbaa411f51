"""In-memory protocol tests: the engine against the fakes of tests/fakes.py, no network."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import stamina


@pytest.fixture(autouse=True)
def _no_backoff() -> Iterator[None]:
    stamina.set_testing(True)
    yield
    stamina.set_testing(False)
