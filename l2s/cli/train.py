"""`l2s train`: train a backbone's relation classifier on its cached attention maps."""

from __future__ import annotations

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from l2s.cache import CacheError
from l2s.classifier import ClassifierError
from l2s.cli.output import console, emit_json, status, user_errors
from l2s.engine.backbone import BackboneError
from l2s.relations import RELATIONS
from l2s.train import TrainConfig, TrainError, TrainResult, run_train


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
    conf = Table(title="test confusion (rows: true, columns: predicted)")
    conf.add_column("")
    for r in RELATIONS:
        conf.add_column(r, justify="right")
    for r, row in zip(RELATIONS, m["confusion"], strict=True):
        conf.add_row(r, *(str(v) for v in row))
    return [diag, conf]


@user_errors(BackboneError, CacheError, ClassifierError, TrainError)
def train(
    model: str = typer.Option("toy", "--model", "-m", help="Preset, hub id or local folder."),
    data: list[str] = typer.Option([], "--data",
                                   help="Source to train on, repeatable (default: all cached)."),
    cache_dir: str = typer.Option(None, "--cache-dir",
                                  help="Cache root (default: $L2S_CACHE_DIR or ~/.cache/l2s)."),
    out: str = typer.Option(None, "--out", "-o",
                            help="Classifier folder (default: <cache>/classifiers/MODEL, "
                                 "where `l2s steer` looks)."),
    positive_only: bool = typer.Option(False, "--positive-only",
                                       help="Train without wrong-caption samples (the leakage "
                                            "ablation); the test still reports both."),
    split: str = typer.Option("hash", "--split",
                              help="hash (seeded hash of each image) or recorded (the "
                                   "sources' train/val/test)."),
    val_fraction: float = typer.Option(0.15, "--val-fraction", help="Images for validation."),
    test_fraction: float = typer.Option(0.15, "--test-fraction", help="Images for test."),
    epochs: int = typer.Option(100, "--epochs", help="Most epochs (early stopping ends sooner)."),
    lr: float = typer.Option(None, "--lr", help="AdamW learning rate (default 1e-4; toy 1e-3)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Samples per step."),
    d_model: int = typer.Option(None, "--d-model",
                                help="Classifier width (default 256, ~2M parameters; toy 64)."),
    depth: int = typer.Option(None, "--depth",
                              help="Classifier encoder layers (default 2; toy 1)."),
    tokens: str = typer.Option("map", "--tokens",
                               help="map (one token per head map) or layer (heads averaged "
                                    "per layer: ~10x cheaper)."),
    augment: str = typer.Option("mirror", "--augment",
                                help="Random label-preserving symmetries of training batches: "
                                     "mirror (left-right flip, subject/object swap), all (also "
                                     "up-down flip) or none."),
    seed: int = typer.Option(0, "--seed", help="Initialisation, batch order and split."),
    device: str = typer.Option(None, "--device",
                               help="cuda, cpu, ... (default: $L2S_DEVICE, else CUDA if any)."),
    json_out: bool = typer.Option(False, "--json", help="Print the metrics JSON on stdout."),
) -> None:
    """Train the relation classifier of a backbone on the maps `l2s invert` cached, and write
    its weights and card (metrics, data counts, settings)."""
    from l2s.engine.loading import load_backbone

    try:
        cfg = TrainConfig(model=model, data=tuple(data), cache_dir=cache_dir, out=out,
                          positive_only=positive_only, split=split, val_fraction=val_fraction,
                          test_fraction=test_fraction, epochs=epochs, lr=lr,
                          batch_size=batch_size, d_model=d_model, depth=depth, tokens=tokens,
                          seed=seed, device=device, augment=augment)
    except TrainError as e:
        raise typer.BadParameter(str(e)) from None
    with status(f"loading {model}", quiet=json_out):
        den = load_backbone(model)
    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("train loss {task.fields[train_loss]:.3f}  val loss "
                          "{task.fields[val_loss]:.3f}  val acc {task.fields[val_acc]:.1%}  "
                          "lr {task.fields[lr]:.1e}"), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=json_out) as progress:
        task = progress.add_task("epoch 0", total=epochs, train_loss=float("nan"),
                                 val_loss=float("nan"), val_acc=0.0, lr=cfg.resolved_lr())

        def on_epoch(ev: dict) -> None:
            progress.update(task, completed=ev["epoch"], description=f"epoch {ev['epoch']}",
                            train_loss=ev["train_loss"], val_loss=ev["val_loss"],
                            val_acc=ev["val_acc"], lr=ev["lr"])

        res = run_train(cfg, den, callback=on_epoch)
    if json_out:
        emit_json(res.to_json())
        return
    tr = res.card["training"]
    console.print(f"trained {tr['epochs_run']} epochs in {res.seconds:.1f} s; best epoch "
                  f"{res.metrics['best_epoch']} (val acc {_pct(res.metrics['val_accuracy'])}); "
                  f"{tr['parameters']:,} parameters")
    for table in diagnostic_tables(res):
        console.print(table)
    console.print(f"classifier card: {res.card_path}")
