"""`l2s doctor`: one screen on the environment l2s runs in."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from l2s.cli.output import console, emit_json
from l2s.environment import environment_report


def doctor(
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Show Python, torch/GPU, library versions, HF cache, offline mode, local models and
    benchmark detectors."""
    rep = environment_report()
    if json_out:
        emit_json(rep)
        return
    t = Table(title="l2s doctor", show_header=False)
    t.add_column("what")
    t.add_column("value")
    t.add_row("python", f"{rep['python']} ({rep['platform']})")
    t.add_row("device", rep["device"] + (f" (CUDA {rep['cuda']})" if rep["cuda"] else
                                         " (no CUDA GPU: steering runs, slowly)"))
    via = f" (L2S_DEVICE={rep['l2s_device']})" if rep["l2s_device"] else ""
    t.add_row("l2s runs on", f"{rep['selected_device']}{via}" if rep["selected_device"] else
              f"[red]{escape(rep['device_problem'])}[/]")
    for pkg, v in rep["packages"].items():
        t.add_row(pkg, f"{v['installed'] or '[red]missing[/]'}  (tested: {v['tested']})")
    t.add_row("HF cache", rep["hf_cache"])
    t.add_row("HF offline", "yes (HF_HUB_OFFLINE)" if rep["hf_offline"] else "no")
    for name, m in rep["models"].items():
        t.add_row(f"model {name}", ("[green]available[/]" if m["available"] else
                                    "[yellow]not available locally[/]")
                  + f", classifier: {m['classifier'] or 'none'}")
    for name, d in rep["detectors"].items():
        t.add_row(f"detector {name}", f"[green]available[/]: {d['repo']}" if d["available"]
                  else f"[yellow]not available offline[/]: `hf download {d['repo']}`")
    console.print(t)
