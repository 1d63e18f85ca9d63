"""The one base of every error l2s reports to a user (`L2SError`) and the error of an unusable
option value or config file (`ConfigError`, raised from any layer); how an exception becomes
part of a one-line error message (`one_line`); which exceptions mean the machine ran out of memory
(`out_of_memory`)."""

from __future__ import annotations


class L2SError(Exception):
    """Base of every user-facing l2s error: its message says what was wrong and what to do.

    The CLI turns exactly this type into a one-line error; each subclass also derives from the
    builtin it has always been (ValueError, RuntimeError), so existing ``except`` clauses hold."""


class ConfigError(L2SError, ValueError):
    """An option value or a config file is unusable; the message says which and what works.
    (Here, not in ``l2s.config``, so that every layer, the engine included, can raise it.)"""


def one_line(e: BaseException, limit: int = 300) -> str:
    """`TypeName: first line of the message` (at most `limit` characters of it), or only the
    type's name when the message is empty (`OSError()`)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` says an allocation failed: Python's MemoryError, torch's OutOfMemoryError
    (CUDA), or the RuntimeError torch's CPU allocator raises ("can't allocate memory")."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)
