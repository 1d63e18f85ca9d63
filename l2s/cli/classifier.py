"""`l2s classifier import` (make a published L2S checkpoint usable by `l2s steer`) and `l2s
classifier push` (publish a classifier on the Hugging Face hub)."""

from __future__ import annotations

import typer

from l2s.classifier.layout import published_presets
from l2s.cli.output import console, emit_json, output_options, status, user_errors

app = typer.Typer(help="Relation classifiers: import the published L2S checkpoints, push one "
                       "to the hub.", no_args_is_help=True)


@app.command("import")
@output_options
def import_(
    checkpoint: str = typer.Argument(..., help="The downloaded .pth file (e.g. ~/Downloads/"
                                               "sd2.pth)."),
    model: str = typer.Option(..., "--model", "-m",
                              help="Backbone it was trained on: "
                                   + published_presets().replace(" or ", ", ")
                                   + " (a preset is read from its known architecture: "
                                     "nothing is downloaded), or a local diffusers folder / "
                                     "hub id (loaded)."),
    out: str = typer.Option(None, "--out", "-o",
                            help="Install here (default: where `l2s steer --model MODEL` "
                                 "looks)."),
    force: bool = typer.Option(False, "--force", help="Replace a classifier already there."),
    random_weights: bool = typer.Option(False, "--random-weights",
                                        help="Import for the preset's architecture with random "
                                             "weights (speed work; steer with the same flag)."),
    json_out: bool = typer.Option(False, "--json", help="Print the card summary as JSON."),
) -> None:
    """Check a published L2S classifier checkpoint against the backbone, convert it to
    safetensors + card, and install it as that backbone's default classifier.

    The file is read with torch.load(weights_only=True): objects in it are refused, never
    unpickled. The checkpoints are the authors' (non-commercial licence): download them
    yourself; l2s converts, never redistributes.
    """
    from l2s.classifier.importer import import_classifier

    @user_errors
    def run() -> None:
        with status(f"importing {checkpoint} for {model}", quiet=json_out):
            res = import_classifier(checkpoint, model, out=out, force=force,
                                    random_weights=random_weights)
        if json_out:
            emit_json(res.to_json())
            return
        card = res.card
        console.print(f"imported {card['source']['file']} (sha256 "
                      f"{card['source']['sha256'][:12]}...) for {card['backbone']['name']} "
                      f"({card['backbone']['fingerprint']}): classes "
                      f"{', '.join(card['classes'])}; trained steps {card['timesteps']}; "
                      f"{card['architecture']['n_maps']} maps per object in the "
                      f"{card['layout']['name']} layout")
        for note in card.get("notes", []):
            console.print(f"[yellow]note:[/] {note}")
        console.print(f"classifier card: {res.card_path}")
        console.print(f"[dim]{card['licence']}[/]")

    run()


@app.command("push")
@output_options
def push(
    folder: str = typer.Argument(..., help="The classifier folder (card.json + "
                                           "model.safetensors) `l2s train` wrote."),
    repo_id: str = typer.Argument(..., help="Hub repo to upload to, user/name (created if "
                                            "missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    license: str = typer.Option(None, "--license",
                                help="Licence id for the model card (e.g. mit, apache-2.0)."),
    message: str = typer.Option(None, "--message", help="Commit message."),
    json_out: bool = typer.Option(False, "--json", help="Print what was uploaded as JSON."),
) -> None:
    """Upload a classifier to the Hugging Face hub with a README model card.

    The repo gets card.json and model.safetensors unchanged, a config.json (architecture and
    classes) and a README.md (hub front matter: library_name, tags, base_model, license; body:
    the base model and its fingerprint, training data, metrics, leakage diagnostic, licence).
    Others then steer with `--classifier REPO_ID`. Log in first (`hf auth login`, a write
    token).
    """
    from l2s.classifier.push import push_classifier

    @user_errors
    def run() -> None:
        with status(f"pushing {folder} to {repo_id}", quiet=json_out):
            res = push_classifier(folder, repo_id, private=private, license=license,
                                  commit_message=message)
        if json_out:
            emit_json(res.to_json())
            return
        console.print(f"pushed {', '.join(res.files)} to {repo_id}: {res.url}")
        console.print(f"steer with: --classifier {repo_id}")

    run()
