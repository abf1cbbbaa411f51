"""The RotatorError tree: every known failure, with a one-line cause and a fix for the operator.

Adapters translate foreign exceptions (httpx, hvac) into these at the boundary, ``from exc``;
nothing from those libraries reaches the engine or the CLI.
"""

from __future__ import annotations


class RotatorError(Exception):
    """A known failure. ``str()`` is one line: what happened, then how to fix it."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(RotatorError):
    """Invalid configuration or usage: nothing was attempted."""

    exit_code = 2


class CloudflareError(RotatorError):
    """A Cloudflare API call failed.

    ``ambiguous`` is True when the request may have taken effect although we got no answer
    (transport error after sending, timeout, 5xx): the caller must not assume it did not.
    """

    def __init__(self, message: str, hint: str = "", status: int | None = None, code: int | None = None,
                 retryable: bool = False, ambiguous: bool = False) -> None:
        super().__init__(message, hint)
        self.status = status
        self.code = code
        self.retryable = retryable
        self.ambiguous = ambiguous


class VaultError(RotatorError):
    """A Vault call failed. ``ambiguous`` as for CloudflareError (a write may have landed)."""

    def __init__(self, message: str, hint: str = "", status: int | None = None,
                 retryable: bool = False, ambiguous: bool = False) -> None:
        super().__init__(message, hint)
        self.status = status
        self.retryable = retryable
        self.ambiguous = ambiguous


class CasConflict(VaultError):
    """A check-and-set write lost: someone else wrote the record since we read it."""


class LeaseHeld(RotatorError):
    """Another rotator holds the account lease."""
