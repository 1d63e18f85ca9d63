"""`l2s speed`: plain vs steered, ours vs a reference-style loop, measured in one run."""

from __future__ import annotations

import typer
from rich.table import Table

from l2s.cli.options import (
    config_option,
    device_option,
    dtype_option,
    image_size_option,
    steer_options,
)
from l2s.cli.output import console, emit_json, status, user_errors, verbosity
from l2s.steering import speed as speed_job
from l2s.steering.options import SteerOptions
from l2s.steering.speed import SpeedConfig


@user_errors
@steer_options
def speed(
    model: str = typer.Option("toy", "--model", "-m", help="Preset, hub id or local folder."),
    prompt: str = typer.Option(None, "--prompt", help="Two-object prompt with a relation "
                                                      "(default: one the model knows)."),
    random_weights: bool = typer.Option(False, "--random-weights",
                                        help="A real model's preset (any `l2s models` lists "
                                             "but the toys): its exact architecture with "
                                             "random weights (no download; timing is the "
                                             "same)."),
    image_size: int = image_size_option(),
    device: str = device_option(),
    dtype: str = dtype_option(),
    options: SteerOptions = None,  # one flag per field (steer_options)
    repeats: int = typer.Option(5, "--repeats", help="Timed repetitions of each unit."),
    end_to_end: bool = typer.Option(True, "--end-to-end/--units-only",
                                    help="Also time whole generations (plain, worst case, "
                                         "one iteration per steered step)."),
    lora: str = typer.Option(None, "--lora",
                             help="LoRA folder merged into the model before timing (`l2s "
                                  "distill`), or a model name for its shipped LoRA."),
    classifier: str = typer.Option(None, "--classifier", help="Classifier card.json, folder or "
                                   "hub repo user/name (default: the model's; a random one "
                                   "of the same shape if none)."),
    channels_last: bool = typer.Option(False, "--channels-last",
                                       help="Run the network in channels_last memory format "
                                            "(GPU lever)."),
    truncate: bool = typer.Option(True, "--truncate/--full-forward",
                                  help="Steering forwards stop after the last recorded layer "
                                       "(default) or run the whole network."),
    out: str = typer.Option(None, "--out", "-o", help="Also write the report JSON here."),
    force: bool = typer.Option(False, "--force",
                               help="Build and time the model even when the estimate says "
                                    "its weights do not fit the device's free memory."),
    config: str = config_option("repeats: 5"),
    json_out: bool = typer.Option(False, "--json", help="Print the report JSON on stdout."),
) -> None:
    """Time plain and steered steps, ours and reference-style, side by side.

    Times a plain guided step, one steering iteration (ours and reference-style: explicit
    attention everywhere, every token's maps kept) and whole generations. Ratios come from
    the same run, so they hold on the machine that ran it; on a GPU the times are
    CUDA-synchronised. Each unit also counts the kernels it launches (ATen operations other
    than views; the same count on a CPU, where launch overhead cannot be timed) and its host
    reads (each one a GPU sync). --iterations runs on every steered step (the worst case,
    the early exit disabled).

    Before building a preset's model it prints an estimate (its weights' size from the
    preset's architecture, the device's free memory, a floor on the time from the FLOPs of
    one forward), refuses a model whose weights do not fit (--force runs it anyway), and
    warns that on a CPU this GPU benchmark takes long.
    """
    cfg = SpeedConfig(model=model, prompt=prompt, random_weights=random_weights,
                      image_size=image_size, device=device, dtype=dtype, options=options,
                      repeats=repeats, end_to_end=end_to_end, classifier=classifier, lora=lora,
                      channels_last=channels_last, truncate=truncate, out=out, force=force)

    def on_note(line: str) -> None:  # the estimate (not with --quiet) and warnings
        if line.startswith("warning:"):
            console.print(f"[yellow]{line}[/]", highlight=False)
        elif verbosity() >= 0:
            console.print(line, highlight=False, markup=False)

    with status("timing", json_out) as spinner:

        def on_unit(name: str, res: dict) -> None:  # progress only: the table has the numbers
            if spinner is not None:
                value = f"{res['ms']:.1f} ms" if "ms" in res else f"{res['seconds']:.2f} s"
                spinner.update(f"timing (last: {name} {value})")

        report = speed_job.speed(cfg, on_unit=on_unit, on_note=on_note).to_json()
    if json_out:
        emit_json(report)
        return
    table = Table(title=f"{report['model']} on {report['device']} ({report['dtype']}, "
                        f"{report['image_size'][0]}x{report['image_size'][1]} px)")
    for col in ("unit", "median ms", "forward", "backward", "peak MB", "kernels", "host reads"):
        table.add_column(col)
    for name, u in report["units"].items():
        ops = u.get("ops")
        # Host reads: .item()-style reads and device-to-host copies (.tolist(), .cpu() of a GPU
        # tensor): each waits for the device.
        table.add_row(name, f"{u['ms']:.1f}",
                      *(f"{u[k]:.1f}" if k in u else "-" for k in ("forward_ms", "backward_ms")),
                      f"{u['peak_mb']:.0f}",
                      *((str(ops["kernels"]), str(ops["host_reads"] + ops["device_to_host"]))
                        if ops else ("-", "-")))
    console.print(table)
    r = report["ratios"]
    console.print(f"iteration / plain step: x{r['ours_iteration_vs_plain_step']} time, "
                  f"x{r['ours_iteration_vs_plain_step_kernels']} kernels; "
                  f"reference-style / ours: x{r['reference_vs_ours_iteration']} time"
                  + (f", x{r['reference_vs_ours_peak_memory']} peak memory"
                     if r["reference_vs_ours_peak_memory"] else ""))
    if options.compile != "off":
        console.print(f"compiled ({options.compile}) / eager iteration: "
                      f"x{r['compiled_vs_eager_iteration']} time, update error "
                      f"{r['compiled_vs_eager_update_error']:.2g} (rounding: ~1e-6 fp32, ~1e-3 "
                      "fp16); the first compiled iteration took "
                      f"{report['units']['ours_iteration']['warmup_ms'] / 1000:.1f} s "
                      "(compilation, not in the times); plain steps and the reference-style "
                      "loop run eager")
    if "end_to_end" in report:
        e = report["end_to_end"]
        console.print(f"end to end: plain {e['plain']['seconds']:.2f} s; worst case "
                      f"({report['steered_steps']} steps x {report['iterations']} iterations) "
                      f"{e['steered_worst_case']['seconds']:.2f} s "
                      f"(x{e['ratios']['steered_worst_case']}); one iteration per step "
                      f"{e['steered_one_iteration']['seconds']:.2f} s "
                      f"(x{e['ratios']['steered_one_iteration']})")
