"""The one base of every error l2s reports to a user (`L2SError`) and the error of an unusable
option value or config file (`ConfigError`, raised from any layer); how an exception becomes
part of a one-line error message (`one_line`); which exceptions mean the machine ran out of memory
(`out_of_memory`) or a file could not be written (`WriteError`, `write_failed`)."""

from __future__ import annotations

import errno
from pathlib import Path


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


# A write that fails for one of these is the machine's state, not a bug: said in one line.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES,
                errno.EPERM, errno.EIO)


class WriteError(L2SError, OSError):
    """A file could not be written (a full disk, a read-only or vanished folder)."""


def write_failed(e: OSError, path: str | Path) -> WriteError:
    """The one-line error for ``e`` raised while writing ``path``: the file, its folder, the
    system's reason and the fix."""
    path = Path(path)
    err = WriteError(f"cannot write {path} ({e.strerror or one_line(e)}): free space on the "
                     f"disk of {path.parent} (or make it writable), or write elsewhere, then "
                     "run the command again")
    err.errno = e.errno
    return err


def is_write_failure(e: BaseException) -> bool:
    """Whether ``e`` is an OSError a full or read-only disk raises."""
    return isinstance(e, OSError) and e.errno in WRITE_ERRNOS
