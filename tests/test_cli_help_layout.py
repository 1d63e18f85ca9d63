"""--help text flows to the terminal's width: no description line is a short orphan of the
docstring's hard wrap, at 80 columns or 120; lists and examples keep their lines."""

import pytest
import typer
from typer.testing import CliRunner

from l2s.cli import app
from l2s.cli.helptext import reflow


def _commands(group, prefix=()):
    yield prefix, group
    for name, cmd in getattr(group, "commands", {}).items():
        yield from _commands(cmd, (*prefix, name))


COMMANDS = [" ".join(path) for path, _ in _commands(typer.main.get_command(app))]


def _orphans(rows: list[str], width: int) -> list[str]:
    """Line breaks in ``rows`` (one paragraph or table cell, wrapped at ``width``) where the
    next line's first word would have fit on the line before: the text was not wrapped there
    by the terminal's width but by a line break in the source."""
    found = []
    for line, after in zip(rows, rows[1:], strict=False):
        word = after.split()[0]
        if len(line.rstrip()) + 1 + len(word) <= width:
            found.append(f"{line.rstrip()!r} / {after.strip()!r}")
    return found


def _description(lines: list[str]) -> list[list[str]]:
    """The description's paragraphs: the lines between the usage line and the first panel."""
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("Usage:")) + 1
    paragraphs, current = [], []
    for line in lines[start:]:
        if line.lstrip().startswith("╭"):
            break
        if line.strip():
            current.append(line[1:])  # rich's one-column margin
        elif current:
            paragraphs.append(current)
            current = []
    return paragraphs + ([current] if current else [])


def _command_cells(lines: list[str]) -> tuple[list[list[str]], int]:
    """Each command's help in the Commands panel (its wrapped lines) and the cell's width."""
    top = next((i for i, line in enumerate(lines) if "─ Commands " in line), None)
    if top is None:
        return [], 0
    rows = []
    for line in lines[top + 1:]:
        if line.startswith("╰"):
            break
        rows.append(line.rstrip()[2:-2])  # "│ " ... " │"
    inner = len(lines[top].rstrip()) - 4
    column = len(rows[0]) - len(rows[0].split(None, 1)[1]) if rows else 0
    cells = []
    for row in rows:
        if row[:column].strip():  # a command's name starts a new cell
            cells.append([])
        cells[-1].append(row[column:])
    return cells, inner - column


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c or "l2s")
def test_help_has_no_orphan_lines_left_by_the_docstrings_hard_wrap(cmd, columns):
    # Fails when a description keeps its docstring's line breaks: at 80 columns train's help
    # read "... (resumable, as `l2s" / "invert`)," / "then writes ..." (a line and its orphan).
    r = CliRunner().invoke(app, [*cmd.split(), "--help"], prog_name="l2s",
                           env={"COLUMNS": str(columns), "NO_COLOR": "1", "TERM": "dumb"})
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    width = max(len(line.rstrip()) for line in lines) - 2  # rich's margins: one column each
    assert width + 2 == columns
    orphans = [o for p in _description(lines) for o in _orphans(p, width)]
    cells, cell_width = _command_cells(lines)
    orphans += [o for cell in cells for o in _orphans(cell, cell_width)]
    assert not orphans, f"`l2s {cmd} --help` at {columns} columns:\n" + "\n".join(orphans)


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c or "l2s")
def test_option_help_has_no_hard_line_breaks(cmd):
    # Fails when an option's help is written with line breaks (a triple-quoted string): rich
    # keeps them, and the help column shows orphans as the descriptions did.
    command = dict(_commands(typer.main.get_command(app)))[tuple(cmd.split())]
    for param in command.params:
        text = getattr(param, "help", None)
        assert reflow(text) == text, f"`l2s {cmd}` {param.opts}: {text!r}"


def test_reflow_joins_prose_and_keeps_paragraphs_lists_and_examples():
    # Fails if reflow joined a list or an example into the prose, or left a paragraph wrapped.
    doc = """First line
    goes on.

    A paragraph wrapped
    in the source, and more.

    - one item
      continued
    - another item
    1. numbered

    Run:
        l2s steer "a circle to the left of a square"
        l2s bench --suite shapes
    """
    assert reflow(doc) == (
        "First line goes on.\n\n"
        "A paragraph wrapped in the source, and more.\n\n"
        "- one item continued\n- another item\n1. numbered\n\n"
        "Run:\n"
        '    l2s steer "a circle to the left of a square"\n'
        "    l2s bench --suite shapes")
    assert reflow("\b\nkept\nas is") == "\b\nkept\nas is"
