"""Command descriptions that flow to the terminal's width.

Descriptions are docstrings, hard-wrapped for the source file; typer keeps the line breaks of
every paragraph after the first, so on a narrower terminal each line wraps into a long line and
a one-word orphan, and a wider one leaves the right side empty. ``reflow`` joins each prose
paragraph into one line for rich to wrap, keeping what is laid out on purpose: blank-line
paragraphs, list items, indented lines (examples, command lines) and click's ``\\b`` paragraphs.
"""

from __future__ import annotations

import inspect
import re

# "- item", "* item", "• item", "1. item", "2) item", after optional indentation
_ITEM = re.compile(r"\s*(?:[-*•]|\d+[.)])\s")


def _paragraph(text: str) -> str:
    if text.startswith("\b"):  # click's mark for a paragraph not to rewrap
        return text
    lines: list[str] = []
    kinds: list[str] = []  # per output line: prose, item or verbatim
    for line in text.splitlines():
        if _ITEM.match(line):
            kind = "item"
        elif line[:1].isspace():
            kind = "verbatim"
        else:
            kind = "prose"
        joins = lines and (
            (kind == "prose" and kinds[-1] in ("prose", "item"))
            or (kind == "verbatim" and kinds[-1] == "item"))  # an item's indented continuation
        if joins:
            lines[-1] = f"{lines[-1]} {line.strip()}"
        else:
            lines.append(line.rstrip())
            kinds.append(kind)
    return "\n".join(lines)


def reflow(text: str | None) -> str | None:
    """``text`` (a docstring or help string) with each paragraph's line breaks joined, unless
    the break is part of its layout (a list, an indented example, a ``\\b`` paragraph)."""
    if not text:
        return text
    return "\n\n".join(_paragraph(p) for p in re.split(r"\n\s*\n", inspect.cleandoc(text)))


def reflow_commands(command) -> None:
    """Reflow the descriptions of a click command and, for a group, of every command under it."""
    command.help = reflow(command.help)
    for sub in getattr(command, "commands", {}).values():
        reflow_commands(sub)
