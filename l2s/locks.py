"""Owner files: who holds a folder (a lock) or a piece of work (a claim), and when a holder is
gone.

An owner file is created with O_EXCL and holds ``HOST PID START``: the machine, the process
and the process's start time (``/proc/PID/stat``; ``-`` where there is none), so a pid the
system reused for another process does not keep a dead holder's file alive. While a process
holds files, a daemon thread touches them every ``HEARTBEAT_S`` seconds; a holder is gone

- on this machine: at once, when its pid is not running or runs another process;
- on another machine: when its file has not been touched for ``STALE_S`` seconds (files
  without a start time, written before the heartbeat existed, after ``OLD_STALE_S``).

Clocks. The silence of another machine's holder is measured on the clock that stamps the
files of the folder: a probe file written there gives "now" (``fs_now``), so a file server
that stamps times itself (NFS) makes the machines' own clocks irrelevant. Where each machine
stamps its own times (some FUSE or SMB mounts), their clocks must agree within a few minutes
(NTP): a holder whose clock runs more than ``STALE_S`` behind looks silent and loses its file.
A heartbeat more than ``CLOCK_TOLERANCE_S`` in the future cannot be judged at all: such a file
is never taken over, and the error or the list of writers says whose clock is ahead and which
file to delete once that process is gone (``Holder.ahead``), so it is not held in silence.

A gone holder's file is taken over under a takeover guard (an ``flock`` on ``.l2s-takeover``
in the same folder, released by the system if its process dies): the file is read and judged
again under the guard before it is removed and created anew, so two processes that both found
the same stale file cannot both take it over. ``exclusive`` is the lock of one output folder
(`l2s bench` per shard, `l2s train`): a second process on the same folder is refused naming
the first; ``AttentionCache.claim`` is the claim of one image in a shared cache.
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

try:
    import fcntl
except ImportError:  # not POSIX: takeovers are not serialised
    fcntl = None

HEARTBEAT_S = 60.0  # how often a holder touches its files
STALE_S = 10 * 60.0  # another machine's file untouched this long: its holder is gone
OLD_STALE_S = 6 * 3600.0  # the same for files written before heartbeats (no start time)
CLOCK_TOLERANCE_S = 5 * 60.0  # a heartbeat further in the future than this: clocks disagree
GUARD_NAME = ".l2s-takeover"  # the takeover guard of a folder's owner files


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
    age: float  # seconds since the file was last touched (on the folder's clock)

    @property
    def here(self) -> bool:
        return self.host == socket.gethostname()

    @property
    def ahead(self) -> float:
        """How far (seconds) another machine's heartbeat lies in the future beyond the
        tolerance: its clock and the folder's disagree, so its silence cannot be measured;
        0 when it can."""
        return 0.0 if self.here or -self.age <= CLOCK_TOLERANCE_S else -self.age

    def __str__(self) -> str:
        if self.here:
            return f"pid {self.pid}"
        if self.ahead:
            return (f"pid {self.pid} on {self.host}, whose heartbeat is {_duration(self.ahead)} "
                    "ahead of this folder's clock")
        return f"pid {self.pid} on {self.host}"


def holder(path: Path) -> Holder | None:
    """The holder an owner file names; None when it cannot be read (gone, half-written)."""
    try:
        fields = path.read_text().split()
        host, pid = fields[0], int(fields[1])
        mtime = path.stat().st_mtime
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None
    now = time.time() if host == socket.gethostname() else fs_now(path.parent)
    return Holder(host, pid, fields[2] if len(fields) > 2 else None, now - mtime)


def is_gone(h: Holder | None) -> bool:
    """Whether the holder of an owner file is gone (see the module's docstring)."""
    if h is None:
        return True  # unreadable or half-written: nobody can own it
    if not h.here:
        if h.ahead:
            return False  # its silence cannot be measured: never taken over
        return h.age > (OLD_STALE_S if h.start is None else STALE_S)
    try:
        os.kill(h.pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    # the pid runs: the same process only if it started when the file says
    return h.start not in (None, "-") and process_start(h.pid) not in ("-", h.start)


_offsets: dict[Path, tuple[float, float]] = {}  # folder -> (monotonic time, fs - time.time())


def fs_now(folder: Path) -> float:
    """Now, by the clock that stamps the files of ``folder`` (a file server's, for NFS): the
    modification time of a probe file touched there, remembered for a few seconds per folder.
    This machine's clock where nothing can be written there."""
    seen = _offsets.get(folder)
    if seen is not None and time.monotonic() - seen[0] < 10:
        return time.time() + seen[1]
    probe = folder / f".l2s-clock-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o644))
        try:
            os.utime(probe)  # stamped "now" by whoever stamps this folder's files
            offset = probe.stat().st_mtime - time.time()
        finally:
            probe.unlink(missing_ok=True)
    except OSError:
        return time.time()
    _offsets[folder] = (time.monotonic(), offset)
    return time.time() + offset


def take(path: Path) -> Holder | None:
    """Create the owner file ``path`` for this process, taking it over from a gone holder;
    None when taken, else the live holder. The file is touched by the heartbeat until
    ``release``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(5):
        if _create(path):
            return None
        h = holder(path)
        if h is None and attempt < 4 and _young(path):
            time.sleep(0.05)  # being written this instant: read it again
            continue
        if not is_gone(h):
            return h
        with _takeover_guard(path.parent):
            # Judged again under the guard: another process that found the same gone holder
            # may have taken the file over since; only its live file is there then.
            h = holder(path)
            if h is None and _young(path) or not is_gone(h):
                continue
            path.unlink(missing_ok=True)
            if _create(path):
                return None
    h = holder(path)
    return h if h is not None else Holder("?", 0, None, 0.0)


def _create(path: Path) -> bool:
    """Create ``path`` holding this process's owner text; False when it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w") as f:
            f.write(owner_text())
    except OSError as e:
        path.unlink(missing_ok=True)
        if is_write_failure(e):
            raise write_failed(e, path) from None
        raise
    _beat(path, True)
    return True


@contextmanager
def _takeover_guard(folder: Path):
    """Hold the takeover guard of ``folder`` (an exclusive ``flock``; the system releases it
    when its process dies, so a killed taker leaves nothing to clean up)."""
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(folder / GUARD_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if is_write_failure(e):
            raise write_failed(e, folder / GUARD_NAME) from None
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a filesystem without locks: judged again, but not serialised
            pass
        yield
    finally:
        os.close(fd)  # releases the flock


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
        if h.ahead:
            raise LockError(f"{out} is held by another {what} ({h}): the clocks of the machines "
                            "sharing this folder disagree, so l2s cannot tell whether that "
                            "process is alive. Set the clocks right (NTP); if that process is "
                            f"gone, delete {path}")
        raise LockError(f"{out} is in use by another {what} ({h}, {_running(h)}): wait for it "
                        f"to finish, or pass another --out. If that process is gone, delete "
                        f"{path}")
    try:
        yield
    finally:
        release(path)


def _running(h: Holder) -> str:
    """How long the holder has run (this machine: from /proc), or when it was last heard of."""
    if h.here and h.start not in (None, "-"):
        try:
            uptime = float(Path("/proc/uptime").read_text().split()[0])
            return f"running for {_duration(uptime - int(h.start) / os.sysconf('SC_CLK_TCK'))}"
        except (OSError, ValueError, IndexError):
            pass
    return f"last heard of {_duration(max(h.age, 0.0))} ago"


def _duration(s: float) -> str:
    if s >= 2 * 86400:
        return f"{s / 86400:.0f} days"
    if s >= 2 * 3600:
        return f"{s / 3600:.0f} h"
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
