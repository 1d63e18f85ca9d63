"""`l2s train`: train a backbone's relation classifier on its cached attention maps."""

from __future__ import annotations

import typer
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from l2s.classifier import train as train_job
from l2s.classifier.train import TrainConfig, TrainResult
from l2s.cli.invert import batch_progress, invert_info, progress_columns, summary_lines
from l2s.cli.options import config_option
from l2s.cli.output import console, emit_json, progress, status, user_errors
from l2s.relations import RELATIONS


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def diagnostic_tables(res: TrainResult) -> list[Table]:
    """The leakage diagnostic and the test confusion matrix, for people."""
    m = res.metrics
    n = m["test_samples"]
    diag = Table(title="test accuracy (leakage diagnostic)")
    for col in ("samples", "count", "accuracy"):
        diag.add_column(col)
    diag.add_row("true caption", str(n["true_caption"]), _pct(m["test_accuracy_true_caption"]))
    diag.add_row("wrong caption", str(n["wrong_caption"]),
                 _pct(m["test_accuracy_wrong_caption"]))
    diag.add_row("all", str(n["true_caption"] + n["wrong_caption"]), _pct(m["test_accuracy"]))
    diag.add_row("wrong caption -> caption's relation", str(n["wrong_caption"]),
                 _pct(m["test_wrong_caption_predicts_caption"]))
    by_t = Table(title="leakage per timestep (noisiest first)")
    for col in ("timestep", "true caption", "wrong caption", "wrong -> caption's relation"):
        by_t.add_column(col)
    for ts, d in m.get("test_leakage_by_timestep", {}).items():
        by_t.add_row(ts, _pct(d["true_caption"]), _pct(d["wrong_caption"]),
                     _pct(d["wrong_caption_predicts_caption"]))
    conf = Table(title="test confusion (rows: true, columns: predicted)")
    conf.add_column("")
    for r in RELATIONS:
        conf.add_column(r, justify="right")
    for r, row in zip(RELATIONS, m["confusion"], strict=True):
        conf.add_row(r, *(str(v) for v in row))
    return [diag, by_t, conf]


def leakage_warning(res: TrainResult) -> str | None:
    """One line when the diagnostic looks leaky (``l2s.classifier.train.leakage_verdict``)."""
    verdict = res.metrics.get("leakage") or {}
    if not verdict.get("leaky"):
        return None
    return ("the classifier reads the relation word, not the layout (relation leakage): "
            + "; ".join(verdict["reasons"][:3])
            + ". As a steering loss it will report the prompt's relation as satisfied; train on "
              "true- and wrong-caption maps (without --positive-only, --negatives >= 1)")


@user_errors
def train(
    ctx: typer.Context,
    model: str = typer.Option("toy", "--model", "-m", help="Preset, hub id or local folder."),
    data: list[str] = typer.Option([], "--data",
                                   help="Source to train on, repeatable (default: all cached); "
                                        "what the cache lacks of it is inverted first."),
    invert: str = typer.Option("auto", "--invert",
                               help="auto (invert the --data sources the cache has nothing of, "
                                    "or whose invert was cut off), always (invert them, "
                                    "skipping cached entries) or never."),
    gqa_root: str = typer.Option(None, "--gqa-root",
                                 help="Inverting gqa: folder with images/ and "
                                      "*_sceneGraphs.json."),
    folder: str = typer.Option(None, "--folder",
                               help="Inverting folder: images + annotations.jsonl."),
    limit: int = typer.Option(None, "--limit", help="Inverting: at most N samples per source."),
    negatives: int = typer.Option(1, "--negatives",
                                  help="Inverting: wrong-relation captions per image (0-3)."),
    inversion: str = typer.Option("ddim", "--inversion",
                                  help="Inverting: ddim or noise (see `l2s invert --help`)."),
    cache_dir: str = typer.Option(None, "--cache-dir",
                                  help="Cache root (default: $L2S_CACHE_DIR or ~/.cache/l2s)."),
    out: str = typer.Option(None, "--out", "-o",
                            help="Classifier folder (default: <cache>/classifiers/MODEL, "
                                 "where `l2s steer` looks first)."),
    positive_only: bool = typer.Option(False, "--positive-only",
                                       help="Train without wrong-caption samples (the leakage "
                                            "ablation); the test still reports both."),
    split: str = typer.Option("hash", "--split",
                              help="hash (seeded hash of each image) or recorded (the "
                                   "sources' train/val/test)."),
    val_fraction: float = typer.Option(0.15, "--val-fraction", help="Images for validation."),
    test_fraction: float = typer.Option(0.15, "--test-fraction", help="Images for test."),
    epochs: int = typer.Option(100, "--epochs", help="Most epochs (early stopping ends sooner)."),
    lr: float = typer.Option(None, "--lr",
                             help="AdamW learning rate (default: the model's, listed "
                                  "by `l2s models --json` under training; 1e-4 without a "
                                  "preset, 1e-3 for the toys)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Samples per step."),
    d_model: int = typer.Option(None, "--d-model",
                                help="Classifier width (default: the model's; 256, ~2M "
                                     "parameters, without a preset; toys 64 with --arch l2s)."),
    depth: int = typer.Option(None, "--depth",
                              help="Classifier encoder layers (default 2; toys 1)."),
    tokens: str = typer.Option("map", "--tokens",
                               help="map (one token per head map) or layer (heads averaged "
                                    "per layer: ~10x cheaper)."),
    augment: str = typer.Option("mirror", "--augment",
                                help="Random label-preserving symmetries of training batches: "
                                     "mirror (left-right flip, subject/object swap), all (also "
                                     "up-down flip) or none."),
    arch: str = typer.Option("l2s", "--arch",
                             help="l2s (ours) or reference (the published checkpoints' "
                                  "network, ~2M parameters; compared in docs/results.md)."),
    seed: int = typer.Option(0, "--seed", help="Initialisation, batch order and split."),
    device: str = typer.Option(None, "--device",
                               help="cuda, cpu, ... (default: $L2S_DEVICE, else CUDA if any: "
                                    "under accelerate launch, each process's own GPU)."),
    fresh: bool = typer.Option(False, "--fresh",
                               help="Start over: discard the saved state of an interrupted "
                                    "run in the classifier folder, or replace the finished "
                                    "classifier it holds (needed when its settings, backbone "
                                    "or data differ)."),
    config: str = config_option("epochs: 20"),
    json_out: bool = typer.Option(False, "--json", help="Print the metrics JSON on stdout."),
) -> None:
    """Train a backbone's relation classifier on its cached attention maps.

    Inverts first what the cache lacks of the --data sources (resumable, as `l2s invert`),
    then writes the classifier's weights and card (metrics, data counts, settings). Training
    saves its state after every epoch: rerun the same command after an interruption and it
    continues from the last finished epoch, ending with the weights of an uninterrupted run.
    A rerun once the classifier is finished (same settings and data) says so and trains
    nothing; --fresh retrains it. A folder holding a classifier (or an interrupted run) of
    other settings, backbone or data is refused: --fresh replaces it, or choose another --out.
    """
    from l2s.engine.loading import load_backbone

    cfg = TrainConfig.from_options({k: v for k, v in ctx.params.items()
                                    if k not in ("fresh", "config", "json_out")})
    # The invert progress (bars per source), then the epoch bar; each made by its first event
    inverting = progress(*progress_columns(), info=invert_info, json_out=json_out)
    on_batch = batch_progress(inverting)
    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("train loss {task.fields[train_loss]:.3f}  val loss "
                          "{task.fields[val_loss]:.3f}  val acc {task.fields[val_acc]:.1%}  "
                          "lr {task.fields[lr]:.1e}"), TimeElapsedColumn())
    training = progress(*columns, json_out=json_out, info=lambda f: (
        f"train loss {f['train_loss']:.3f}, val loss {f['val_loss']:.3f}, val acc "
        f"{f['val_acc']:.1%}, lr {f['lr']:.1e}"))
    task = None  # added at the first epoch: nothing is shown if loading the data fails

    def on_event(ev: dict) -> None:
        nonlocal task
        if ev["stage"] == "invert":
            if "sources" in ev:
                if not json_out:
                    console.print(f"inverting what the cache lacks of {', '.join(ev['sources'])} "
                                  "(resumable: rerun to continue)", highlight=False)
                inverting.start()
            elif "result" in ev:
                inverting.stop()  # before the summary: the bars end above it
                if not json_out:
                    for line in summary_lines(ev["result"]):
                        console.print(line, highlight=False, soft_wrap=True)
            else:
                on_batch(ev)
            return
        if task is None:
            training.start()
            if ev.get("resumed"):  # the first of the epochs already done
                training.console.print(f"resuming the interrupted run saved in "
                                       f"{ev['checkpoint']} (--fresh starts over)",
                                       highlight=False, soft_wrap=True)
            task = training.add_task("epoch", total=cfg.epochs, train_loss=0.0, val_loss=0.0,
                                     val_acc=0.0, lr=ev["lr"])
        training.update(task, completed=ev["epoch"], description=f"epoch {ev['epoch']}",
                        train_loss=ev["train_loss"], val_loss=ev["val_loss"],
                        val_acc=ev["val_acc"], lr=ev["lr"])

    with status(f"loading {model}", quiet=json_out):
        den = load_backbone(model, device=device)
    try:
        res = train_job.train(cfg, den, callback=on_event, fresh=fresh)
    finally:
        for bars in (inverting, training):
            if bars.live.is_started:  # stopping bars never started prints a blank line
                bars.stop()
    if json_out:
        emit_json(res.to_json())
        return
    if res.already_trained:
        console.print(f"{res.card_path.parent} already holds the classifier trained with these "
                      f"settings and data ({res.card_path}): nothing to do; --fresh retrains "
                      "it", highlight=False, soft_wrap=True)
        return
    tr = res.card["training"]
    corrupt = res.card["data"].get("corrupt_dropped", 0)
    kept = res.card["data"].get("corrupt_left_in_cache", 0)
    if corrupt > kept:
        console.print(f"[yellow]warning:[/] {corrupt - kept} broken cache entries were deleted "
                      "and left out (recorded in the card); `l2s invert` with the same options "
                      "rebuilds them", highlight=False)
    if kept:
        console.print(f"[yellow]warning:[/] {kept} broken cache entries were left out "
                      "(recorded in the card) and are still in the cache, which this run "
                      "cannot change (read-only): `l2s invert` with the same options, run by "
                      "someone who can write the cache, rebuilds them", highlight=False)
    busy = res.card["data"].get("cache_being_written")
    if busy:
        console.print(f"[yellow]warning:[/] the cache was still being written by "
                      f"{', '.join(busy)} when this run read it: trained on the entries already "
                      "there (recorded in the card); rerun `l2s train` when that process has "
                      "finished to train on all of them", highlight=False)
    console.print(f"trained {tr['epochs_run']} epochs in {res.seconds:.1f} s; best epoch "
                  f"{res.metrics['best_epoch']} (val acc {_pct(res.metrics['val_accuracy'])}); "
                  f"{tr['parameters']:,} parameters")
    for table in diagnostic_tables(res):
        console.print(table)
    warning = leakage_warning(res)
    if warning:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    console.print(f"classifier card: {res.card_path}", highlight=False, soft_wrap=True)
