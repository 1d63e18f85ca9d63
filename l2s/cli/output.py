"""Where CLI output goes: rich to stderr for people, JSON to stdout for programs."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps

import typer
from rich.console import Console
from rich.markup import escape

from l2s.errors import L2SError, is_write_failure, one_line, out_of_memory

console = Console(stderr=True)  # progress, tables and logs
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


def status(message: str, quiet: bool = False):
    """A spinner on stderr, or nothing in --json mode or off a terminal."""
    from contextlib import nullcontext

    if quiet or not console.is_terminal:
        return nullcontext()
    return console.status(message)
