"""`l2s distill`: fine-tune a LoRA so that plain generation obeys relations."""

from __future__ import annotations

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from l2s.cli.options import config_option, device_option
from l2s.cli.output import console, emit_json, progress, status, user_errors
from l2s.distill.job import DistillConfig


@user_errors
def distill(
    ctx: typer.Context,
    model: str = typer.Option("toy", "--model", "-m", help="Preset, hub id or local folder."),
    out: str = typer.Option(None, "--out", "-o",
                            help="The LoRA folder (default: runs/distill-MODEL); an "
                                 "interrupted run there resumes."),
    recipe: str = typer.Option("self", "--recipe",
                               help="self: l2s-steered images the relation classifier accepts, "
                                    "the model's own denoising loss; reward: the classifier's "
                                    "loss through the first sampling steps. On the toy neither "
                                    "has yet reached its targets (self at its defaults: +0.13 on "
                                    "distilled pairs but held-out objects forgotten; reward "
                                    "empties the images): docs/results.md, Distillation."),
    classifier: str = typer.Option(None, "--classifier",
                                   help="Classifier card steering and data selection use "
                                        "(default: the model's)."),
    images: int = typer.Option(3000, "--images", help="Steered images generated."),
    chunk: int = typer.Option(50, "--chunk", help="Images per batch and per data file."),
    hold_out: str = typer.Option(None, "--hold-out",
                                 help="Objects (comma-separated) whose pairs are never "
                                      "distilled on (default: the model's last object, the "
                                      "toy's ring; \"\" for none)."),
    preserve: int = typer.Option(100, "--preserve",
                                 help="Recipe self: plain images per object of every object "
                                      "alone (held-out ones too), trained beside the steered "
                                      "ones so the LoRA keeps drawing every object; 0: none."),
    rank: int = typer.Option(8, "--rank", help="LoRA rank."),
    alpha: float = typer.Option(8.0, "--alpha", help="LoRA scale numerator (alpha / rank)."),
    targets: str = typer.Option("to_q,to_k,to_v,to_out.0", "--targets",
                                help="Module names the LoRA adapts, comma-separated."),
    steps: int = typer.Option(2000, "--steps", help="Training steps."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per training step."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate."),
    drop_text: float = typer.Option(0.1, "--drop-text",
                                    help="Fraction of images trained with the empty prompt."),
    noisy_fraction: float = typer.Option(0.25, "--noisy-fraction",
                                         help="Train at this first fraction of the sampling "
                                              "steps (the noisiest, where layout is decided)."),
    paired_noise: float = typer.Option(1.0, "--paired-noise",
                                       help="Fraction of each batch noised with the noise its "
                                            "image was generated from (else fresh noise)."),
    keep: float = typer.Option(1.0, "--keep",
                               help="Recipe reward: weight of the term keeping the LoRA's "
                                    "outputs close to the base model's."),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every",
                                         help="Steps between saved training states."),
    eval_prompts: int = typer.Option(100, "--eval-prompts",
                                     help="Judged prompts per split (distilled and held-out "
                                          "pairs) for the card; 0: none."),
    eval_seed: int = typer.Option(9, "--eval-seed", help="Seed of the card's evaluation."),
    seed: int = typer.Option(0, "--seed", help="Prompts, noise and batches."),
    device: str = device_option(),
    fresh: bool = typer.Option(False, "--fresh",
                               help="Discard the saved training state in --out (generated data "
                                    "is kept) and train from the start."),
    config: str = config_option("steps: 500"),
    json_out: bool = typer.Option(False, "--json", help="Print the card JSON on stdout."),
) -> None:
    """Fine-tune a LoRA so that plain generation obeys spatial relations.

    Recipe self: generates images with l2s steering on relation prompts (pairs with the
    --hold-out objects never used), keeps those the relation classifier accepts, fine-tunes a
    LoRA on them with the model's own denoising loss. Recipe reward: trains the LoRA on the
    relation classifier's loss at the latents of its own first sampling steps. Writes the
    LoRA folder in diffusers' format (pipeline.load_lora_weights reads it) with card.json.
    Resumable: rerun the same command after an interruption. Use it with --lora DIR on steer,
    bench (plain+lora, l2s+lora) and speed.
    """
    from l2s.engine.loading import load_backbone

    cfg = DistillConfig.from_options({k: v for k, v in ctx.params.items()
                                      if k not in ("fresh", "config", "json_out")})
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    bars = progress(*columns, json_out=json_out, info=lambda f: f.get("info", ""))
    tasks: dict[str, int] = {}

    def on_event(ev: dict) -> None:
        phase = ev["phase"]
        if not bars.live.is_started:
            bars.start()
        if phase == "data":
            if "data" not in tasks:
                tasks["data"] = bars.add_task("steered images", total=ev["total"], info="")
            bars.update(tasks["data"], completed=ev["done"],
                        info=f"accepted {ev['accepted']}")
        elif phase == "preserve":
            if "preserve" not in tasks:
                tasks["preserve"] = bars.add_task("plain single-object images",
                                                  total=ev["total"], info="")
            bars.update(tasks["preserve"], completed=ev["done"])
        elif phase == "train":
            if "train" not in tasks:
                if ev.get("resumed"):
                    bars.console.print(f"resuming training at step {ev['step']} (--fresh "
                                       "starts over)", highlight=False)
                tasks["train"] = bars.add_task("training", total=ev["steps"], info="")
            bars.update(tasks["train"], completed=ev["step"], info=f"loss {ev['loss']:.4f}")
        elif phase == "evaluate" and not json_out:
            bars.console.print(f"judging plain vs plain+lora on {ev['prompts']} prompts per "
                               "split", highlight=False)

    with status(f"loading {model}", quiet=json_out):
        den = load_backbone(model, device=device)
    try:
        from l2s.distill.job import distill as run

        res = run(cfg, den, callback=on_event, fresh=fresh)
    finally:
        if bars.live.is_started:
            bars.stop()
    if json_out:
        emit_json(res.to_json())
        return
    data = res.card["data"]
    held = ", ".join(data["held_out_objects"]) or "none"
    if "accepted" in data:
        kept = f", {data['preserved']} plain single-object images" if data.get("preserved") \
            else ""
        console.print(f"data: {data['accepted']} of {data['generated']} steered images accepted "
                      f"by the classifier{kept} (held out: {held})", highlight=False)
    else:
        console.print(f"trained on {data['prompts']} relation prompts (held out: {held})",
                      highlight=False)
    measured = res.card.get("measured")
    if measured:
        for split in ("distilled_pairs", "held_out_pairs"):
            if split in measured:
                m = measured[split]
                console.print(f"{split.replace('_', ' ')}: position accuracy plain "
                              f"{m['plain']:.3f} -> plain+lora {m['plain+lora']:.3f} (judge: "
                              f"{measured['judge']}, {measured['prompts_per_split']} prompts)",
                              highlight=False)
    console.print(f"LoRA: {res.out} (use it with --lora {res.out})", highlight=False,
                  soft_wrap=True)
