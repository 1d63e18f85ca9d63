"""Fault injection for the reliability tests: a disk that fills up (or turns read-only) at the
N-th write, and the N-th file of an output folder damaged. The kill-and-resume tests are the
model: each fault must end in a one-line error or a repair, never a traceback or lost work."""

from __future__ import annotations

import builtins
import errno
import io
import os
import stat
from pathlib import Path


class DiskFaults:
    """Counts this process's file writes (an open for writing, an ``os.write`` to a regular
    file, an ``os.replace``) once armed; the N-th and every later one fails with ``error``:
    ENOSPC as a full disk does (the file is created, then the write fails: a 0-byte file is
    left, as on a real full disk), EROFS as a read-only mount does (nothing is created)."""

    def __init__(self, monkeypatch) -> None:
        self.fail_at: int | None = None
        self.error = errno.ENOSPC
        self.writes = 0  # writes counted since arming
        self.failed = 0  # writes made to fail
        real_open, real_replace, real_write = builtins.open, os.replace, os.write

        def fake_open(file, mode="r", *args, **kwargs):
            if isinstance(file, int) or not any(c in mode for c in "wax+"):
                return real_open(file, mode, *args, **kwargs)
            if self._fails():
                if self.error == errno.ENOSPC:
                    real_open(file, mode, *args, **kwargs).close()
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                raise OSError(self.error, os.strerror(self.error), str(file))
            return real_open(file, mode, *args, **kwargs)

        def fake_replace(src, dst, *args, **kwargs):
            if self._fails():
                raise OSError(self.error, os.strerror(self.error), str(dst))
            return real_replace(src, dst, *args, **kwargs)

        def fake_write(fd, data):
            if fd > 2 and stat.S_ISREG(os.fstat(fd).st_mode) and self._fails():
                raise OSError(self.error, os.strerror(self.error))
            return real_write(fd, data)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)
        monkeypatch.setattr(os, "replace", fake_replace)
        monkeypatch.setattr(os, "write", fake_write)

    def arm(self, n: int, error: int = errno.ENOSPC) -> DiskFaults:
        """Fail the n-th write from now on (1: the next one) and every one after it."""
        self.fail_at, self.error, self.writes, self.failed = n, error, 0, 0
        return self

    def disarm(self) -> None:
        """The disk has room again."""
        self.fail_at = None

    def _fails(self) -> bool:
        if self.fail_at is None:
            return False
        self.writes += 1
        if self.writes >= self.fail_at:
            self.failed += 1
            return True
        return False


def files_of(folder: Path, pattern: str = "*") -> list[Path]:
    """The regular files under ``folder`` matching ``pattern``, in a stable order."""
    return sorted(p for p in Path(folder).rglob(pattern) if p.is_file())


def corrupt_nth(folder: Path, n: int, how: str = "flip", pattern: str = "*") -> Path:
    """Damage the n-th (0-based) file of ``folder`` matching ``pattern``: ``flip`` one bit in
    its middle, ``truncate`` it to half, ``zero`` every byte, or ``delete`` it. Returns it."""
    path = files_of(folder, pattern)[n]
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "zero":
        path.write_bytes(bytes(len(data)))
    elif how == "delete":
        path.unlink()
    else:
        raise ValueError(f"unknown damage {how!r}")
    return path
