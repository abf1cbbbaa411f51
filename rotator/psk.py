"""PSK generation from a policy: the ``secrets`` module's randomness, no modulo bias, fast in bulk.

Randomness is drawn with ``os.urandom`` (what ``secrets`` uses) and mapped to the alphabet by
rejection sampling done inside ``bytes.translate``: a byte ``b`` below the largest multiple of the
alphabet size maps to ``alphabet[b % size]``; larger bytes are dropped. Every character is
therefore exactly uniform, and the hot loop runs in C.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Final

from rotator.errors import ConfigError
from rotator.secret import Secret

ALNUM: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
PRESETS: Final[dict[str, tuple[str, str]]] = {
    # name: (alphabet, characters not allowed first)
    "alnum": (ALNUM, ""),
    # AWS site-to-site VPN: letters, digits, '.', '_'; must not start with '0'.
    "aws": (ALNUM + "._", "0"),
    "hex": ("0123456789abcdef", ""),
}
MIN_LENGTH, MAX_LENGTH, MIN_ENTROPY_BITS = 24, 128, 128


@dataclass(frozen=True, slots=True)
class PskPolicy:
    length: int = 32
    alphabet: str = ALNUM
    forbidden_first: str = ""

    @classmethod
    def preset(cls, name: str = "alnum", length: int = 32) -> PskPolicy:
        if name not in PRESETS:
            raise ConfigError(f"unknown PSK charset preset {name!r}", f"use one of {', '.join(sorted(PRESETS))}")
        alphabet, forbidden = PRESETS[name]
        return cls(length, alphabet, forbidden).validated()

    @property
    def entropy_bits(self) -> float:
        first = len(set(self.alphabet) - set(self.forbidden_first))
        return math.log2(first) + (self.length - 1) * math.log2(len(set(self.alphabet)))

    def validated(self) -> PskPolicy:
        """Return self, or raise ConfigError naming what is wrong with this policy."""
        if not MIN_LENGTH <= self.length <= MAX_LENGTH:
            raise ConfigError(f"psk length {self.length} is outside {MIN_LENGTH}..{MAX_LENGTH}",
                              "set policy.psk_length within the allowed range")
        if len(set(self.alphabet)) != len(self.alphabet) or len(self.alphabet) < 2:
            raise ConfigError("psk alphabet must hold at least two distinct characters, each once",
                              "fix policy.psk_alphabet")
        if len(self.alphabet) > 256 or any(ord(c) > 126 or ord(c) < 33 for c in self.alphabet):
            raise ConfigError("psk alphabet must be printable ASCII without spaces", "fix policy.psk_alphabet")
        if not set(self.alphabet) - set(self.forbidden_first):
            raise ConfigError("no character is allowed first in the psk", "shorten policy.psk_forbidden_first")
        if self.entropy_bits < MIN_ENTROPY_BITS:
            raise ConfigError(
                f"psk policy gives {self.entropy_bits:.0f} bits of entropy, under the floor of {MIN_ENTROPY_BITS}",
                "make the psk longer or its alphabet larger",
            )
        return self


class _Sampler:
    """Uniform characters from an alphabet, in bulk, by rejection inside bytes.translate."""

    __slots__ = ("_delete", "_size", "_table")

    def __init__(self, alphabet: str) -> None:
        size = len(alphabet)
        limit = 256 - 256 % size
        table = bytearray(range(256))
        for b in range(limit):
            table[b] = ord(alphabet[b % size])
        self._table = bytes(table)
        self._delete = bytes(range(limit, 256))
        self._size = limit

    def draw(self, count: int) -> bytes:
        out = bytearray()
        while len(out) < count:
            need = count - len(out)
            raw = os.urandom(need * 256 // self._size + 16)
            out += raw.translate(self._table, self._delete)
        return bytes(out[:count])


class PskGenerator:
    """Generates PSKs for one policy. Build once; ``generate(n)`` is the fast path."""

    def __init__(self, policy: PskPolicy) -> None:
        self.policy = policy.validated()
        first_alphabet = "".join(c for c in policy.alphabet if c not in policy.forbidden_first)
        self._body = _Sampler(policy.alphabet)
        self._first = _Sampler(first_alphabet) if policy.forbidden_first else None

    def generate(self, count: int = 1) -> list[Secret]:
        length = self.policy.length
        if self._first is None:
            chars = self._body.draw(count * length).decode("ascii")
            return [Secret(chars[i:i + length]) for i in range(0, count * length, length)]
        firsts = self._first.draw(count).decode("ascii")
        rest = self._body.draw(count * (length - 1)).decode("ascii")
        step = length - 1
        return [Secret(firsts[i] + rest[i * step:(i + 1) * step]) for i in range(count)]
