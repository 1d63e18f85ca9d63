"""The benchmark job: generate every (prompt, image) per method on the same seeds, score each
image as it comes, resume after a kill, shard across processes, summarise and compare."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from itertools import zip_longest
from pathlib import Path

import numpy as np
import torch

from l2s.bench import store
from l2s.bench.detectors import (
    COLOR_MODEL,
    Detector,
    detector_notes,
    load_detector,
)
from l2s.bench.methods import Generated, MethodContext, check_method, method_factory
from l2s.bench.scoring import ColorClassifier, score_image
from l2s.bench.sheets import disagreement_sheet, method_sheets
from l2s.bench.stats import paired_difference, summarise, verifier_summary
from l2s.bench.suites import (
    DEFAULT_DETECTORS,
    BenchError,
    BenchPrompt,
    get_suite,
    suite_names,
    suite_prompts,
)
from l2s.config import (
    CONFIG_FILE,
    ConfigError,
    check_choice,
    check_config,
    check_integer,
    check_seeds,
    check_text,
    dump_yaml,
    expand_home,
    is_whole,
    option_values,
)
from l2s.engine.backbone import Denoiser
from l2s.engine.registry import World, get_preset, presets, world_of
from l2s.engine.sampling import to_uint8
from l2s.launcher import format_shard, resolve_shard
from l2s.steering.options import SteerOptions


@dataclass(frozen=True)
class BenchConfig:
    """Everything that decides a benchmark's results; written next to them as config.json."""

    suite: str = "shapes"  # prompt suite, one of l2s.bench.suites.SUITES
    model: str = "toy"  # backbone preset, hub id or folder
    image_size: int | None = None  # pixels a side (None: the model's default)
    methods: tuple[str, ...] = ("plain",)  # generation methods to compare on the same seeds
    prompts: int | None = None  # first N prompts (None: all of a fixed suite, 200 generated)
    num_images: int | None = None  # images per prompt (None: the suite's, Suite.images)
    seed: int = 0  # picks generated prompt sets and every image's noise seed
    # Sampling and steering (steered methods). config.json and config.yaml hold every model
    # default resolved (``resolved_config``; a folder an older l2s began keeps its nulls).
    options: SteerOptions = field(default_factory=SteerOptions)
    classifier: str | None = None  # l2s: classifier card (None: the model's default)
    lora: str | None = None  # plain+lora, l2s+lora: LoRA folder (None: the model's shipped one)
    detector: str | None = None  # "toy", alias, hub id or folder (None: the suite's default)
    color_model: str = COLOR_MODEL  # CLIP for GenEval's colour tasks
    batch_size: int = 100  # images generated in one batch
    # (i, n): this process does prompts i, i+n, ... (None: the launcher's RANK / WORLD_SIZE
    # under accelerate launch or torchrun, else every prompt)
    shard: tuple[int, int] | None = None
    device: str | None = None  # cuda, cpu, ... (None: $L2S_DEVICE, else CUDA if any)
    dtype: str | None = None  # float16, bfloat16, float32 (None: fp16 on CUDA, else fp32)
    # folder for config.json, results, images and contact sheets (None: out/bench-SUITE-MODEL,
    # as the CLI)
    out: str | None = None

    def __post_init__(self) -> None:
        check_choice("--suite", self.suite, suite_names(), BenchError)
        check_text("--model", self.model)
        check_integer("--image-size", self.image_size, 1)
        if isinstance(self.methods, str) or not self.methods:
            raise ConfigError(f"--method: give a tuple of methods such as ('plain', 'l2s'), "
                              f"got {self.methods!r}")
        for m in self.methods:
            if not isinstance(m, str):  # was: AttributeError from check_method
                raise ConfigError(f"--method takes names such as 'plain' or 'best-of:8', got "
                                  f"{m!r} in {self.methods!r}")
            check_method(m, BenchError)
        # image seeds are seed * 10^7 + prompt * 1000 + image: 10000 prompts of at most 1000
        # images keep every image's seed its own
        check_integer("--prompts", self.prompts, 1, high=10000)
        check_integer("--num-images", self.num_images, 1, high=1000)
        check_seeds("--seed", self.seed)
        check_seeds("--seed", self.seed, last=image_seed(self.seed, 9999, 999))
        if not isinstance(self.options, SteerOptions):
            raise ConfigError(f"options must be a SteerOptions, got {self.options!r}")
        check_text("--color-model", self.color_model)
        for name in ("classifier", "lora", "detector", "out"):
            check_text(f"--{name}", getattr(self, name), optional=True, path=True)
        for name in ("device", "dtype"):
            check_text(f"--{name}", getattr(self, name), optional=True)
        check_integer("--batch-size", self.batch_size, 1, optional=False)
        if self.shard is not None:
            if (not isinstance(self.shard, tuple | list) or len(self.shard) != 2
                    or not all(is_whole(v) for v in self.shard)
                    or not 0 <= self.shard[0] < self.shard[1]):
                raise BenchError(f"--shard {self.shard!r}: use I/N with 0 <= I < N, e.g. 0/4")
        expand_home(self, "out")
        if self.out is None:
            object.__setattr__(self, "out", f"out/bench-{self.suite}-"
                                            f"{self.model.replace('/', '_')}")

    def to_json(self) -> dict:
        """The config as config.json holds it: flat, the steering options beside the others,
        the image count under its first name ("images")."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        d["images"] = d.pop("num_images")
        return {**d, **self.options.to_json()}

    def identity(self) -> dict:
        """The fields a resumed run (or another shard) must share with the run it continues."""
        ident = {k: v for k, v in self.to_json().items()
                 if k not in ("methods", "prompts", "batch_size", "compile", "shard", "device",
                              "out")}
        if ident.get("lora") is None:  # what runs before the field generated
            ident.pop("lora", None)
        if ident["relation_schedule"] == "round-robin":  # what runs before the field steered
            del ident["relation_schedule"]
        return ident

    @property
    def detector_name(self) -> str:
        return self.detector or DEFAULT_DETECTORS[self.suite]


# The fields None stands for "the model's default" in: the model-default steering options and
# the image size (what an older l2s wrote into config.json as null)
MODEL_DEFAULT_KEYS = frozenset({"image_size"} | {f.name for f in fields(SteerOptions)
                                                  if f.metadata["model_default"]})


def resolved_config(cfg: BenchConfig) -> BenchConfig:
    """``cfg`` with each "model default" (None) as the value it stands for: the model's
    sampling and steering defaults (``SteerOptions.with_all_model_defaults``) and a preset's
    image size (a hub id or folder no preset names keeps None: the size its own configs give).
    What config.json and config.yaml hold, so `--config OUT/config.yaml` repeats the run
    whatever l2s's defaults become; generation itself runs on ``cfg`` as given."""
    preset = get_preset(cfg.model)
    size = cfg.image_size if cfg.image_size is not None or preset is None else \
        preset.image_size
    return replace(cfg, options=cfg.options.with_all_model_defaults(cfg.model),
                   image_size=size)


@dataclass
class BenchResult:
    """Summary per method (the `--json` document) and where the files are."""

    suite: str
    methods: dict[str, dict]  # name -> summarise() + (cpu_)seconds(_vs_plain), vs_plain
    out: Path
    detector: str = "toy"
    warnings: list[str] = field(default_factory=list)
    complete: bool = True  # every shard's images are scored
    notes: list[str] = field(default_factory=list)  # how the scoring departs from the original
    plot: Path | None = None  # frontier.png: position accuracy against seconds per image
    # method -> its images in the suite's original harness layout (T2I-CompBench: --outpath)
    exports: dict[str, Path] = field(default_factory=dict)

    @property
    def seconds(self) -> dict[str, float]:
        return {m: s.get("seconds", 0.0) for m, s in self.methods.items()}

    def to_json(self) -> dict:
        return {"suite": self.suite, "detector": self.detector, "methods": self.methods,
                "warnings": self.warnings, "complete": self.complete, "notes": self.notes,
                "plot": None if self.plot is None else str(self.plot),
                "exports": {m: str(p) for m, p in self.exports.items()}}


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The noise seed of one image: the same for every method, batch size, shard and resume."""
    return seed * 10_000_000 + prompt_index * 1000 + image_index


def _check(cfg: BenchConfig, denoiser: Denoiser | object) -> None:
    world = world_of(cfg.model, denoiser)
    if world is not None and cfg.suite not in world.suites:
        raise BenchError(f"--suite {cfg.suite} needs a model that can draw its objects; "
                         f"{cfg.model} only draws {world.description or ', '.join(world.objects)}"
                         f" (the {world.name} world): use --suite "
                         f"{' or '.join(world.suites) or '...'} with it, or --model sd2.1 "
                         "(or another open-vocabulary model)")
    # A world's detector reads only that world's objects: refused on other suites.
    worlds = {p.world.detector: p.world for p in presets().values()
              if p.world is not None and p.world.detector}
    default = DEFAULT_DETECTORS[cfg.suite]
    if cfg.detector in worlds and default != cfg.detector:
        w = worlds[cfg.detector]
        raise BenchError(
            f"--detector {cfg.detector} does not fit --suite {cfg.suite}: the {cfg.detector} "
            f"detector reads only the {w.name} world's {w.description or 'objects'} (suites "
            f"{', '.join(w.suites)}); leave --detector out (the suite's default, {default}) or "
            "pass a COCO / open-vocabulary detector")


def run_bench(cfg: BenchConfig, denoiser: Denoiser | None = None,
              detector: Detector | None = None, colors: ColorClassifier | None = None,
              callback: Callable[[dict], None] | None = None) -> BenchResult:
    """Generate and score every (prompt, image) of the suite for each method; resumable.

    Finished images are never recomputed; ``callback`` receives {"method", "done", "total"}
    after each scored image. ``detector``/``colors`` override the configured ones (tests).
    """
    check_config("benchmark", cfg, BenchConfig)
    from l2s.steering.job import unused_options

    _check(cfg, denoiser)
    ignored = unused_options(cfg.methods, cfg.options, cfg.classifier, cfg.model)
    cfg = replace(cfg, num_images=cfg.num_images or get_suite(cfg.suite).images,
                  detector=cfg.detector_name,
                  shard=resolve_shard(cfg.shard),  # None: the launcher's rank, if any
                  options=cfg.options.with_model_defaults(cfg.model, "iterations",
                                                          "relation_schedule"))
    out = Path(cfg.out)
    # one process per shard of a folder: two would generate and score every image twice
    with store.holding(out, cfg.shard):
        res = _run(cfg, out, denoiser, detector, colors, callback)
    res.warnings += ignored
    return res


def _run(cfg: BenchConfig, out: Path, denoiser: Denoiser | None, detector: Detector | None,
         colors: ColorClassifier | None, callback: Callable[[dict], None] | None
         ) -> BenchResult:
    prompts = suite_prompts(cfg.suite, cfg.prompts, cfg.seed)
    mine = prompts if cfg.shard is None else prompts[cfg.shard[0]::cfg.shard[1]]
    lazy = _Lazy(cfg, denoiser, detector, colors)
    records = store.read_records(out)
    # a folder with no result yet (a run that stopped before its first image, e.g. out of
    # memory) takes the new settings; one with results keeps its own
    started = bool(records) or store.has_images(out)
    # the settings as used, and as this folder holds them: null where an older l2s's run in
    # it wrote "the model's default" as null and this run uses that default
    written = resolved_config(cfg)
    nulls = _older_nulls(out, cfg, written.identity(), records) if started else set()
    identity = {**written.identity(), **dict.fromkeys(nulls)}
    store.check_config(out, identity, started)
    # every record names the settings it was made with: records of other settings are
    # refused even when config.json, which would have said so, is gone
    settings = store.settings_digest(identity)
    sampling = cfg.options.with_model_defaults(cfg.model, "steps", "guidance")
    made = {"settings": settings, "steps": sampling.steps, "guidance": sampling.guidance}
    # (a record whose digest is of these settings with no null left is this run's too: a
    # folder whose config.json lacks fields bench gained since may hold both kinds)
    store.check_records(out, records, made, config_checked=(out / "config.json").exists(),
                        also={store.settings_digest(written.identity())})
    jobs = [(p, k) for p in mine for k in range(cfg.num_images)]
    records = _drop_lost_images(out, records, {(m, p.index, k) for m in cfg.methods
                                               for p, k in jobs})
    done = {(r["method"], r["prompt_index"], r["image_index"]) for r in records}
    left = {p.index: p for m in cfg.methods for p, k in jobs if (m, p.index, k) not in done}
    # Work left per method: images to generate, and images saved but unscored (a kill between
    # the two), which are scored, not regenerated.
    todo, saved, fresh = {}, {}, {}
    for m in cfg.methods:
        todo[m] = [(p, k) for p, k in jobs if (m, p.index, k) not in done]
        saved[m] = [(p, k) for p, k in todo[m] if _saved(store.image_path(out, m, p.index, k))]
        on_disk = {(p.index, k) for p, k in saved[m]}
        fresh[m] = [(p, k) for p, k in todo[m] if (p.index, k) not in on_disk]
    # What cannot load fails here, before any generation and before config.json pins the
    # settings of --out (a rerun with the mistake fixed is then not refused as "other
    # settings"): the detector, the colour model of a suite with colour clauses, the backbone
    # and each method's loss (its classifier). A finished run loads none of them.
    # Every method that has images to generate is set up before the first generation: setting
    # up l2s may set the backbone's text length from its classifier's card
    # (``use_card_text_len``), and every method must then encode its prompts alike (same
    # seeds, same conditioning).
    if left and detector is None:
        _ = lazy.detector
    if colors is None and any("color" in r for p in left.values()
                              for r in p.metadata.get("include", [])):
        lazy.colors()
    generators = {m: lazy.method(m) for m in cfg.methods if fresh[m]}
    # the classifier (steering, or best-of's verifier) and LoRA each method uses: a resume
    # must use the ones its images were made with (another default classifier or LoRA may
    # have been installed since), also for images saved but not scored
    cards = {m: _made_with(g) for m, g in generators.items()}
    pending = {m: [store.made_with(store.image_text(store.image_path(out, m, p.index, k)))
                   for p, k in saved[m]] for m in cfg.methods}
    _check_cards(out, records, cards, pending)
    store.write_config(out, {**written.to_json(), **dict.fromkeys(nulls)}, identity, started)
    # the run in `l2s bench`'s option names, the model's defaults written as the values used:
    # `l2s bench --config out/config.yaml` repeats it whatever the defaults become
    dump_yaml({**option_values(written, {"methods": "method"}),
               "shard": format_shard(cfg.shard)}, out / CONFIG_FILE)
    results = out / store.results_name(cfg.shard)
    counts, queues = {}, {}

    def provenance(method: str) -> dict:
        """What makes this run's images of ``method``, for their records and PNGs: the text
        length prompts are encoded as, the classifier and LoRA it uses."""
        text_len = getattr(lazy.denoiser, "text_len", None)
        return {**({"text_len": text_len} if text_len is not None else {}),
                **(cards.get(method) or {})}

    def scored(method: str, p: BenchPrompt, k: int, seconds: tuple[float, float],
               img: np.ndarray, generated: bool = False, extra: dict | None = None
               ) -> None:
        """Score one image, append its record (with the settings it was made with and, when
        it was generated here, the text length its prompt was encoded as, the classifier it
        was steered with and the method's own fields), count it and report progress."""
        rec = {**_record(method, p, k, cfg, seconds, img, lazy), **made}
        if generated:
            rec.update(provenance(method))
        rec.update(extra or {})  # a saved image's: what its PNG says made it
        store.append_record(results, rec)
        records.append(rec)
        counts[method] += 1
        if callback:
            callback({"method": method, "done": counts[method], "total": len(jobs)})

    for method in cfg.methods:
        counts[method] = len(jobs) - len(todo[method])
        if callback:
            callback({"method": method, "done": counts[method], "total": len(jobs)})
        for p in mine:  # every prompt's: GenEval reads them, a damaged one is written again
            store.write_metadata(out, method, p.index, p.metadata)
        for p, k in saved[method]:
            img, text = store.load_image(store.image_path(out, method, p.index, k))
            seconds = (float(text.get("l2s-seconds", "nan")),
                       float(text.get("l2s-cpu-seconds", "nan")))
            scored(method, p, k, seconds, img, extra=store.made_with(text))
        # Batches never mix tasks more than the order of the suite does.
        queues[method] = [fresh[method][i:i + cfg.batch_size]
                          for i in range(0, len(fresh[method]), cfg.batch_size)]
    # The methods take turns batch by batch, so a machine that gets busier or quieter during
    # the run slows them alike and seconds_vs_plain stays a side-by-side ratio. cpu_seconds
    # (this process's CPU time) is the fairer ratio for a one-thread CPU run on a shared
    # machine; on a GPU it counts host time only.
    for turn in zip_longest(*queues.values()):
        for method, batch in zip(queues, turn, strict=True):
            if batch is None:
                continue
            seeds = [image_seed(cfg.seed, p.index, k) for p, k in batch]
            t0, c0 = time.perf_counter(), time.process_time()
            output = generators[method]([p for p, _ in batch], seeds)
            imgs = to_uint8(output.images if isinstance(output, Generated) else output)
            each = (time.perf_counter() - t0) / len(batch)
            each_cpu = (time.process_time() - c0) / len(batch)
            extras = _extras(output, [p for p, _ in batch], lazy)  # after the timing
            for (p, k), s, img in zip(batch, seeds, imgs, strict=True):
                store.save_image(store.image_path(out, method, p.index, k), img, s, each,
                                 each_cpu, made_with=provenance(method))
            for (p, k), img, extra in zip(batch, imgs, extras, strict=True):
                scored(method, p, k, (each, each_cpu), img, generated=True, extra=extra)
    return summarise_run(cfg, prompts, records, out)


def _older_nulls(out: Path, cfg: BenchConfig, identity: dict, records: list[dict]
                 ) -> set[str]:
    """The model-default keys (``MODEL_DEFAULT_KEYS``) the run in ``out``, begun by an older
    l2s, holds as null ("the model's default") where this run (``identity``: resolved) uses
    that default: config.json's nulls; config.json gone, the keys this command leaves to the
    model when the records' settings digest is the one they make. Those keys stay null in
    config.json and in the records' digest, so that run resumes from its own command and
    from `--config` of the config.yaml written now (which holds the values)."""
    defaults = resolved_config(replace(cfg, options=SteerOptions(), image_size=None)).identity()
    usual = {k for k in MODEL_DEFAULT_KEYS
             if identity.get(k) is not None and identity.get(k) == defaults.get(k)}
    path = out / "config.json"
    if path.exists():
        try:
            old = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return set()  # damaged: store.check_config refuses it
        return {k for k in usual if old.get(k) is None} if isinstance(old, dict) else set()
    given = {k for k in usual if cfg.identity().get(k) is None}
    digest = store.settings_digest({**identity, **dict.fromkeys(given)})
    return given if given and any(r.get("settings") == digest for r in records) else set()


def _made_with(generate) -> dict | None:
    """What a method's generator is made with, for its records: {"classifier": card path,
    "classifier_sha256": a fingerprint of the card and its weights} of the card it steers or
    verifies with, {"lora": folder, "lora_sha256": its weights' sha256} of the LoRA it merges;
    None for a method with neither."""
    made = {**(_card(getattr(generate, "classifier", None)) or {}),
            **(_lora(getattr(generate, "lora", None)) or {})}
    return made or None


def _card(source: str | None) -> dict | None:
    """{"classifier": card path, "classifier_sha256": a fingerprint of the card and its
    weights} of the card a method steers with; None for a method without one."""
    if source is None:
        return None
    from l2s.classifier.model import card_sha256, read_card

    return {"classifier": str(read_card(source)[0]), "classifier_sha256": card_sha256(source)}


def _lora(folder: str | None) -> dict | None:
    """{"lora": folder, "lora_sha256": the sha256 of its weights} of the LoRA a method merges;
    None for a method without one."""
    if folder is None:
        return None
    from l2s.classifier.model import sha256_file
    from l2s.distill.lora import WEIGHTS_FILE

    return {"lora": str(folder), "lora_sha256": sha256_file(Path(folder) / WEIGHTS_FILE)}


# (the fingerprint, what it names, the option that chooses it) of what a record is made with
_MADE_WITH = (("classifier_sha256", "classifier", "--classifier"), ("lora_sha256", "LoRA",
                                                                   "--lora"))


def _check_cards(out: Path, records: list[dict], cards: dict[str, dict | None],
                 pending: dict[str, list[dict]] | None = None) -> None:
    """Refuse a run whose method would use another classifier or LoRA than the images of that
    method already in ``out`` were made with: the scored ones (``records``), those saved but
    not scored (``pending``: what their PNGs say), and this run's (``cards``)."""
    pending = pending or {}
    for method in sorted({*cards, *pending}):
        card = cards.get(method) or {}
        before = [r for r in records if r["method"] == method] + pending.get(method, [])
        for key, what, option in _MADE_WITH:
            name = key.removesuffix("_sha256")
            old = sorted({(str(r.get(name)), r[key]) for r in before if r.get(key)})
            now = card.get(key)
            other = [(p, h) for p, h in old if h != (now or old[0][1])]
            if not other:
                continue
            was = f"{other[0][0]} (sha256 {other[0][1][:12]})"
            if now:
                raise BenchError(
                    f"{out}: the {method} images already there were made with the {what} "
                    f"{was}, this run uses {card[name]} (sha256 {now[:12]}): one run uses one "
                    f"{what}; pass {option} {other[0][0]} (or that {what} back in place), "
                    "another --out, or delete that folder to start over")
            raise BenchError(
                f"{out}: the {method} images already there were made with two {what}s, "
                f"{old[0][0]} (sha256 {old[0][1][:12]}) and {was}: one run uses one {what}; "
                "pass another --out, or delete that folder to start over")


def _extras(output, prompts: list[BenchPrompt], lazy: _Lazy) -> list[dict]:
    """Per image, the fields a method's ``Generated`` adds to its record, with every
    candidate's verdict under the suite's checker ("candidates_correct")."""
    if not isinstance(output, Generated):
        return [{} for _ in prompts]
    extras = [dict(r) for r in output.records]
    if output.candidates is not None:
        for extra, p, cands in zip(extras, prompts, output.candidates, strict=True):
            extra["candidates_correct"] = lazy.check(cands, [p] * len(cands))
    return extras


def _saved(path: Path) -> bool:
    """Whether an image is saved whole; a damaged one is deleted, to be generated again."""
    if not path.exists():
        return False
    if store.image_readable(path):
        return True
    path.unlink()
    return False


def _drop_lost_images(out: Path, records: list[dict],
                      mine: set[tuple[str, int, int]]) -> list[dict]:
    """The records whose image is still whole; this run's images deleted or damaged since
    they were scored lose their records (and the damaged file), so they are generated and
    scored again instead of failing every rerun."""
    lost = {(r["method"], r["prompt_index"], r["image_index"]) for r in records
            if (r["method"], r["prompt_index"], r["image_index"]) in mine
            and not _saved(out / r["filename"])}
    if not lost:
        return records
    store.drop_records(out, lost)
    return [r for r in records if (r["method"], r["prompt_index"], r["image_index"]) not in lost]


class _Lazy:
    """Loads the backbone, detector and colour model on first use (a finished run needs none)."""

    def __init__(self, cfg, denoiser, detector, colors):
        self.cfg, self._denoiser, self._detector, self._colors = cfg, denoiser, detector, colors

    @property
    def denoiser(self) -> Denoiser:
        if self._denoiser is None:
            from l2s.engine.loading import load_backbone

            self._denoiser = load_backbone(self.cfg.model, device=self.cfg.device,
                                           dtype=self.cfg.dtype, image_size=self.cfg.image_size)
        return self._denoiser

    @property
    def detector(self) -> Detector:
        if self._detector is None:
            self._detector = load_detector(self.cfg.detector_name)
        return self._detector

    def colors(self) -> ColorClassifier:
        if self._colors is None:
            from l2s.bench.colors import ClipColors

            self._colors = ClipColors.load(self.cfg.color_model)
        return self._colors

    def method(self, name: str):
        return method_factory(name)(MethodContext(self.denoiser, self.cfg, self.check))

    def check(self, images: torch.Tensor, prompts: Sequence[BenchPrompt]) -> list[bool]:
        return [self.score(p, img)["correct"] for p, img in zip(prompts, to_uint8(images),
                                                                strict=True)]

    def classify(self, image: np.ndarray, detections, masks) -> list[str]:
        """The colour classifier, loaded when a detection first needs a colour (never when the
        detector gives colours itself)."""
        return self.colors()(image, detections, masks)

    @property
    def world(self) -> World | None:
        """The world the images are drawn in (its extras join each record)."""
        return world_of(self.cfg.model, self._denoiser)

    def score(self, prompt: BenchPrompt, image: np.ndarray) -> dict:
        return score_image(prompt, image, self.detector, self.classify, self.world)


def _record(method: str, p: BenchPrompt, k: int, cfg: BenchConfig,
            seconds: tuple[float, float], image: np.ndarray, lazy: _Lazy) -> dict:
    """GenEval's result fields (filename, tag, prompt, correct, reason, metadata, details) plus
    method, seed, indices, generation (wall, CPU) seconds and the suite's extras."""
    scored = lazy.score(p, image)
    return {"filename": str(store.image_path(Path(), method, p.index, k)),
            "tag": p.tag, "prompt": p.prompt, "correct": bool(scored.pop("correct")),
            "reason": scored.pop("reason"), "metadata": json.dumps(p.metadata),
            "details": scored.pop("details"), "method": method,
            "seed": image_seed(cfg.seed, p.index, k), "prompt_index": p.index,
            "image_index": k, "seconds": seconds[0], "cpu_seconds": seconds[1], **scored}


def summarise_run(cfg: BenchConfig, prompts: list[BenchPrompt], records: list[dict],
                  out: Path) -> BenchResult:
    """Per method over the whole suite (every shard's records): summary, generation seconds and
    their ratio to plain, paired difference to plain; contact sheets; detector health."""
    wanted = {p.index for p in prompts}
    by_method: dict[str, list[dict]] = {}
    for r in records:
        if r["prompt_index"] in wanted and r["image_index"] < cfg.num_images:
            by_method.setdefault(r["method"], {})[(r["prompt_index"], r["image_index"])] = r
    by_method = {m: sorted(v.values(), key=lambda r: (r["prompt_index"], r["image_index"]))
                 for m, v in by_method.items() if m in cfg.methods}
    expected = len(prompts) * cfg.num_images
    methods, warnings, exports = {}, [], {}
    export = get_suite(cfg.suite).export
    for name in cfg.methods:
        recs = by_method.get(name, [])
        s = summarise(recs)
        for key in ("seconds", "cpu_seconds"):  # records written before cpu_seconds: nan
            s[key] = float(np.nansum([r.get(key, np.nan) for r in recs]))
            s[f"{key}_per_image"] = s[key] / len(recs) if recs else None
        s.update(verifier_summary(recs))
        methods[name] = s
        empty = sum(r["n_detections"] == 0 for r in recs)
        if recs and empty > len(recs) / 2:
            warnings.append(
                f"DETECTOR HEALTH: {empty} of {len(recs)} {name} images have no detection above "
                f"the threshold of {cfg.detector_name}: check the detector weights and device "
                "before trusting these scores (the classic silent failure of these harnesses)")
        method_sheets(out, name, recs)
        if recs:
            store.write_method_results(out, name, recs)
            if export is not None:
                exports[name] = export(out, recs, cfg.num_images)
    disagreement_sheet(out, {m: by_method.get(m, []) for m in cfg.methods})
    lengths = sorted({r["text_len"] for recs in by_method.values() for r in recs
                      if r.get("text_len") is not None})
    if len(lengths) > 1:
        warnings.append(
            f"images of this run were generated from prompts encoded as {lengths} text tokens "
            "(a run resumed or extended with another classifier, whose card sets the length): "
            "methods are not compared on the same conditioning; use a fresh --out")
    if "plain" in methods:
        for name in cfg.methods:
            if name != "plain":
                for key in ("seconds", "cpu_seconds"):
                    plain_s = methods["plain"][key]
                    methods[name][f"{key}_vs_plain"] = (methods[name][key] / plain_s
                                                        if plain_s else None)
                methods[name]["vs_plain"] = paired_difference(by_method.get(name, []),
                                                              by_method.get("plain", []))
    complete = all(len(by_method.get(m, [])) == expected for m in cfg.methods)
    from l2s.bench.frontier import frontier_plot

    plot = frontier_plot(methods, out / "frontier.png",
                         title=f"{cfg.suite} on {cfg.model}, {len(prompts)} prompts")
    return BenchResult(cfg.suite, methods, out, cfg.detector_name, warnings, complete,
                       detector_notes(cfg.suite, cfg.detector_name), plot, exports)
