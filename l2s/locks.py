"""Owner files: who holds a folder (a lock) or a piece of work (a claim), and when a holder is
gone.

An owner file is created with O_EXCL and holds ``HOST PID START``: the machine, the process
and the process's start time (``/proc/PID/stat``; ``-`` where there is none), so a pid the
system reused for another process does not keep a dead holder's file alive. While a process
holds files, a daemon thread touches them every ``HEARTBEAT_S`` seconds; a holder is gone

- on this machine: at once, when its pid is not running or runs another process;
- on another machine: when its file has not been touched for ``STALE_S`` seconds (files
  without a start time, written before the heartbeat existed, after ``OLD_STALE_S``).

A gone holder's file is taken over. ``exclusive`` is the lock of one output folder (`l2s
bench` per shard, `l2s train`): a second process on the same folder is refused naming the
first; ``AttentionCache.claim`` is the claim of one image in a shared cache.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from l2s.errors import L2SError, is_write_failure, write_failed

HEARTBEAT_S = 60.0  # how often a holder touches its files
STALE_S = 10 * 60.0  # another machine's file untouched this long: its holder is gone
OLD_STALE_S = 6 * 3600.0  # the same for files written before heartbeats (no start time)


class LockError(L2SError, RuntimeError):
    """Another live process holds the folder this run would write."""


def process_start(pid: int) -> str:
    """The start time of process ``pid`` (clock ticks after boot, from /proc), or ``-`` where
    the system does not say (not Linux, or no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return "-"


def owner_text() -> str:
    return f"{socket.gethostname()} {os.getpid()} {process_start(os.getpid())}\n"


@dataclass(frozen=True)
class Holder:
    """What an owner file says of its holder."""

    host: str
    pid: int
    start: str | None  # None: a file from before start times were written
    age: float  # seconds since the file was last touched

    def __str__(self) -> str:
        here = "" if self.host == socket.gethostname() else f" on {self.host}"
        return f"pid {self.pid}{here}"


def holder(path: Path) -> Holder | None:
    """The holder an owner file names; None when it cannot be read (gone, half-written)."""
    try:
        fields = path.read_text().split()
        age = time.time() - path.stat().st_mtime
        return Holder(fields[0], int(fields[1]), fields[2] if len(fields) > 2 else None, age)
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None


def is_gone(h: Holder | None) -> bool:
    """Whether the holder of an owner file is gone (see the module's docstring)."""
    if h is None:
        return True  # unreadable or half-written: nobody can own it
    if h.host != socket.gethostname():
        return h.age > (OLD_STALE_S if h.start is None else STALE_S)
    try:
        os.kill(h.pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    # the pid runs: the same process only if it started when the file says
    return h.start not in (None, "-") and process_start(h.pid) not in ("-", h.start)


def take(path: Path) -> Holder | None:
    """Create the owner file ``path`` for this process, taking it over from a gone holder;
    None when taken, else the live holder. The file is touched by the heartbeat until
    ``release``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(5):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            h = holder(path)
            if h is None and attempt < 4 and _young(path):
                time.sleep(0.05)  # being written this instant: read it again
                continue
            if not is_gone(h):
                return h
            path.unlink(missing_ok=True)
            continue
        try:
            with os.fdopen(fd, "w") as f:
                f.write(owner_text())
        except OSError as e:
            path.unlink(missing_ok=True)
            if is_write_failure(e):
                raise write_failed(e, path) from None
            raise
        _beat(path, True)
        return None
    h = holder(path)
    return h if h is not None else Holder("?", 0, None, 0.0)


def release(path: Path) -> None:
    """Remove an owner file this process took."""
    _beat(path, False)
    path.unlink(missing_ok=True)


def _young(path: Path) -> bool:
    try:
        return time.time() - path.stat().st_mtime < 2
    except OSError:
        return False


@contextmanager
def exclusive(path: Path, what: str, out: str | Path):
    """Hold the lock file ``path`` of the output folder ``out`` for the body; refused with a
    LockError naming the live process that holds it (a gone holder's lock is taken over)."""
    h = take(path)
    if h is not None:
        raise LockError(f"{out} is in use by another {what} ({h}, running for "
                        f"{_since(path)}): wait for it to finish, or pass another --out. "
                        f"If that process is gone, delete {path}")
    try:
        yield
    finally:
        release(path)


def _since(path: Path) -> str:
    try:
        s = time.time() - path.stat().st_ctime
    except OSError:
        return "a moment"
    return f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"


# --- heartbeat: held files are touched while this process lives -------------------------
_held: set[Path] = set()
_lock = threading.Lock()
_thread: threading.Thread | None = None


def _beat(path: Path, hold: bool) -> None:
    global _thread
    with _lock:
        (_held.add if hold else _held.discard)(path)
        if hold and (_thread is None or not _thread.is_alive()):
            _thread = threading.Thread(target=_heartbeat, name="l2s-heartbeat", daemon=True)
            _thread.start()


def _heartbeat() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        with _lock:
            paths = list(_held)
        for p in paths:
            try:
                os.utime(p)
            except OSError:
                pass
