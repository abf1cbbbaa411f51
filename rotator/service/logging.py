"""structlog setup: JSON lines when not on a terminal, readable console output on one.

Redaction is the second line of defence behind the self-redacting ``Secret`` type: a processor
that masks known-secret keys and any registered secret value wherever it appears in a string.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from rotator.secret import Secret

SECRET_KEYS = frozenset({"psk", "pending_psk", "previous_psk", "token", "api_token", "api_key", "secret_id",
                         "vault_token", "authorization", "x-vault-token", "x-auth-key", "jwt", "password"})
REDACTED = "**redacted**"


class Redactor:
    """A structlog processor: masks secret-named keys and any value registered with ``add``."""

    def __init__(self) -> None:
        self._values: set[str] = set()

    def add(self, value: str | Secret | None) -> None:
        text = value.reveal() if isinstance(value, Secret) else value
        if text and len(text) >= 8:
            self._values.add(text)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, Secret):
            return REDACTED
        if isinstance(value, str):
            for secret in self._values:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {k: REDACTED if str(k).lower() in SECRET_KEYS else self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(v) for v in value]
        return value

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key in list(event):
            event[key] = REDACTED if key.lower() in SECRET_KEYS else self._clean(event[key])
        return event


def configure(redactor: Redactor, stream: TextIO | None = None, json: bool | None = None,
              level: int = logging.INFO, drop: frozenset[str] = frozenset()) -> None:
    """``drop``: events not logged at all (a one-shot command prints them itself, once)."""
    stream = stream or sys.stderr

    def dropper(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if event.get("event") in drop:
            raise structlog.DropEvent
        return event

    as_json = (not stream.isatty()) if json is None else json
    renderer: Any = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            dropper,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redactor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
