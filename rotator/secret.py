"""A value that never shows itself: the one type every key and token travels in."""

from __future__ import annotations

import json
from collections.abc import Iterable

REDACTED = "**redacted**"


class Secret:
    """A value that never shows itself: repr and str are redacted; ``reveal()`` is explicit."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**redacted**')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret is not picklable")


def redact(text: str, keys: Iterable[str]) -> str:
    """``text`` without any of ``keys``, raw or as escaped inside a JSON string, longest first (so a
    key that contains another is never left half shown). For reason texts quoted from outside."""
    for key in sorted({k for k in keys if k}, key=len, reverse=True):
        for form in {key, json.dumps(key)[1:-1]}:
            if form in text:
                text = text.replace(form, REDACTED)
    return text
