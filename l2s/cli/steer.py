"""`l2s steer`: generate images whose objects stand where the prompt says."""

from __future__ import annotations

import typer

from l2s.cli.output import console, emit_json, status, user_errors
from l2s.engine.backbone import BackboneError
from l2s.engine.tokens import TokenAlignmentError, triplet_tokens
from l2s.steer import PromptError, SteerConfig
from l2s.steer import steer as run_steer


@user_errors(BackboneError, PromptError, TokenAlignmentError)
def steer(
    prompt: str = typer.Argument(..., help='e.g. "a circle to the left of a square"'),
    model: str = typer.Option("toy", "--model", "-m",
                              help="Preset (toy, sd1.4, sd2.1), hub id or local folder."),
    num_images: int = typer.Option(1, "--num-images", "-n", min=1, help="Images to generate."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first image (then +1 each)."),
    steps: int = typer.Option(None, "--steps", help="DDIM steps (default: the model's)."),
    guidance: float = typer.Option(None, "--guidance", help="CFG scale (default: the model's)."),
    out: str = typer.Option("out/steer", "--out", "-o", help="Folder for PNGs + report.json."),
    show_tokens: bool = typer.Option(False, "--show-tokens",
                                     help="Show which tokens each object got."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Generate images for PROMPT, steering its spatial relations (left of, right of, above,
    below) with the backbone's relation classifier."""
    from l2s.engine.loading import load_backbone

    cfg = SteerConfig(prompt=prompt, model=model, num_images=num_images, seed=seed,
                      steps=steps, guidance=guidance, out=out)
    with status(f"loading {model}", json_out):
        den = load_backbone(model)
    result_triplets = None
    if show_tokens:
        from rich.table import Table

        from l2s.relations import parse

        result_triplets = parse(prompt)
        table = Table(title="tokens per object")
        for col in ("relation", "object", "token indices", "pieces"):
            table.add_column(col)
        for t in result_triplets:
            for role, pt in zip(("subject", "object"), triplet_tokens(den.tokenizer, prompt, t),
                                strict=True):
                table.add_row(f"{t} ({role})", pt.phrase, str(list(pt.indices)),
                              " ".join(pt.pieces))
        console.print(table)
    with status("generating", json_out):
        res = run_steer(cfg, den)
    if json_out:
        emit_json(res.report)
        return
    console.print(f"[yellow]{res.report['notice']}[/]")
    console.print(f"{len(res.paths)} image(s) in {out} ({res.report['total_s']:.2f} s), "
                  f"report: {out}/report.json")
