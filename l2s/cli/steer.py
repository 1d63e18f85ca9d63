"""`l2s steer`: generate images whose objects stand where the prompt says."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from l2s.cli.options import (
    config_option,
    device_option,
    dtype_option,
    steer_options,
)
from l2s.cli.output import console, emit_json, status, user_errors
from l2s.cli.output import progress as progress_display
from l2s.config import CONFIG_FILE, check_writable_dir
from l2s.engine.tokens import triplet_tokens
from l2s.steering.job import SteerConfig
from l2s.steering.job import steer as run_steer
from l2s.steering.options import SteerOptions


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
    for col in ("step", "t", "iters", "loss before", "loss after", "p(target)", "forward ms",
                "backward ms", "update ms"):
        table.add_column(col, justify="right")
    for r in report["steps"]:
        t = "" if r.get("t") is None else f"{r['t']:.4g}"
        table.add_row(str(r["step"]), t, str(r["iterations"]), f"{r['loss_before']:.4g}",
                      f"{r['loss_after']:.4g}", f"{r['p_target']:.3f}", f"{r['forward_ms']:.1f}",
                      f"{r['backward_ms']:.1f}", f"{r['update_ms']:.1f}")
    return table


def _summary(rep: dict) -> list[str]:
    """A few lines on what steering did: steps, iterations, loss and p(target), times."""
    steps = [r for r in rep["steps"] if r["loss_before"] is not None]  # not budget-spent ones
    if not steps:
        return []
    first, last = steps[0], steps[-1]
    iters = sum(r["iterations"] for r in steps)
    mean = {k: sum(r[k] for r in steps) / len(steps) for k in ("forward_ms", "backward_ms",
                                                                "update_ms")}
    # Before and after of one quantity: a step's loss before its updates and after them
    # (the loss of a later step starts from another, less noisy latent).
    moved = f"step {first['step']} {first['loss_before']:.4g} -> {first['loss_after']:.4g}"
    if last is not first:
        moved += f", step {last['step']} {last['loss_before']:.4g} -> {last['loss_after']:.4g}"
    return [f"steered {len(steps)} of {rep['settings']['steps']} steps, {iters} iterations; "
            f"loss before -> after each step's updates: {moved}; p(target) after the last "
            f"steered step {last['p_target']:.3f} (--table: every step)",
            f"per steered step: forward {mean['forward_ms']:.1f} ms, backward "
            f"{mean['backward_ms']:.1f} ms, update {mean['update_ms']:.1f} ms (means)"]


def _achieved(rep: dict, paths: list, key: str = "achieved") -> str | None:
    a = rep.get(key)
    if not a:
        return None
    which = "plain: " if key == "achieved_plain" else ""
    if "per_image" in a:
        names = ", ".join(f"{p.name if p else i}: "
                          f"{'yes' if ok else 'no' if ok is not None else 'not judged'}"
                          for i, (p, ok) in enumerate(zip(paths or [None] * a["of"],
                                                          a["per_image"], strict=True)))
        return (f"{which}relation achieved ({a['by']}): {a['count']} of {a['of']} images "
                f"({names})")
    return f"{which}relation achieved? {a['by']}: {a['p_target']:.3f}"


@user_errors  # a bad steering option (SteerOptions); the rest is checked in body()
@steer_options
def steer(
    prompt: str = typer.Argument(..., metavar="PROMPT",
                                 help='e.g. "a circle to the left of a square"'),
    model: str = typer.Option("toy", "--model", "-m",
                              help="Preset (l2s models lists them), hub id or local folder."),
    method: str = typer.Option("l2s", "--method",
                               help="l2s (learned loss), centroid (hand-made loss), plain, "
                                    "or best-of (--candidates plain images, the classifier "
                                    "keeps the most probable)."),
    classifier: str = typer.Option(None, "--classifier",
                                   help="Classifier card.json, its folder, or a hub repo "
                                        "user/name (default: the one `l2s train` wrote for "
                                        "the model, else the shipped one)."),
    lora: str = typer.Option(None, "--lora",
                             help="LoRA folder merged into the model (`l2s distill`), or a "
                                  "model name for its shipped LoRA (`--lora toy`)."),
    num_images: int = typer.Option(1, "--num-images", "-n", help="Images, one batch."),
    image_size: int = typer.Option(None, "--image-size", help="Pixels (default: the model's)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first image (then +1 each)."),
    options: SteerOptions = None,  # one flag per field (steer_options)
    device: str = device_option(),
    dtype: str = dtype_option(),
    verify: bool = typer.Option(False, "--verify",
                                help="Generate plainly first, check each image (the toy's "
                                     "detector, else the classifier on the plain pass) and "
                                     "steer only the failing ones, from the same seeds."),
    candidates: int = typer.Option(None, "--candidates",
                                   help="best-of: plain candidates per image, generated in one "
                                        "batch (default 4)."),
    compare_plain: bool = typer.Option(False, "--compare-plain",
                                       help="Also generate the same seeds plainly: timed "
                                            "(the overhead), saved as plain_<seed>.png, judged "
                                            "like the steered ones and shown beside them in "
                                            "compare.png."),
    save_attention: bool = typer.Option(False, "--save-attention",
                                        help="Also write attention_<seed>.png: subject/object "
                                             "maps before/after steering, and the image's "
                                             "loss and p(target) per steered step."),
    out: str = typer.Option("out/steer", "--out", "-o",
                            help="Folder for PNGs, report.json and config.yaml (a used one "
                                 "gets a -N suffix)."),
    show_tokens: bool = typer.Option(False, "--show-tokens",
                                     help="Show which tokens each object got."),
    table: bool = typer.Option(False, "--table",
                               help="Show every steered step (loss, p(target), times) instead "
                                    "of the summary; --json always has them."),
    config: str = config_option("num_images: 4"),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Generate images for PROMPT with its spatial relations steered into place.

    Steers "left of", "right of", "above" and "below" with the backbone's relation classifier
    (--method l2s), a hand-made loss (centroid) or not at all (plain), and says whether the
    relation was achieved.
    """

    @user_errors
    def body() -> None:
        from l2s.classifier.model import card_origin
        from l2s.engine.loading import load_backbone

        cfg = SteerConfig(prompt=prompt, model=model, image_size=image_size, method=method,
                          classifier=classifier, lora=lora, num_images=num_images, seed=seed,
                          options=options, device=device, dtype=dtype, verify=verify,
                          candidates=candidates, compare_plain=compare_plain,
                          save_attention=save_attention, out=out)
        check_writable_dir(out)  # before loading and generating: nothing is lost
        n = options.resolve(model).steered_count()
        with status(f"loading {model}", json_out):
            den = load_backbone(model, device=device, dtype=dtype, image_size=image_size)
        if show_tokens:
            console.print(_token_table(den, prompt))
        columns = (TextColumn("steering"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn())
        with progress_display(*columns, info=lambda f: f["info"], transient=True,
                              json_out=json_out,
                              enabled=method not in ("plain", "best-of")) as progress:
            task = progress.add_task("steer", total=n, info="")

            seen = [0]  # steered steps so far (steering may start past step 0)

            def on_step(r) -> None:
                info = "" if r.loss_after is None else \
                    f"loss {r.loss_after:.3g}  p(target) {r.p_target:.3f}  {r.iterations} it"
                seen[0] += 1
                progress.update(task, completed=seen[0], info=info)

            res = run_steer(cfg, den, on_step=on_step)
        rep = res.report
        if res.out:
            rep["config"] = str(res.out / CONFIG_FILE)  # written by the job
        if json_out:
            emit_json(rep)
            return
        if rep["notice"]:
            console.print(f"[yellow]{rep['notice']}[/]")
        if rep["classifier"]:
            console.print(f"classifier: {rep['classifier']} ({card_origin(rep['classifier'])})",
                          highlight=False, soft_wrap=True)
        if rep["steps"] and table:
            console.print(_timing_table(rep))
        for line in [] if table else _summary(rep):
            console.print(line, highlight=False, soft_wrap=True)
        for w in rep["warnings"]:
            console.print(f"[yellow]warning:[/] {escape(w)}")
        for i, b in enumerate(rep.get("best_of") or []):
            if b["p"] is not None:
                console.print(f"best-of {b['candidates']}, image {i}: kept candidate "
                              f"{b['chosen']} (verifier p {b['p'][b['chosen']]:.3f})",
                              highlight=False)
        plain_paths = [Path(p) for p in rep.get("plain_images", [])]
        for line in (_achieved(rep, plain_paths, "achieved_plain"), _achieved(rep, res.paths)):
            if line:
                console.print(line, highlight=False, soft_wrap=True)
        if rep.get("compare_grid"):
            console.print(f"plain vs steered: {rep['compare_grid']}", highlight=False,
                          soft_wrap=True)
        line = f"{len(res.paths)} image(s) in {res.out}, total {rep['total_s']:.2f} s"
        if "plain_s" in rep:
            line += f", plain {rep['plain_s']:.2f} s, overhead x{rep['overhead']:.2f}"
        console.print(line + f", peak memory {rep['peak_memory_mb']:.0f} MB", soft_wrap=True)

    body()
