"""`l2s steer`: generate images whose objects stand where the prompt says."""

from __future__ import annotations

import typer
from rich.table import Table

from l2s.cli.output import console, emit_json, status, user_errors
from l2s.engine.backbone import BackboneError
from l2s.engine.tokens import TokenAlignmentError, triplet_tokens
from l2s.steer import STEER_METHODS, PromptError, SteerConfig, SteerError
from l2s.steer import steer as run_steer
from l2s.steering import OPTIMIZERS


def _errors():
    from l2s.classifier import ClassifierError

    return (BackboneError, PromptError, TokenAlignmentError, SteerError, ClassifierError)


def _token_table(den, prompt: str) -> Table:
    from l2s.relations import parse

    table = Table(title="tokens per object")
    for col in ("relation", "object", "token indices", "pieces"):
        table.add_column(col)
    for t in parse(prompt):
        for role, pt in zip(("subject", "object"), triplet_tokens(den.tokenizer, prompt, t),
                            strict=True):
            table.add_row(f"{t} ({role})", pt.phrase, str(list(pt.indices)), " ".join(pt.pieces))
    return table


def _timing_table(report: dict) -> Table:
    table = Table(title=f"steering, {report['method']}: per denoising step")
    for col in ("step", "iters", "loss before", "loss after", "p(target)", "forward ms",
                "backward ms", "update ms"):
        table.add_column(col, justify="right")
    for r in report["steps"]:
        table.add_row(str(r["step"]), str(r["iterations"]), f"{r['loss_before']:.4g}",
                      f"{r['loss_after']:.4g}", f"{r['p_target']:.3f}", f"{r['forward_ms']:.1f}",
                      f"{r['backward_ms']:.1f}", f"{r['update_ms']:.1f}")
    return table


def steer(
    prompt: str = typer.Argument(..., help='e.g. "a circle to the left of a square"'),
    model: str = typer.Option("toy", "--model", "-m",
                              help="Preset (toy, sd1.4, sd2.1), hub id or local folder."),
    method: str = typer.Option("l2s", "--method",
                               help="l2s (learned loss), centroid (hand-made loss) or plain."),
    classifier: str = typer.Option(None, "--classifier",
                                   help="Classifier card.json (default: the model's)."),
    num_images: int = typer.Option(1, "--num-images", "-n", min=1, help="Images, one batch."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first image (then +1 each)."),
    steps: int = typer.Option(None, "--steps", help="DDIM steps (default: the model's)."),
    guidance: float = typer.Option(None, "--guidance", help="CFG scale (default: the model's)."),
    steer_until: float = typer.Option(0.5, "--steer-until",
                                      help="Steer before this fraction of the steps (< 1) or "
                                           "this step count (>= 1)."),
    iterations: int = typer.Option(16, "--iterations", min=0,
                                   help="Max gradient iterations per steered step."),
    loss_threshold: float = typer.Option(None, "--loss-threshold",
                                         help="Stop iterating below this loss (default: the "
                                              "model's; SD: 1e-5 rising to 7e-5)."),
    step_size: float = typer.Option(None, "--step-size",
                                    help="Latent step size (default: the model's)."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd or adam."),
    compare_plain: bool = typer.Option(False, "--compare-plain",
                                       help="Also time plain generation of the same seeds."),
    save_attention: bool = typer.Option(False, "--save-attention",
                                        help="Also write attention_<seed>.png: subject/object "
                                             "maps before/after steering, loss curves."),
    out: str = typer.Option("out/steer", "--out", "-o",
                            help="Folder for PNGs + report.json (a used one gets a -N suffix)."),
    show_tokens: bool = typer.Option(False, "--show-tokens",
                                     help="Show which tokens each object got."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Generate images for PROMPT, steering its spatial relations (left of, right of, above,
    below) with the backbone's relation classifier; prints per-step timings."""

    @user_errors(*_errors())
    def body() -> None:
        from l2s.engine.loading import load_backbone

        cfg = SteerConfig(prompt=prompt, model=model, method=method, classifier=classifier,
                          num_images=num_images, seed=seed, steps=steps, guidance=guidance,
                          steer_until=steer_until, iterations=iterations, step_size=step_size,
                          loss_threshold=loss_threshold, optimizer=optimizer,
                          compare_plain=compare_plain,
                          save_attention=save_attention, out=out)
        with status(f"loading {model}", json_out):
            den = load_backbone(model)
        if show_tokens:
            console.print(_token_table(den, prompt))
        with status("generating", json_out):
            res = run_steer(cfg, den)
        rep = res.report
        if json_out:
            emit_json(rep)
            return
        if rep["notice"]:
            console.print(f"[yellow]{rep['notice']}[/]")
        if rep["steps"]:
            console.print(_timing_table(rep))
        for w in rep["warnings"]:
            console.print(f"[yellow]warning:[/] {w}")
        line = f"{len(res.paths)} image(s) in {res.out}, total {rep['total_s']:.2f} s"
        if "plain_s" in rep:
            line += f", plain {rep['plain_s']:.2f} s, overhead x{rep['overhead']:.2f}"
        console.print(line + f", peak memory {rep['peak_memory_mb']:.0f} MB")

    if method not in STEER_METHODS:
        raise typer.BadParameter(f"--method must be one of {', '.join(STEER_METHODS)}")
    if optimizer not in OPTIMIZERS:
        raise typer.BadParameter(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
    if steer_until <= 0:
        raise typer.BadParameter("--steer-until must be > 0")
    body()
