"""`l2s bench`: score methods on a prompt suite with the same seeds, resumably."""

from __future__ import annotations

import typer
from rich.progress import Progress
from rich.table import Table

from l2s.bench import BenchConfig, BenchError, run_bench
from l2s.cli.options import config_option, resolved, write_resolved
from l2s.cli.output import console, emit_json, user_errors
from l2s.config import check_generation, check_number, check_writable_dir
from l2s.engine.backbone import BackboneError


def _errors():
    from l2s.classifier import ClassifierError
    from l2s.steer import SteerError

    return (BackboneError, BenchError, SteerError, ClassifierError)


def check_bench_values(prompts: int, images: int, batch_size: int, **generation) -> None:
    """The bench numbers, checked before anything is loaded or written."""
    check_number("--prompts", prompts, 1)
    check_number("--images", images, 1)
    check_number("--batch-size", batch_size, 1)
    check_generation(**generation)


@user_errors(*_errors())
def bench(
    ctx: typer.Context,
    suite: str = typer.Option("shapes", "--suite", help="Prompt suite: shapes (toy world)."),
    model: str = typer.Option("toy", "--model", "-m", help="Preset, hub id or local folder."),
    method: list[str] = typer.Option(["plain"], "--method",
                                     help="Method to score, repeat to compare on the same "
                                          "seeds: plain, l2s, centroid, l2s-verify (plain "
                                          "first, steer what the detector fails)."),
    prompts: int = typer.Option(200, "--prompts", help="Number of prompts."),
    images: int = typer.Option(1, "--images", help="Images per prompt."),
    seed: int = typer.Option(0, "--seed", help="Chooses the prompts and the image seeds."),
    steps: int = typer.Option(None, "--steps", help="Sampling steps (default: the model's)."),
    guidance: float = typer.Option(None, "--guidance", help="CFG scale (default: the model's)."),
    classifier: str = typer.Option(None, "--classifier",
                                   help="l2s: classifier card.json (default: the model's)."),
    steer_until: float = typer.Option(None, "--steer-until",
                                      help="Steered methods: fraction (< 1) or count of steps."),
    iterations: int = typer.Option(16, "--iterations", help="Max gradient iterations per step."),
    loss_threshold: float = typer.Option(None, "--loss-threshold",
                                         help="Stop iterating below this loss (default: the "
                                              "model's; SD: 1e-5 rising to 7e-5)."),
    step_size: float = typer.Option(None, "--step-size",
                                    help="Latent step size (default: the model's)."),
    batch_size: int = typer.Option(100, "--batch-size", help="Images generated together."),
    out: str = typer.Option(None, "--out", "-o",
                            help="Results folder (default: out/bench-SUITE-MODEL); an "
                                 "interrupted run there resumes."),
    config: str = config_option(),
    json_out: bool = typer.Option(False, "--json", help="Print the summary JSON on stdout."),
) -> None:
    """Generate and score a benchmark suite; rerunning with the same --out resumes."""
    check_bench_values(prompts, images, batch_size, steps=steps, guidance=guidance,
                       steer_until=steer_until, iterations=iterations, step_size=step_size,
                       loss_threshold=loss_threshold)
    out = out or f"out/bench-{suite}-{model.replace('/', '_')}"
    check_writable_dir(out)  # before generating: results that cannot be saved are lost
    cfg = BenchConfig(suite=suite, model=model, methods=tuple(method), prompts=prompts,
                      images=images, seed=seed, steps=steps, guidance=guidance,
                      classifier=classifier, steer_until=steer_until, iterations=iterations,
                      step_size=step_size, loss_threshold=loss_threshold,
                      batch_size=batch_size,
                      out=out)
    with Progress(console=console, disable=json_out, transient=True) as progress:
        tasks: dict[str, int] = {}

        def on_batch(ev: dict) -> None:
            if ev["method"] not in tasks:
                tasks[ev["method"]] = progress.add_task(ev["method"], total=ev["total"])
            progress.update(tasks[ev["method"]], completed=ev["done"])

        res = run_bench(cfg, callback=on_batch)
    write_resolved(ctx, out, {**resolved(ctx), "out": out})
    if json_out:
        emit_json(res.to_json())
        return
    table = Table(title=f"{suite} on {model}: {prompts} prompts x {images} images")
    for col in ("method", "images", "both present", "position acc.", "fused", "seconds"):
        table.add_column(col)
    for name, m in res.methods.items():
        table.add_row(name, str(m["n_images"]), f"{m['both_present']:.3f}",
                      f"{m['position_accuracy']:.3f}", f"{m['fused']:.3f}",
                      f"{res.seconds.get(name, 0):.1f}")
    console.print(table)
    console.print(f"per-image results: {res.out}/results.jsonl; samples: {res.out}/contact_*.png")
