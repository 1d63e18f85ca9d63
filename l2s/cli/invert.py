"""`l2s invert`: fill the attention cache with dual-prompt maps of inverted images."""

from __future__ import annotations

import typer
from rich.progress import (
    BarColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from l2s.cli.options import config_option, device_option, dtype_option
from l2s.cli.output import console, emit_json, progress, user_errors
from l2s.inversion import job
from l2s.inversion.cache import AttentionCache


def _stats_table(stats: dict) -> Table:
    t = Table(title=f"cache {stats['dir']}")
    t.add_column("what")
    t.add_column("count")
    t.add_row("entries (image x prompt)", str(stats["entries"]))
    t.add_row("images", str(stats["images"]))
    for group in ("by_source", "by_relation", "by_polarity", "by_split"):
        for k, v in sorted(stats[group].items(), key=lambda kv: str(kv[0])):
            t.add_row(f"{group[3:]}: {k}", str(v))
    t.add_row("disk", f"{stats['bytes'] / 2**20:.1f} MiB")
    return t


def progress_columns() -> tuple:
    """The invert progress line (also shown when `l2s train` inverts what the cache lacks)."""
    return (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}"),
            TextColumn("written {task.fields[written]} skipped {task.fields[skipped]} "
                       "dropped {task.fields[dropped]}"), TimeElapsedColumn(),
            TimeRemainingColumn())


def invert_info(fields: dict) -> str:
    """The invert counts of a one-line status."""
    return (f"written {fields['written']} skipped {fields['skipped']} dropped "
            f"{fields['dropped']}")


def batch_progress(progress):
    """An invert-job callback that keeps one bar per source on ``progress``."""
    tasks: dict[str, int] = {}

    def on_batch(ev: dict) -> None:
        src = ev["source"]
        if src not in tasks:
            # "expected" is an upper bound (a source may run short): the ETA is too.
            tasks[src] = progress.add_task(src, total=ev.get("expected"), written=0,
                                           skipped=0, dropped=0)
        progress.update(tasks[src], completed=ev["done"], written=ev["written"],
                        skipped=ev["skipped"], dropped=ev["dropped"])

    return on_batch


def summary_lines(res) -> list[str]:
    """What an invert run did, each count said once, unreadable files named."""
    dropped = ", ".join(f"{k}: {v}" for k, v in sorted(res.dropped.items())) or "none"
    lines = [f"wrote {res.written} entries, {res.skipped} already cached, {res.inverted} "
             f"images inverted, {res.corrupt_rebuilt} corrupt entries rebuilt, "
             f"{res.seconds:.1f} s; entries not written: {dropped}"]
    if not res.written and not res.skipped and res.dropped.get("low reconstruction PSNR"):
        lines.append("no entry written: every image reconstructed below --min-psnr (the "
                     "backbone could not invert it); lower --min-psnr, invert with more --steps "
                     "or --fixed-point, or use --inversion noise (no reconstruction check)")
    if res.left_to_others:
        by = f" ({'; '.join(res.others)})" if res.others else ""
        lines.append(f"{res.left_to_others} entries were being written by another process "
                     f"sharing this cache{by} (not waited for; rerun to check)")
    if res.unreadable:
        more = len(res.unreadable) - 5
        lines.append("unreadable images: " + ", ".join(map(str, res.unreadable[:5]))
                     + (f" and {more} more" if more > 0 else ""))
    for src, rep in res.sources.items():
        skipped = ", ".join(f"{k}: {v}" for k, v in rep.get("dropped", {}).items())
        lines.append(f"source {src}: {rep.get('kept_total', 0)} samples"
                     + (f"; candidates it skipped: {skipped}" if skipped else ""))
    return lines


@user_errors
def invert(
    ctx: typer.Context,
    data: list[str] = typer.Option(["shapes"], "--data",
                                   help="Source, repeatable: gqa, folder, shapes, generated."),
    model: str = typer.Option("toy", "--model", "-m", help="Preset, hub id or local folder."),
    cache_dir: str = typer.Option(None, "--cache-dir",
                                  help="Cache root (default: $L2S_CACHE_DIR or ~/.cache/l2s)."),
    gqa_root: str = typer.Option(None, "--gqa-root",
                                 help="GQA folder with images/ and *_sceneGraphs.json."),
    folder: str = typer.Option(None, "--folder", help="Folder with images + annotations.jsonl."),
    limit: int = typer.Option(None, "--limit", help="Stop after N samples per source."),
    negatives: int = typer.Option(1, "--negatives",
                                  help="Wrong-relation captions recorded per image (0-3)."),
    timesteps: str = typer.Option("5,10,15,20,25,49", "--timesteps",
                                  help="Step indices (0 = noisiest) at which maps are recorded."),
    steps: int = typer.Option(50, "--steps", help="DDIM schedule length for inversion."),
    inversion: str = typer.Option("ddim", "--inversion",
                                  help="ddim (inversion + reconstruction PSNR) or noise "
                                       "(forward-noised image: fast bulk data)."),
    fixed_point: int = typer.Option(None, "--fixed-point",
                                    help="Fixed-point refinements per DDIM inversion step "
                                         "(default: the model's, `l2s models --json`: 0, "
                                         "plain Euler, on toy-mmdit; 2 elsewhere)."),
    min_psnr: float = typer.Option(20.0, "--min-psnr",
                                   help="Drop images reconstructing worse than this (dB)."),
    per_relation: str = typer.Option(None, "--per-relation",
                                     help="train,val,test samples per relation."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images inverted together."),
    shard: str = typer.Option(None, "--shard",
                              help="i/n: take every n-th sample from i (accelerate launch "
                                   "sets this per process)."),
    seed: int = typer.Option(0, "--seed", help="Sampling and negative-relation seed."),
    device: str = device_option(),
    dtype: str = dtype_option(),
    stats: bool = typer.Option(False, "--stats", help="Only show what the cache holds."),
    config: str = config_option("limit: 100"),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Invert images and cache their attention maps under true and wrong captions.

    Records subject/object maps under the true caption and wrong-relation captions (all
    labelled with the true relation). Re-running skips cached entries, so an interrupted run
    resumes with nothing lost; broken entries are found and rebuilt.
    """
    from l2s.engine.loading import load_backbone

    if stats:
        den = load_backbone(model, device=device, dtype=dtype)
        s = AttentionCache(cache_dir, den.fingerprint).stats()
        if json_out:
            emit_json(s)
        else:
            console.print(_stats_table(s))
        return
    cfg = job.InvertConfig.from_options({k: v for k, v in ctx.params.items()
                                         if k not in ("stats", "config", "json_out")})
    with progress(*progress_columns(), info=invert_info, json_out=json_out) as bars:
        res = job.invert(cfg, callback=batch_progress(bars))
    if json_out:
        emit_json(res.to_json())
        return
    for line in summary_lines(res):
        console.print(line, highlight=False, soft_wrap=True)
    console.print(_stats_table(res.stats))
