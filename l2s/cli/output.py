"""Where CLI output goes: rich to stderr for people, JSON to stdout for programs."""

from __future__ import annotations

import inspect
import json
import os
import sys
from collections.abc import Callable
from functools import wraps

import typer
from rich.console import Console
from rich.markup import escape

from l2s.errors import L2SError, is_write_failure, one_line, out_of_memory

# progress, tables and logs; no emoji codes: messages quote user input, and rich would print
# `--method best-of:-1:` as "best-of👎"
console = Console(stderr=True, emoji=False)
if not console.is_terminal and "COLUMNS" not in os.environ:
    # Off a terminal (logs, pipes, CI) rich would wrap at 80 columns, cutting the paths and
    # ids people copy from tables; a wide page keeps each value on one line.
    console.width = 200


def emit_json(obj) -> None:
    """Write one JSON document to stdout."""
    from l2s.inversion.cache import finite_json

    # NaN would make the document invalid JSON
    sys.stdout.write(json.dumps(finite_json(obj), indent=2, default=str) + "\n")


# What to do when a command runs out of memory, in the options each command has, by the
# module of l2s.cli that defines the command.
MEMORY_ADVICE = {
    "steer": "use a smaller --image-size, fewer --num-images or a machine with more memory",
    "bench": "use a smaller --batch-size or --image-size, or a machine with more memory",
    "speed": "use a smaller --image-size or a machine with more memory",
    "invert": "use a smaller --batch-size or a machine with more memory",
    "train": "use a smaller --batch-size (or --d-model, --depth), fewer samples (--limit, "
             "--data) or a machine with more memory",
    "classifier": "import on a machine with more memory (the backbone is loaded to check "
                         "the checkpoint against it; L2S_DEVICE=cpu loads it in main memory)",
}


def user_errors(fn: Callable) -> Callable:
    """Turn every user-facing l2s error (``l2s.errors.L2SError``, the one base they all share)
    into a one-line message and exit code 2, no traceback; so does running out of memory
    (with the advice of the command ``fn`` belongs to, ``MEMORY_ADVICE``). Anything else is a
    bug and keeps its traceback."""
    memory_advice = MEMORY_ADVICE.get(fn.__module__.rsplit(".", 1)[-1], MEMORY_ADVICE["steer"])

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except L2SError as e:
            if _verbosity > 0:  # --verbose: where it was raised, for a bug report
                import traceback

                console.print(traceback.format_exc().rstrip(), markup=False, highlight=False)
            # escape: messages quote user input and examples with [brackets] in them;
            # soft_wrap: one line at any terminal width, to read and to copy
            console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False,
                          soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as e:  # a full or read-only disk met outside l2s's own writers
            if not is_write_failure(e):
                raise
            where = f" ({e.filename})" if e.filename else ""
            console.print(f"[bold red]error:[/] cannot write{escape(where)}: "
                          f"{escape(e.strerror or one_line(e))}: free space on that disk (or "
                          "make it writable), or write elsewhere, then run the command again",
                          highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except (MemoryError, RuntimeError) as e:  # torch's OutOfMemoryError included
            if not out_of_memory(e):
                raise
            console.print(f"[bold red]error:[/] out of memory ({escape(one_line(e, 200))}): "
                          f"{memory_advice}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


# How much a command tells on stderr while it works: -1 --quiet, 0 default, 1 --verbose.
_verbosity = 0
PROGRESS_EVERY = 10.0  # seconds between one-line statuses off a terminal (and with --json)
# The longest a status line stays silent while one long unit (a bench batch, an inversion
# batch, an epoch) runs: the last line is told again, "still working", on a timer.
HEARTBEAT_EVERY = 30.0


def verbosity() -> int:
    return _verbosity


def output_options(command: Callable) -> Callable:
    """Give ``command`` --quiet and --verbose, which set how much it tells on stderr while it
    works (its results, warnings and errors always print): every command takes them, declared
    once here."""
    sig = inspect.signature(command)
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                               default=typer.Option(False, flag, help=text))
             for name, flag, text in (
                 ("quiet", "--quiet", "No progress or status lines on stderr (results, "
                                      "warnings and errors still print)."),
                 ("verbose", "--verbose", "A status line at every step of progress, also on "
                                          "a terminal, and the traceback of an error."))]
    params = list(sig.parameters.values())
    # keyword-only parameters go last; typer reads the order for --help only
    params = [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in params] + \
        [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in added]

    @wraps(command)
    def wrapper(*args, quiet: bool = False, verbose: bool = False, **kwargs):
        global _verbosity
        if quiet and verbose:
            raise typer.BadParameter("--quiet and --verbose contradict each other: give one")
        ctx = kwargs.get("ctx")
        if ctx is not None:  # commands that build their config from ctx.params
            ctx.params.pop("quiet", None)
            ctx.params.pop("verbose", None)
        before, _verbosity = _verbosity, -1 if quiet else 1 if verbose else 0
        try:
            return command(*args, **kwargs)
        finally:
            _verbosity = before

    wrapper.__signature__ = sig.replace(parameters=params)
    wrapper.__annotations__ = {**getattr(command, "__annotations__", {}),
                               "quiet": bool, "verbose": bool}
    return wrapper


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class _Heartbeat:
    """Calls ``beat(now)`` about once a second on a daemon thread, from ``start`` to
    ``stop``. The one lock (``lock``) is taken around each beat, and by the owner around its
    own status lines, so the two never interleave; the beat only reads the owner's state and
    prints."""

    def __init__(self, beat: Callable[[float], None], now: Callable[[], float]) -> None:
        import threading

        self.lock = threading.Lock()
        self._beat, self._now = beat, now
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        import threading

        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="l2s-heartbeat", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, HEARTBEAT_EVERY / 10)):
            with self.lock:
                if not self._stop.is_set():
                    self._beat(self._now())


class LineProgress:
    """The part of ``rich.progress.Progress`` the commands use, told as one-line statuses on
    stderr: "<task>: done/total (percent), rate/s, ETA m:ss, <info>", at a task's first
    update, then at most every ``every`` seconds and when it completes. For logs, pipes and
    --json, where a bar would be control codes or nothing."""

    def __init__(self, info: Callable[[dict], str] | None = None, every: float = PROGRESS_EVERY,
                 enabled: bool = True) -> None:
        import time
        from types import SimpleNamespace

        self.info, self.every, self.enabled = info, every, enabled
        self.console = console
        self.live = SimpleNamespace(is_started=False)
        self._tasks: list[dict] = []
        self._now = time.monotonic
        self._heart = _Heartbeat(self._beat, lambda: self._now())

    def __enter__(self) -> LineProgress:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.live.is_started = True
        if self.enabled:
            self._heart.start()

    def stop(self) -> None:
        self.live.is_started = False
        self._heart.stop()

    def _beat(self, now: float) -> None:
        """Tell an unfinished task's line again when it has been silent HEARTBEAT_EVERY s."""
        for t in self._tasks:
            done = t["total"] is not None and t["completed"] >= t["total"]
            if t["said"] is not None and not done and now - t["said"] >= HEARTBEAT_EVERY:
                t["said"] = now
                console.print(self.line(t, now) + " (still working)", highlight=False,
                              soft_wrap=True, markup=False)

    def add_task(self, description: str, total: float | None = None, completed: float = 0,
                 **fields) -> int:
        now = self._now()
        self._tasks.append({"description": description, "total": total, "completed": completed,
                            "fields": fields, "start": now, "start_done": completed,
                            "said": None, "said_done": None})
        return len(self._tasks) - 1

    def update(self, task_id: int, completed: float | None = None, total: float | None = None,
               description: str | None = None, **fields) -> None:
        t = self._tasks[task_id]
        if completed is not None:
            t["completed"] = completed
        if total is not None:
            t["total"] = total
        if description is not None:
            t["description"] = description
        t["fields"].update(fields)
        now = self._now()
        done = t["total"] is not None and t["completed"] >= t["total"]
        due = t["said"] is None or now - t["said"] >= self.every or \
            (done and t["said_done"] != t["completed"])
        if self.enabled and due:
            with self._heart.lock:
                t["said"], t["said_done"] = now, t["completed"]
                console.print(self.line(t, now), highlight=False, soft_wrap=True, markup=False)

    def line(self, t: dict, now: float) -> str:
        done, total = t["completed"], t["total"]
        parts = [f"{done:g}/{total:g} ({100 * done / total:.0f}%)" if total else f"{done:g}"]
        elapsed = now - t["start"]
        rate = (done - t["start_done"]) / elapsed if elapsed > 0 else 0.0
        if rate > 0:
            parts.append(f"{rate:.3g}/s")
            if total:
                parts.append(f"ETA {_clock(max(total - done, 0) / rate)}")
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.info is not None:
            parts.append(self.info(t["fields"]))
        return f"{t['description']}: " + ", ".join(p for p in parts if p)


def progress(*columns, info: Callable[[dict], str] | None = None, transient: bool = False,
             json_out: bool = False, enabled: bool = True):
    """The progress display of a command: rich bars (``columns``) on a terminal; one-line
    statuses (``info`` formats a task's fields) off a terminal, with --json and with
    --verbose (then at every update); nothing with --quiet or when not ``enabled``."""
    from rich.progress import Progress

    if _verbosity < 0 or not enabled:
        return LineProgress(info, enabled=False)
    if console.is_terminal and not json_out and _verbosity == 0:
        return Progress(*columns, console=console, transient=transient)
    return LineProgress(info, every=0.0 if _verbosity > 0 else PROGRESS_EVERY)


class _LineStatus:
    """``console.status`` off a terminal: its updates as lines at most every PROGRESS_EVERY
    seconds; with --verbose the message first and every update."""

    def __init__(self, message: str) -> None:
        import time

        self.message, self._now = message, time.monotonic
        self.every = 0.0 if _verbosity > 0 else PROGRESS_EVERY
        self._heart = _Heartbeat(self._beat, lambda: self._now())

    def __enter__(self) -> _LineStatus:
        if _verbosity > 0:
            console.print(f"{self.message} ...", highlight=False, soft_wrap=True, markup=False)
        self.began = self._now()
        self.said = self.began - self.every  # the first update is due at once
        self.told = self.began  # when a line was last printed (the heartbeat's clock)
        self.last = self.message
        self._heart.start()
        return self

    def __exit__(self, *exc) -> None:
        self._heart.stop()

    def update(self, message: str) -> None:
        with self._heart.lock:
            self.last = message
            if self._now() - self.said >= self.every:
                self.said = self.told = self._now()
                console.print(message, highlight=False, soft_wrap=True, markup=False)

    def _beat(self, now: float) -> None:
        if now - self.told >= HEARTBEAT_EVERY:
            self.told = now
            console.print(f"{self.last} (still working, elapsed {_clock(now - self.began)})",
                          highlight=False, soft_wrap=True, markup=False)


def status(message: str, quiet: bool = False):
    """A spinner on stderr on a terminal; off a terminal (and with --json: ``quiet``) its
    updates as lines at most every PROGRESS_EVERY seconds (``_LineStatus``); nothing with
    --quiet."""
    from contextlib import nullcontext

    if _verbosity < 0:
        return nullcontext()
    if console.is_terminal and not quiet and _verbosity == 0:
        return console.status(message)
    return _LineStatus(message)
