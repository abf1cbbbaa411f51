"""Reading JSON that crossed a boundary (an API's answer, a device's, a request to the admin API).

``json.loads`` raises ``RecursionError``, not ``ValueError``, on deeply nested input (100,000
brackets are a few hundred kilobytes): left alone, it escapes every ``except ValueError`` and kills
the run with a traceback while keys are pending (issue 20, item 4). Here every failure to parse is
a ``ValueError``, so each boundary's existing "garbage" handling covers it too (docs/design.md
section 7: a garbage answer is an adapter error; section 4: an ambiguous one leaves the key pending).
"""

from __future__ import annotations

import json
from typing import Any


class NotJson(ValueError):
    """What arrived is not JSON we can read (malformed, or nested deeper than the parser goes)."""


def loads(data: bytes | bytearray | str) -> Any:
    """``json.loads`` whose only failure is ``NotJson`` (a ``ValueError``)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise NotJson("JSON nested too deeply to read") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise NotJson(f"not JSON ({type(exc).__name__})") from None
