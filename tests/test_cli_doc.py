"""docs/cli.md is what `make docs` writes: every command's --help, as the installed `l2s`."""

import difflib
import re
from pathlib import Path

import typer
from typer.testing import CliRunner

from l2s.cli import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
ENV = {"COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"}  # as the Makefile's docs target


def _sections() -> dict[str, str]:
    text = DOC.read_text(encoding="utf-8")
    return dict(re.findall(r"^## l2s ?(.*?)\n```\n(.*?)```$", text, flags=re.S | re.M))


def _commands(group, prefix: str = "") -> list[str]:
    """Every command path under a click group (typer's groups have ``commands``)."""
    names = [prefix.strip()]
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            names += _commands(cmd, f"{prefix}{name} ")
        else:
            names.append(f"{prefix}{name}")
    return names


def test_every_command_has_its_help_in_docs_cli_md():
    # Fails when a command's help changed without `make docs` (or a new command is missing
    # from the Makefile's docs loop).
    sections = _sections()
    assert sorted(sections) == sorted(_commands(typer.main.get_command(app)))
    runner = CliRunner()
    for cmd, doc in sections.items():
        r = runner.invoke(app, [*cmd.split(), "--help"], env=ENV, prog_name="l2s")
        assert r.exit_code == 0, r.output
        got, want = ([line.rstrip() for line in s.strip("\n").splitlines()]
                     for s in (r.output, doc))
        assert got == want, (f"docs/cli.md is stale for `l2s {cmd}`: run make docs\n"
                             + "\n".join(difflib.unified_diff(want, got, lineterm="")))
