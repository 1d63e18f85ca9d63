"""`l2s bench`: score methods on a prompt suite with the same seeds, resumably."""

from __future__ import annotations

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from l2s.bench import SUITES, BenchConfig, BenchResult, run_bench
from l2s.cli.options import (
    config_option,
    device_option,
    dtype_option,
    image_size_option,
    steer_options,
)
from l2s.cli.output import console, emit_json, progress, user_errors
from l2s.config import check_writable_dir
from l2s.launcher import parse_shard
from l2s.steering.options import SteerOptions


@user_errors
@steer_options
def bench(
    suite: str = typer.Option("shapes", "--suite", help="Prompt suite: " + ", ".join(SUITES)
                              + " (docs/benchmarks.md)."),
    model: str = typer.Option("toy", "--model", "-m", help="Preset, hub id or local folder."),
    image_size: int = image_size_option(),
    method: list[str] = typer.Option(["plain"], "--method",
                                     help="Method to score, repeat to compare on the same "
                                          "seeds: plain, l2s, centroid, l2s-verify (plain "
                                          "first, steer what the detector fails), best-of:N "
                                          "(N plain candidates, the classifier keeps the most "
                                          "probable; bare: 4). l2s:CARD "
                                          "and l2s-verify:CARD steer with the classifier "
                                          "card, folder or hub repo CARD, so one run compares "
                                          "classifiers. plain+lora and l2s+lora: with the "
                                          "--lora LoRA merged (`l2s distill`). Writes "
                                          "frontier.png (accuracy vs seconds per image) in "
                                          "--out."),
    prompts: int = typer.Option(None, "--prompts",
                                help="First N prompts (default: all 553 / 100 / 300 of a fixed "
                                     "suite, 200 of a generated one)."),
    num_images: int = typer.Option(None, "--num-images", "-n",
                                   help="Images per prompt, at most 1000 (default: GenEval 4, "
                                        "CompBench 10, multirel 4, toy 1)."),
    seed: int = typer.Option(0, "--seed", help="Chooses the prompts and the image seeds."),
    options: SteerOptions = None,  # one flag per field (steer_options)
    classifier: str = typer.Option(None, "--classifier",
                                   help="l2s: classifier card.json, folder or hub repo "
                                        "user/name (default: the model's)."),
    lora: str = typer.Option(None, "--lora",
                             help="LoRA folder of the +lora methods (default: the model's "
                                  "shipped one: `--lora toy`)."),
    detector: str = typer.Option(None, "--detector",
                                 help="toy, mask2former, owlv2, a hub id or a folder (default: "
                                      "toy for shapes suites, mask2former for geneval suites "
                                      "and multirel, owlv2 for compbench-spatial)."),
    color_model: str = typer.Option("openai/clip-vit-large-patch14", "--color-model",
                                    help="CLIP model for GenEval's colour tasks."),
    batch_size: int = typer.Option(100, "--batch-size", help="Images generated together."),
    shard: str = typer.Option(None, "--shard",
                              help="I/N: this process does prompts I, I+N, ... (default under "
                                   "accelerate launch: its rank); shards share --out and "
                                   "merge into one summary."),
    device: str = device_option(),
    dtype: str = dtype_option(),
    out: str = typer.Option(None, "--out", "-o",
                            help="Results folder (default: out/bench-SUITE-MODEL); an "
                                 "interrupted run there resumes."),
    config: str = config_option("num_images: 4"),
    json_out: bool = typer.Option(False, "--json", help="Print the summary JSON on stdout."),
) -> None:
    """Generate and score a benchmark suite; rerunning with the same --out resumes."""
    cfg = BenchConfig(suite=suite, model=model, image_size=image_size, methods=tuple(method),
                      prompts=prompts, num_images=num_images, seed=seed, options=options,
                      classifier=classifier, lora=lora, detector=detector, color_model=color_model,
                      batch_size=batch_size, shard=parse_shard(shard), device=device,
                      dtype=dtype, out=out)
    out = cfg.out  # out/bench-SUITE-MODEL when not given
    check_writable_dir(out)  # before generating: results that cannot be saved are lost
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with progress(*columns, json_out=json_out, transient=True) as bars:
        tasks: dict[str, int] = {}

        def on_image(ev: dict) -> None:
            if ev["method"] not in tasks and ev["done"] and not json_out:  # a rerun
                left = "nothing left to do" if ev["done"] == ev["total"] else "resuming"
                bars.console.print(f"{ev['method']}: {ev['done']} of {ev['total']} images "
                                   f"already scored in {out}, {left}", highlight=False)
            if ev["method"] not in tasks:
                tasks[ev["method"]] = bars.add_task(ev["method"], total=ev["total"],
                                                    completed=ev["done"])
            bars.update(tasks[ev["method"]], completed=ev["done"])

        res = run_bench(cfg, callback=on_image)
    for w in res.warnings:
        console.print(f"[bold red]warning:[/] {w}", highlight=False)
    for n in res.notes:
        console.print(f"note: {n} (docs/benchmarks.md)", highlight=False)
    if not res.complete:
        console.print("[yellow]some shards are not finished: this summary covers the images "
                      "scored so far; rerun any shard (or without --shard) once all are done[/]")
    if json_out:
        emit_json(res.to_json())
        return
    console.print(summary_table(res, f"{suite} on {model} (detector {res.detector})"))
    console.print(f"per-image results: {res.out}/results*.jsonl; GenEval layout: "
                  f"{res.out}/<method>/; samples: {res.out}/contact_*.png")
    if res.exports:
        console.print(f"{suite}'s own harness layout: "
                      + ", ".join(str(p) for p in res.exports.values()))


def summary_table(res: BenchResult, title: str) -> Table:
    """Per method: images, the suite's headline numbers, per-task accuracy, generation seconds
    and their ratio to plain, and the paired difference to plain with its 95% interval."""
    first = next(iter(res.methods.values()))
    keys = [k for k in ("both_present", "position_accuracy", "relation_accuracy", "fused",
                        "overall") if k in first]
    tasks = list(first.get("tasks", {})) if len(first.get("tasks", {})) > 1 else []
    table = Table(title=title)
    for col in ["method", "images", *keys, *tasks, "seconds", "x plain", "CPU x plain",
                "vs plain (95% CI)"]:
        table.add_column(col.replace("_", " "))
    for name, m in res.methods.items():
        vs = m.get("vs_plain")
        diff = (f"{vs['difference']:+.3f} [{vs['ci95'][0]:+.3f}, {vs['ci95'][1]:+.3f}]"
                if vs and vs["difference"] is not None else "")
        ratio, cpu = m.get("seconds_vs_plain"), m.get("cpu_seconds_vs_plain")
        table.add_row(name, str(m["n_images"]), *(f"{m.get(k, 0):.3f}" for k in keys),
                      *(f"{m.get('tasks', {}).get(t, 0):.3f}" for t in tasks),
                      f"{m.get('seconds', 0):.1f}", "" if ratio is None else f"{ratio:.2f}",
                      "" if cpu is None else f"{cpu:.2f}", diff)
    return table
