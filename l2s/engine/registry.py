"""The backbone-family registry: which families exist, their presets, and who loads what.

A family module (``l2s/families/<name>.py``) calls :func:`register_family` at import with its
:class:`Family` (a loader returning a ``Denoiser``) and its :class:`Preset` list. The registry
imports every module of the ``l2s.families`` package (and any module listed under the
``l2s.families`` entry-point group) on first use, so a new family is one new module and no
edit elsewhere; nothing else in the core imports a family. See docs/architecture.md,
"Adding a backbone family".

A family may attach a :class:`World` to its presets: the closed set of objects its models
draw and a judge of relations in their images (the toy's six shapes). Sources, detectors and
suites register themselves in a :class:`Registry` each, found the same way: the modules a
family imports (its world's) and those listed under the registry's entry-point group.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from l2s.engine.backbone import BackboneError, CrossAttnLayer, Denoiser
from l2s.engine.hub import pipeline_class
from l2s.engine.world import World

if TYPE_CHECKING:

    pass

# The package whose modules register the families shipped with l2s (every module in it is
# imported on first registry use; its LISTING_ORDER puts the first families first in listings).
BUILTIN_PACKAGE = "l2s.families"


def builtin_family_modules() -> list[str]:
    """The modules of the built-in family package, LISTING_ORDER's first, then by name."""
    package = importlib.import_module(BUILTIN_PACKAGE)
    found = sorted(m.name for m in pkgutil.iter_modules(package.__path__))
    first = [m for m in getattr(package, "LISTING_ORDER", ()) if m in found]
    return [f"{BUILTIN_PACKAGE}.{m}" for m in first + [m for m in found if m not in first]]


@dataclass(frozen=True)
class SteerDefaults:
    """A backbone's default sampling and steering settings: the one place they are written.

    A preset carries one; a hub id or folder no preset names gets its family's look-alike
    preset's (``Family.like_preset``: a Flux folder gets flux-dev's or flux-schnell's), else
    these (the paper's SD values). Every option left None (CLI flag, SteerConfig,
    BenchConfig, SpeedConfig field) means "the model's default" and is read here
    (``steer_defaults``).
    """

    steps: int = 50  # sampling steps
    guidance: float = 7.5  # guidance scale (CFG, or the embedded scale)
    step_size: float = 5.0  # steering step size (the paper: 7.5 for SD1.4, 5 for SD2.1)
    iterations: int = 16  # max gradient iterations per steered step (the paper)
    # Early-exit loss: None = the paper's schedule (1e-5 rising to 7e-5); a number = fixed.
    loss_threshold: float | None = None
    steer_from: int = 0  # first steered step (the paper: 0)
    steer_until: float = 0.5  # steer before this fraction (< 1) or step count (the paper: 0.5)
    optimizer: str = "sgd"  # latent update rule (the paper: sgd)
    # how several relations of one prompt share a step's iterations (l2s.steering.loop
    # RELATION_SCHEDULES; the paper: round robin)
    relation_schedule: str = "round-robin"


@dataclass(frozen=True)
class TrainDefaults:
    """A backbone's default relation-classifier training settings (`l2s train`)."""

    lr: float = 1e-4  # AdamW learning rate (L2S's for SD backbones)
    # (d_model, depth) of our classifier ("l2s" arch); the reference network always keeps its
    # published sizes (256, 2): ~2M parameters at SD's 128-195 maps, as in L2S
    size: tuple[int, int] = (256, 2)


@dataclass(frozen=True)
class InvertDefaults:
    """A backbone's default inversion settings (`l2s invert`, and `l2s train`'s inversion)."""

    # refinement iterations per inversion step (Pan et al. 2023; 0: plain DDIM / Euler
    # inversion): whether they help depends on the model
    fixed_point: int = 2


@dataclass(frozen=True)
class ReferenceLayout:
    """How the published L2S classifiers of a family read its maps (`l2s classifier import`).

    A family declares it (``Family.reference_layout``); its backbones name it in
    ``Denoiser.reference_layout`` (a variant without published classifiers, as toy-mmdit,
    names none).
    """

    name: str  # what Denoiser.reference_layout names and cards record ("unet", "flux")
    label: str  # how messages name the classifiers ("SD", "Flux")
    # the backbone's layer list -> l2s.classifier.layout.MapLayout (channel order, resizing);
    # raises LayoutError when the published classifiers cannot read these layers
    layout: Callable[[Sequence[CrossAttnLayer]], Any]
    # text keys the published maps were softmaxed over (None: the backbone's own length)
    text_len: int | None = None
    # whether a checkpoint's network (l2s.classifier.reference.ReferenceConfig) has this
    # family's published sizes; None: any sizes no other family's test claims
    shaped: Callable[[Any], bool] | None = None
    shape: str = ""  # those sizes in words, for refusals ("extractor 4 layers, ff 512")
    presets: tuple[str, ...] = ()  # presets the published classifiers were trained on
    note: str = ""  # what users should know when choosing among those presets


@dataclass(frozen=True)
class Preset:
    """A backbone users can name with ``--model``."""

    name: str  # what users type
    family: str  # the registered family that loads it
    repo_id: str | None  # hub id (None: shipped inside the package)
    description: str  # one line for `l2s models`
    image_size: int  # default generation size in pixels
    defaults: SteerDefaults = SteerDefaults()  # its sampling and steering defaults
    training: TrainDefaults = TrainDefaults()  # its classifier-training defaults
    inversion: InvertDefaults = InvertDefaults()  # its inversion defaults
    world: World | None = None  # what a closed-vocabulary model draws (None: open vocabulary)
    # Family-specific data, e.g. exact architecture configs for --random-weights.
    configs: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class LoadRequest:
    """What ``load_backbone`` asks a family's loader for."""

    model: str  # what the user typed (preset, hub id or folder); becomes Denoiser.name
    preset: Preset | None  # the preset, when ``model`` names one
    source: str  # hub id or local folder to load from (a preset's repo_id, else ``model``)
    device: torch.device
    dtype: torch.dtype  # the network's dtype (fp16 on GPUs unless asked otherwise)
    image_size: int | None  # pixels (None: the family's / preset's default)
    random_weights: bool  # build the exact architecture with random weights (speed work)


@dataclass(frozen=True)
class Family:
    """One backbone family: how to load it, and which hub ids / folders it claims."""

    name: str  # what presets name in ``Preset.family``
    load: Callable[[LoadRequest], Denoiser]  # builds the Denoiser; raises BackboneError
    # diffusers pipeline classes (model_index.json "_class_name") this family loads.
    pipelines: tuple[str, ...] = ()
    # Loads hub ids and folders no family claims (e.g. folders without model_index.json).
    fallback: bool = False
    # Whether a preset of this family loads offline; None: its repo in the HF cache.
    available: Callable[[Preset], bool] | None = None
    # The preset whose defaults a hub id or folder of this family gets when no preset names
    # it (a local FLUX.1-dev snapshot: "flux-dev"), from its configs; None: SteerDefaults().
    like_preset: Callable[[str], str | None] | None = None
    # How the published L2S classifiers read this family's maps; None: none are published.
    reference_layout: ReferenceLayout | None = None
    # (a loaded diffusers pipeline of a class in ``pipelines``, name, image side or None,
    # text length or None) -> the Denoiser over its components, for steering through the
    # pipeline's own loop (l2s.steering.pipeline); None: not supported.
    from_pipeline: Callable[[Any, str, int | None, int | None], Denoiser] | None = None


_FAMILIES: dict[str, Family] = {}
_PRESETS: dict[str, Preset] = {}
_discovered = False


def register_family(family: Family, presets: Sequence[Preset] = ()) -> None:
    """Add a family and its presets (a family module calls this once, at import)."""
    _FAMILIES[family.name] = family
    for p in presets:
        if p.family != family.name:
            raise ValueError(f"preset {p.name!r} names family {p.family!r}, not {family.name!r}")
        _PRESETS[p.name] = p


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    builtins = builtin_family_modules()
    for module in builtins:
        importlib.import_module(module)
    load_entry_points("l2s.families")
    # One order whatever imported a family first (toy-mmdit imports flux; a world's suites
    # may be asked for before any family): the built-ins' order, then the rest as registered.
    rank = {m: i for i, m in enumerate(builtins)}
    ordered = sorted(_FAMILIES.values(),
                     key=lambda f: rank.get(f.load.__module__, len(rank)))
    by_family = {f.name: i for i, f in enumerate(ordered)}
    presets_ = sorted(_PRESETS.values(), key=lambda p: by_family.get(p.family, len(by_family)))
    _PRESETS.clear()
    _PRESETS.update({p.name: p for p in presets_})
    _FAMILIES.clear()
    _FAMILIES.update({f.name: f for f in ordered})


def load_entry_points(group: str) -> None:
    """Import every module listed under an entry-point group (each registers itself)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=group):
        ep.load()


T = TypeVar("T")


class Registry(Generic[T]):
    """Named extensions of one kind (data sources, detectors, suites, losses, optimisers), found
    as families are.

    Built-in ones register at import of the module that owns the registry; a family's world
    registers its own when the family registry imports the family; other packages list their
    module under ``group`` (e.g. ``[project.entry-points."l2s.suites"]``), imported on first
    use.
    """

    def __init__(self, kind: str, group: str, *, from_worlds: bool = True) -> None:
        self.kind, self.group = kind, group  # "suite", "l2s.suites"
        # whether families' worlds add to it (sources, detectors, suites): finding those
        # imports every family; losses and optimisers come only from l2s and entry points
        self.from_worlds = from_worlds
        self._items: dict[str, T] = {}
        self._discovered = False

    def register(self, name: str, item: T) -> None:
        self._items[name] = item

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        if self.from_worlds:
            families()  # family modules import their worlds, which register here
        load_entry_points(self.group)

    def all(self) -> dict[str, T]:
        """Every registered one by name, in registration order."""
        self._discover()
        return dict(self._items)

    def names(self) -> tuple[str, ...]:
        return tuple(self.all())

    def get(self, name: str) -> T | None:
        return self.all().get(name)


def families() -> dict[str, Family]:
    """Every registered family by name."""
    _discover()
    return dict(_FAMILIES)


def presets() -> dict[str, Preset]:
    """Every registered preset by name, in registration order."""
    _discover()
    return dict(_PRESETS)


def get_preset(name: str) -> Preset | None:
    """The preset called ``name``, or whose hub id ``name`` is (so the hub id gets the
    preset's steps, guidance and step size); None for other hub ids and folders."""
    known = presets()
    return known.get(name) or next((p for p in known.values() if p.repo_id == name), None)


def reference_layouts() -> dict[str, ReferenceLayout]:
    """Every family's published-classifier layout by its name, in registration order."""
    return {f.reference_layout.name: f.reference_layout for f in families().values()
            if f.reference_layout is not None}


def get_family(name: str) -> Family:
    fams = families()
    if name not in fams:
        raise BackboneError(f"unknown backbone family {name!r}: registered are "
                            f"{', '.join(fams)}")
    return fams[name]


def supported_pipelines() -> list[str]:
    """Every diffusers pipeline class some registered family claims, sorted."""
    return sorted(c for f in families().values() for c in f.pipelines)


def family_for_pipeline(pipeline_class: str | None) -> Family:
    """The family that claims a diffusers pipeline class; None (no ``model_index.json``, as
    the toy's weights are saved) goes to the fallback family. A class no family claims is
    refused, naming the supported ones (it would otherwise die deep inside diffusers)."""
    fams = families().values()
    if pipeline_class is not None:
        for fam in fams:
            if pipeline_class in fam.pipelines:
                return fam
        raise BackboneError(f"its model_index.json names {pipeline_class}, which no l2s "
                            "backbone family loads; supported pipelines: "
                            f"{', '.join(supported_pipelines())}")
    for fam in fams:
        if fam.fallback:
            return fam
    raise BackboneError("a folder without model_index.json names no pipeline class: "
                        f"supported pipelines are {', '.join(supported_pipelines())}")


def family_for_source(source: str, fetch: bool = True) -> Family:
    """The family that claims a hub id or folder, by the pipeline class its
    ``model_index.json`` names (read from the folder, the HF cache, or, with ``fetch``, the
    hub); refused with the supported pipelines when no family claims it."""
    try:
        return family_for_pipeline(pipeline_class(source, fetch=fetch))
    except BackboneError as e:
        raise BackboneError(f"--model {source}: {e}") from None


def steer_defaults(model: str) -> SteerDefaults:
    """The sampling and steering defaults of ``model``: its preset's; for a hub id or folder
    no preset names, those of the preset its family likens it to (``Family.like_preset``);
    else SteerDefaults()."""
    p = get_preset(model) or _like_preset(model)
    return p.defaults if p else SteerDefaults()


def invert_defaults(model: str) -> InvertDefaults:
    """The inversion defaults of ``model``: its preset's (or its look-alike preset's, as
    ``steer_defaults``), else InvertDefaults()."""
    p = get_preset(model) or _like_preset(model)
    return p.inversion if p else InvertDefaults()


def _like_preset(model: str) -> Preset | None:
    """The preset a hub id or folder's family likens it to, read from its configs (a folder,
    or a repo in the HF cache; nothing is downloaded)."""
    try:
        family = family_for_source(model, fetch=False)
    except BackboneError:
        return None
    name = family.like_preset(model) if family.like_preset else None
    return presets().get(name) if name else None


def world_of(model: str, denoiser: Denoiser | object | None = None) -> World | None:
    """The world a backbone draws: the loaded one's (``Denoiser.world``) when it has one, else
    its preset's (by name or hub id, before anything loads); None: open vocabulary."""
    world = getattr(denoiser, "world", None)
    if world is not None:
        return world
    preset = get_preset(model)
    return preset.world if preset else None


def generation_defaults(model: str, steps: int | None = None, guidance: float | None = None
                        ) -> tuple[int, float]:
    """Steps and guidance: the ones given, else the model's defaults (``steer_defaults``)."""
    d = steer_defaults(model)
    return (d.steps if steps is None else steps, d.guidance if guidance is None else guidance)
