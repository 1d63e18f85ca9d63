"""Where CLI output goes: rich to stderr for people, JSON to stdout for programs."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps

import typer
from rich.console import Console

console = Console(stderr=True)  # progress, tables and logs


def emit_json(obj) -> None:
    """Write one JSON document to stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def user_errors(*kinds: type[Exception]) -> Callable:
    """Turn the listed library errors into a one-line message and exit code 2, no traceback."""

    def deco(fn):
        @wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except kinds as e:
                console.print(f"[bold red]error:[/] {e}", highlight=False)
                raise typer.Exit(2) from None

        return wrapper

    return deco


def status(message: str, quiet: bool = False):
    """A spinner on stderr, or nothing in --json mode or off a terminal."""
    from contextlib import nullcontext

    if quiet or not console.is_terminal:
        return nullcontext()
    return console.status(message)
