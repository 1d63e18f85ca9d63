"""`l2s doctor`: one screen on the environment l2s runs in."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

import typer
from rich.markup import escape
from rich.table import Table

from l2s.bench.detectors import describe_detectors
from l2s.cli.output import console, emit_json
from l2s.engine.backbone import BackboneError
from l2s.engine.loading import describe_models, hf_cache_dir, hf_offline, resolve_device

# The ranges pyproject.toml pins and the tests ran with.
TESTED = {"torch": "2.4 - 2.14", "diffusers": "0.42.x", "transformers": "5.x",
          "accelerate": "1.x"}


def environment_report() -> dict:
    """Python, torch/device, library versions, HF cache and the locally usable presets."""
    import torch

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    try:
        selected, problem = str(resolve_device()), None
    except BackboneError as e:
        selected, problem = None, str(e)
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None,
        "l2s_device": os.environ.get("L2S_DEVICE"),  # the override, if set
        "selected_device": selected,  # what l2s commands will run on
        "device_problem": problem,  # why the override cannot be used
        "packages": {p: {"installed": version(p), "tested": r} for p, r in TESTED.items()},
        "hf_cache": str(hf_cache_dir()),
        "hf_offline": hf_offline(),
        "models": {m["name"]: {"available": m["available"], "classifier": m["classifier"]}
                   for m in describe_models()},
        # `l2s bench` detectors and GenEval's colour model: loadable with no network?
        "detectors": describe_detectors(),
    }


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
