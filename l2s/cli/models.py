"""`l2s models`: the known backbones and whether each can be used offline."""

from __future__ import annotations

import typer
from rich.table import Table

from l2s.cli.output import console, emit_json
from l2s.engine.loading import describe_models, hf_cache_dir


def models(
    json_out: bool = typer.Option(False, "--json", help="Print the list as JSON on stdout."),
) -> None:
    """List the backbone presets, whether each is available locally, and its classifier.

    Any hub id (org/name) or local diffusers folder also works as --model.
    """
    rows = describe_models()
    if json_out:
        emit_json(rows)
        return
    table = Table(title="l2s backbones")
    for col in ("name", "source", "available", "classifier", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["repo_id"] or "shipped with l2s",
                      "[green]yes[/]" if r["available"] else "[yellow]no[/]",
                      r["classifier"] or "-", r["description"])
    console.print(table)
    console.print(f"HF cache: {hf_cache_dir()}  (models not available: `hf download REPO` "
                  "while online; SD presets also run with --random-weights for speed work)")
