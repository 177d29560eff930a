"""One-line notes to the user on stderr, each said once per process however often it applies."""

from __future__ import annotations

import sys

_said: set[str] = set()


def notice(message: str, *, key: str | None = None) -> None:
    """Print ``note: message`` to stderr unless a note with the same ``key`` (default: the message)
    was already printed by this process."""
    key = message if key is None else key
    if key in _said:
        return
    _said.add(key)
    print(f"note: {message}", file=sys.stderr)
