"""How an exception becomes part of a one-line error message: `one_line`."""

from __future__ import annotations


def one_line(e: BaseException, limit: int = 300) -> str:
    """`TypeName: first line of the message` (at most `limit` characters of it), or only the
    type's name when the message is empty (`OSError()`)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__
