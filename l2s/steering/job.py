"""The `l2s steer` job: parse, pick the loss, generate (steered or plain), time, report."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from l2s.config import (
    CONFIG_FILE,
    ConfigError,
    check_choice,
    check_config,
    check_flag,
    check_integer,
    check_seeds,
    check_text,
    check_writable_dir,
    dump_yaml,
    expand_home,
    option_values,
)
from l2s.engine.backbone import Denoiser
from l2s.engine.registry import steer_defaults
from l2s.engine.sampling import seeded_latents, to_uint8
from l2s.engine.timing import Clock, peak_memory_mb
from l2s.errors import L2SError
from l2s.inversion.cache import atomic_write, atomic_write_text, finite_json
from l2s.relations import Triplet, parse
from l2s.steering import SteerError as SteerError
from l2s.steering.loop import SteerStats, generate
from l2s.steering.losses import LossRequest, RelationLoss, losses, make_loss
from l2s.steering.losses import use_card_text_len as use_card_text_len
from l2s.steering.options import SteerOptions


class PromptError(L2SError, ValueError):
    """The prompt asks for something this backbone cannot draw or read."""


def check_prompt(denoiser: Denoiser, triplets: list[Triplet]) -> None:
    """A closed-vocabulary model must know every object the relations name."""
    if denoiser.known_objects is None:
        return
    for t in triplets:
        for name in (t.subject, t.object):
            if name not in denoiser.known_objects:
                raise PromptError(
                    f"{name!r} is not in the {denoiser.name} model's vocabulary: known objects "
                    f"are {', '.join(denoiser.known_objects)}; use --model sd2.1 for open "
                    "vocabulary")


def steer_methods() -> tuple[str, ...]:
    """``--method`` choices: every registered loss (``l2s.steering.losses``), plain, and
    best-of (plain candidates, the classifier picking one: ``l2s.steering.search``)."""
    return (*losses(), "plain", "best-of")


def build_loss(method: str, denoiser: Denoiser, model: str, classifier: str | None = None
               ) -> tuple[RelationLoss | None, str | None]:
    """(loss, where its weights came from: the classifier card) for a method; plain has no
    loss; best-of verifies with the l2s classifier's."""
    if method == "plain":
        return None, None
    if method == "best-of":
        method = "l2s"
    loss = make_loss(method, LossRequest(denoiser, model, classifier))
    return loss, loss.source


@dataclass(frozen=True)
class SteerConfig:
    """Settings of one `l2s steer` run; written into its report."""

    prompt: str  # the text prompt, relations included ("a circle to the left of a square")
    model: str = "toy"  # backbone preset, hub id or local folder
    image_size: int | None = None  # pixels a side (None: the model's default)
    # l2s (learned loss), centroid (hand-made baseline), plain, or best-of (plain candidates,
    # the classifier keeping the most probable one)
    method: str = "l2s"
    classifier: str | None = None  # classifier card (None: the model's default)
    # LoRA folder merged into the network (``l2s distill``; a preset name: its shipped LoRA)
    lora: str | None = None
    num_images: int = 1  # images generated in one batch, seeds seed..seed+n-1
    seed: int = 0  # noise seed of the first image
    options: SteerOptions = field(default_factory=SteerOptions)  # sampling and steering
    device: str | None = None  # cuda, cpu, ... (None: $L2S_DEVICE, else CUDA if any)
    dtype: str | None = None  # float16, bfloat16, float32 (None: fp16 on CUDA, else fp32)
    verify: bool = False  # generate plainly, check, steer only the images that fail
    candidates: int | None = None  # best-of: plain candidates per image (None: 4)
    # also generate the same seeds plainly: timed, saved (plain_<seed>.png), judged, and set
    # beside the steered images in compare.png
    compare_plain: bool = False
    save_attention: bool = False  # attention_<seed>.png: maps before/after, the image's curves
    out: str | None = None  # folder for PNGs and report.json (None: write nothing)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise PromptError(f'the prompt must be text such as "a circle to the left of a '
                              f'square", got {self.prompt!r}')
        if not self.prompt.strip():
            raise PromptError('the prompt is empty: give one such as "a circle to the left of '
                              'a square"')
        check_text("--model", self.model)
        check_choice("--method", self.method, steer_methods())
        check_text("--classifier", self.classifier, optional=True, path=True)
        check_text("--lora", self.lora, optional=True, path=True)
        check_integer("--num-images", self.num_images, 1, optional=False)
        check_integer("--image-size", self.image_size, 1)
        check_seeds("--seed", self.seed, self.num_images)
        if self.candidates is not None:
            from l2s.steering.search import check_candidates

            if self.method != "best-of":
                raise ConfigError(f"--candidates applies to --method best-of only (got --method "
                                  f"{self.method}): drop it, or use --method best-of")
            check_candidates("--candidates", self.candidates)
        if self.verify and self.method == "best-of":
            raise ConfigError("--verify and --method best-of both choose among plain images: "
                              "use one of them")
        if not isinstance(self.options, SteerOptions):
            raise ConfigError(f"options must be a SteerOptions, got {self.options!r}")
        check_text("--device", self.device, optional=True)
        check_text("--dtype", self.dtype, optional=True)
        check_text("--out", self.out, optional=True, path=True)
        expand_home(self, "out")
        for name in ("verify", "compare_plain", "save_attention"):
            check_flag(f"--{name.replace('_', '-')}", getattr(self, name))

    def to_json(self) -> dict:
        """The config as flat {option: value} (the steering options beside the others): the
        "settings" keys of report.json."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        return {**d, **self.options.to_json()}


def unused_options(methods: Sequence[str], options: SteerOptions, classifier: str | None,
                   model: str) -> list[str]:
    """Warnings for options set that none of ``methods`` reads: plain generation does not
    steer (every steering option but --steps and --guidance, unless at the model's default,
    as a written config.yaml holds some), plain and centroid load no classifier (was: ignored
    without a word)."""
    unused, defaults = [], steer_defaults(model)
    if all(m == "plain" for m in methods):
        unused = [f"--{f.name.replace('_', '-')}" for f in fields(SteerOptions)
                  if f.name not in ("steps", "guidance")
                  and getattr(options, f.name) not in (f.default,
                                                       getattr(defaults, f.name, f.default))]
    if classifier is not None and all(m in ("plain", "centroid") for m in methods):
        unused.append("--classifier")
    if not unused:
        return []
    return [f"--method {' and '.join(dict.fromkeys(methods))} does not use "
            f"{', '.join(unused)}: those options were ignored (they apply to steered methods, "
            "--classifier to l2s)"]


def prompt_warnings(triplets: list[Triplet]) -> list[str]:
    """What the user should know about a prompt that parses but may not steer as meant."""
    return [f"{t} names {t.subject!r} twice: both maps come from the same word, so the "
            "relation may be met by a single object; use two different objects"
            for t in triplets if t.subject == t.object]


def relation_achieved(denoiser: Denoiser, images: np.ndarray, triplets: list[Triplet],
                      stats: SteerStats, method: str = "l2s",
                      held: list[bool | None] | None = None) -> dict | None:
    """Whether the images show the prompt's relations: judged by the backbone's world
    (``Denoiser.world``: the toy's detector with GenEval's position rule) when it draws one,
    else by ``held`` when given (per image, the loss's verdict at the last steered step), else
    by the steering loss's last p(target) (the classifier's probability for l2s, the share of
    images whose attention centroids are in order for centroid; mean over the images still
    steered at the last steered step). None when there is nothing to judge by."""
    if not triplets:
        return None
    world = denoiser.world
    if world is not None:  # a closed world: its judge can tell
        per_image = world.judge(images, [triplets] * len(images))
        return {"by": world.judged_by or f"{world.name} world", "per_image": per_image,
                "count": sum(per_image), "of": len(per_image)}
    if held is not None:
        by = {"l2s": "the classifier"}.get(method, f"the {method} loss")
        return {"by": f"{by}: its loss at the last steered step under the threshold",
                "per_image": held, "count": sum(bool(h) for h in held), "of": len(held)}
    last = next((r.p_target for r in reversed(stats.steps) if r.p_target is not None), None)
    by = {"l2s": "the classifier's final p(target)",
          "centroid": "share of images whose attention centroids are in order"}.get(method)
    return None if last is None or by is None else {"by": by, "p_target": round(last, 4)}


def _steered_held(stats: SteerStats, n: int, passed_plain: list[bool] | None
                  ) -> list[bool | None]:
    """Per image of the batch, the loss's verdict at its last steered step (None: never
    steered); with --verify, images that passed plainly pass and the others are the steered
    batch's images in order."""
    if passed_plain is None:
        return [stats.held.get(i) for i in range(n)]
    redo = iter(range(n))
    return [True if ok else stats.held.get(next(redo)) for ok in passed_plain]


def _plain_pass(denoiser: Denoiser, prompts: list[str], triplets: list[Triplet],
                latents, settings, loss: RelationLoss | None, clock: Clock
                ) -> tuple[float, np.ndarray, list[bool] | None]:
    """(milliseconds, images, the loss's verdicts or None) of plain generation from the same
    latents: without a world to judge the images, the loss judges them at the last steered
    step (one gradient-free forward, whose time is not counted)."""
    from l2s.engine.sampling import sample

    probe = None
    if denoiser.world is None and loss is not None and triplets:
        from l2s.steering.verify import classifier_probe

        probe = classifier_probe(denoiser, prompts, [triplets] * len(prompts), loss, settings)
    spent = [0.0]

    def judged(state):  # the probe's time is the verdict's, not plain generation's
        ms, out = clock.timed_call(lambda: probe(state))
        spent[0] += ms
        return out

    ms, images = clock.timed_call(lambda: sample(
        denoiser, prompts, steps=settings.steps, guidance=settings.guidance, latents=latents,
        callback=judged if probe is not None else None))
    return ms - spent[0], to_uint8(images), None if probe is None else probe.passed


def compare_grid(prompt: str, seeds: list[int], plain: np.ndarray, steered: np.ndarray,
                 achieved: tuple[dict | None, dict | None], method: str, path: Path) -> Path:
    """One labelled PNG: the prompt, the plain row over the steered row (a column per seed),
    each image with its verdict."""
    from l2s.grids import Cell, grid

    def row(images, a):
        verdicts = a["per_image"] if a and "per_image" in a else [None] * len(images)
        return [Cell(img, (), v) for img, v in zip(images, verdicts, strict=True)]

    judge = next((a["by"] for a in achieved if a), "not judged")
    return grid([row(plain, achieved[0]), row(steered, achieved[1])], path,
                title=f'"{prompt}": plain vs {method} (judged by {judge})',
                row_labels=["plain", method], col_labels=[f"seed {s}" for s in seeds],
                label_width=70, verdict_words=("achieved", "missed"))


@dataclass
class SteerResult:
    """The images (PIL, as diffusers pipelines return them; ``pixels``: one uint8 array),
    the JSON report, and the files written."""

    pixels: np.ndarray  # (N, H, W, 3) uint8
    report: dict
    out: Path | None = None
    paths: list[Path] = field(default_factory=list)

    @property
    def images(self) -> list:
        """The images as PIL RGB images, in seed order (``pixels`` holds them as an array)."""
        from PIL import Image

        return [Image.fromarray(p) for p in self.pixels]


def unique_dir(path: str | Path) -> Path:
    """`path` if it does not exist yet, else the first free `path-1`, `path-2`, ..."""
    p, n = Path(path), 1
    while p.exists() and (not p.is_dir() or any(p.iterdir())):
        p, n = Path(f"{path}-{n}"), n + 1
    return p


def steer(config: SteerConfig, denoiser: Denoiser | None = None, on_step=None) -> SteerResult:
    """Run `l2s steer`: generate ``num_images`` images for the prompt and report per step."""
    check_config("steer", config, SteerConfig)
    triplets = parse(config.prompt)
    if config.out:  # before any work: a run whose images cannot be saved is lost
        check_writable_dir(config.out)
    settings = config.options.resolve(config.model)
    if denoiser is None:
        from l2s.engine.loading import load_backbone

        denoiser = load_backbone(config.model, device=config.device, dtype=config.dtype,
                                 image_size=config.image_size)
    if config.lora is not None:
        from l2s.distill.lora import resolve_lora, with_lora

        denoiser = with_lora(denoiser, resolve_lora(config.lora, config.model))
    check_prompt(denoiser, triplets)
    steerable = [t for t in triplets if t.steerable]
    method = config.method if steerable else "plain"
    loss, card = build_loss(method, denoiser, config.model, config.classifier)
    notice = None if steerable else "no steerable relation in the prompt: plain generation"
    seeds = [config.seed + i for i in range(config.num_images)]
    latents = seeded_latents(denoiser, seeds)
    prompts = [config.prompt] * len(seeds)
    clock = Clock(denoiser.device)

    def run():
        if method == "best-of":
            from l2s.steering.search import DEFAULT_CANDIDATES, best_of

            return best_of(denoiser, prompts, [steerable] * len(seeds), seeds,
                           config.candidates or DEFAULT_CANDIDATES, settings, loss)
        if config.verify and loss is not None:
            from l2s.steering.verify import generate_verified

            return generate_verified(denoiser, prompts, [steerable] * len(seeds), latents,
                                     settings, loss, keep_maps=config.save_attention)
        return generate(denoiser, prompts, [steerable] * len(seeds), latents, settings, loss,
                        on_step, keep_maps=config.save_attention)

    total_ms, ran = clock.timed_call(run)
    total = total_ms / 1000
    verified = ran if config.verify and loss is not None else None
    search = ran if method == "best-of" else None
    if search is not None:
        images, stats = search.images, SteerStats()
    else:
        images, stats = (verified.images, verified.stats) if verified is not None else ran
    # the run as used: the model's defaults (steering options, image size) and best-of's
    # candidate count as their values; config.yaml and report.json's "settings" hold them
    h, w = denoiser.image_size
    used = replace(config, options=config.options.with_all_model_defaults(config.model),
                   image_size=config.image_size or (h if h == w else None))
    if config.method == "best-of" and config.candidates is None:
        from l2s.steering.search import DEFAULT_CANDIDATES

        used = replace(used, candidates=DEFAULT_CANDIDATES)
    report = {
        "prompt": config.prompt,
        "triplets": [{"subject": t.subject, "relation": t.relation, "object": t.object,
                      "steerable": t.steerable} for t in triplets],
        "method": method,
        "classifier": card,
        "settings": {**used.to_json(), **asdict(settings)},
        "image_size": list(denoiser.image_size),  # (H, W) pixels generated
        "text_len": denoiser.text_len,  # text tokens prompts were encoded as (the maps' keys)
        "seeds": seeds,
        "notice": notice,
        "steps": [r.to_json() for r in stats.steps],
        "skipped_updates": stats.skipped_updates,
        "warnings": (prompt_warnings(triplets) + stats.warnings
                     + unused_options([config.method], config.options, config.classifier,
                                    config.model)),
        "total_s": round(total, 4),
        "peak_memory_mb": round(peak_memory_mb(denoiser.device), 1),
    }
    if verified is not None:
        report["verify"] = verified.to_json()
    if search is not None:  # per image: the candidates' seeds, verifier p, the kept one
        report["best_of"] = [search.image_json(i) for i in range(len(seeds))]
    arr = to_uint8(images)
    plain = None
    if config.compare_plain:
        plain_ms, plain, plain_held = _plain_pass(denoiser, prompts, steerable, latents,
                                                  settings, loss, clock)
        report["plain_s"] = round(plain_ms / 1000, 4)
        report["overhead"] = round(total / max(report["plain_s"], 1e-9), 3)
        report["achieved_plain"] = relation_achieved(denoiser, plain, steerable, SteerStats(),
                                                     method, plain_held)
        held = None if plain_held is None else \
            _steered_held(stats, len(seeds), None if verified is None else verified.passed_plain)
        report["achieved"] = relation_achieved(denoiser, arr, steerable, stats, method, held)
    else:
        report["achieved"] = relation_achieved(denoiser, arr, steerable, stats, method)
    result = SteerResult(arr, report)
    if config.out:
        from PIL import Image

        out = unique_dir(config.out)
        out.mkdir(parents=True, exist_ok=True)
        for s, img in zip(seeds, arr, strict=True):
            result.paths.append(out / f"image_{s:04d}.png")
            atomic_write(result.paths[-1],  # never a 0-byte PNG on a full disk
                         lambda tmp, img=img: Image.fromarray(img).save(tmp, format="PNG"))
        report["images"] = [str(p) for p in result.paths]
        if plain is not None:  # --compare-plain: the plain images beside them, and the grid
            report["plain_images"] = []
            for s, img in zip(seeds, plain, strict=True):
                report["plain_images"].append(str(out / f"plain_{s:04d}.png"))
                atomic_write(Path(report["plain_images"][-1]),
                             lambda tmp, img=img: Image.fromarray(img).save(tmp, format="PNG"))
            report["compare_grid"] = str(compare_grid(
                config.prompt, seeds, plain, arr, (report["achieved_plain"], report["achieved"]),
                method, out / "compare.png"))
        if config.save_attention and stats.attention:
            from l2s.steering.plots import attention_figure, image_curves

            first = steerable[0]
            # the steered images, in the order of the steered batch (--verify: only the
            # failing ones); a step's maps hold the images it steered, in its curves' order
            steered = range(len(seeds)) if verified is None else \
                [i for i, ok in enumerate(verified.passed_plain) if not ok]
            report["attention_figures"] = [str(attention_figure(
                arr[i], [(s, before[images.index(b)], after[images.index(b)])
                         for (s, before, after), (_, images, *_) in zip(
                             stats.attention, stats.curves, strict=True) if b in images],
                image_curves(stats.curves, b), (first.subject, first.object),
                out / f"attention_{seeds[i]:04d}.png",
                title=f'seed {seeds[i]}: "{config.prompt}", {method}; maps of {first}'))
                for b, i in enumerate(steered)]
        report["out"] = str(out)
        atomic_write_text(out / "report.json", json.dumps(finite_json(report), indent=2))
        # the run in `l2s steer`'s option names, the model's defaults written as the values
        # used: `l2s steer --config out/config.yaml` repeats it
        dump_yaml(option_values(used), out / CONFIG_FILE)
        result.out = out
    return result

