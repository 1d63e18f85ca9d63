"""The `l2s train` job: cached attention maps -> a relation classifier, its card and metrics.

Recipe of L2S (Yiflach et al., WACV 2026, sec. 3): cross-entropy, AdamW (weight decay 0.05),
batch 64, reduce-on-plateau (factor 0.5, patience 5), early stopping (patience 10) restoring the
best validation checkpoint. Images, not samples, are split, so an image's true-caption and
wrong-caption recordings always fall on the same side.
"""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from l2s import __version__, locks
from l2s.classifier.checkpoint import (
    CHECKPOINT_NAME,
    EpochState,
    load_epoch,
    run_identity,
    save_epoch,
)
from l2s.classifier.data import SPLIT_MODES, MapData, TrainError, load_maps, split_images
from l2s.classifier.model import (
    ARCHITECTURES,
    CARD_FILE,
    TOKEN_MODES,
    WEIGHTS_FILE,
    ClassifierConfig,
    RelationClassifier,
    num_parameters,
    save_classifier,
    sha256_file,
    trained_classifier_dir,
)
from l2s.config import (
    CONFIG_FILE,
    check_choice,
    check_config,
    check_integer,
    check_number,
    check_seeds,
    check_text,
    check_writable_dir,
    dump_yaml,
    load_yaml,
)
from l2s.engine.registry import TrainDefaults, get_preset
from l2s.inversion.cache import default_cache_dir
from l2s.inversion.cache import writers as cache_writers
from l2s.inversion.job import InvertConfig, InvertResult
from l2s.inversion.loop import INVERSION_METHODS, InversionConfig
from l2s.relations import RELATIONS

# Label-preserving symmetries of a (subject, object) map pair: "mirror" = left-right flip and
# subject/object swap (plausible for photos); "all" adds the up-down flip; "none" = off.
AUGMENT_MODES = ("none", "mirror", "all")
# What each symmetry does to a relation (relations missing here are unchanged).
_H_FLIP = {"left of": "right of", "right of": "left of"}
_V_FLIP = {"above": "below", "below": "above"}
_SWAP = {**_H_FLIP, **_V_FLIP}


INVERT_MODES = ("auto", "always", "never")
# The fields that say what to invert before training: not training settings (a resumed run may
# change them), so the card's "training" and the checkpoint's identity leave them out.
INVERT_FIELDS = ("invert", "gqa_root", "folder", "limit", "negatives", "inversion")
# Fields without a `l2s train` option: config.yaml holds them only when a run changed them.
_PYTHON_ONLY = ("weight_decay", "plateau_factor", "plateau_patience", "early_stop_patience",
                "dropout")


@dataclass(frozen=True)
class TrainConfig:
    """One `l2s train` run; written, resolved, into the classifier card as ``training``, and
    its options as config.yaml beside it (``TrainConfig.from_yaml`` or `--config` repeat it)."""

    model: str = "toy"  # backbone preset, hub id or folder whose cached maps are used
    data: tuple[str, ...] = ()  # sources to train on (gqa, shapes, ...); () = every source
    cache_dir: str | None = None  # cache root (None: $L2S_CACHE_DIR or ~/.cache/l2s)
    out: str | None = None  # classifier folder (None: <cache root>/classifiers/<model>)
    positive_only: bool = False  # drop wrong-caption samples from train/val (leakage ablation)
    split: str = "hash"  # "hash": by a seeded hash of image_hash; "recorded": entries' split
    val_fraction: float = 0.15  # share of images for validation (split="hash")
    test_fraction: float = 0.15  # share of images for test (split="hash")
    epochs: int = 100  # most epochs; early stopping usually ends sooner
    batch_size: int = 64
    lr: float | None = None  # AdamW learning rate (None: 1e-4, or 1e-3 for the toy)
    weight_decay: float = 0.05
    plateau_factor: float = 0.5  # ReduceLROnPlateau factor on the validation loss
    plateau_patience: int = 5  # epochs without improvement before the LR drops
    early_stop_patience: int = 10  # epochs without improvement before training stops
    d_model: int | None = None  # classifier token width (None: 256, or 64 for the toy)
    depth: int | None = None  # classifier encoder layers (None: 2, or 1 for the toy)
    tokens: str = "map"  # "map" (one token per map) or "layer" (heads averaged per layer)
    dropout: float = 0.1
    seed: int = 0  # initialisation, batch order, the hash split (and inverting: sampling)
    device: str | None = None  # None: $L2S_DEVICE, the launcher's GPU, CUDA, else the CPU
    augment: str = "mirror"  # random symmetries of training batches: none, mirror or all
    arch: str = "l2s"  # "l2s" (ours) or "reference" (the published checkpoints' network)
    # What of `data` is inverted first, as `l2s invert` would: "auto" (the sources the cache
    # has nothing of, or whose invert was cut off), "always" (all of them, skipping cached
    # entries) or "never"
    invert: str = "auto"
    gqa_root: str | None = None  # inverting gqa: folder with images/ and *_sceneGraphs.json
    folder: str | None = None  # inverting folder: images + annotations.jsonl
    limit: int | None = None  # inverting: at most this many samples per source
    negatives: int = 1  # inverting: wrong-relation captions per image (0-3)
    inversion: str = "ddim"  # inverting: "ddim" or "noise" (see InversionConfig)

    def __post_init__(self) -> None:
        for option, value, choices in (("--split", self.split, SPLIT_MODES),
                                       ("--augment", self.augment, AUGMENT_MODES),
                                       ("--arch", self.arch, ARCHITECTURES),
                                       ("--tokens", self.tokens, TOKEN_MODES),
                                       ("--invert", self.invert, INVERT_MODES),
                                       ("--inversion", self.inversion, INVERSION_METHODS)):
            check_choice(option, value, choices, TrainError)
        check_text("--model", self.model, error=TrainError)
        for option, value in (("--cache-dir", self.cache_dir), ("--out", self.out),
                              ("--device", self.device), ("--gqa-root", self.gqa_root),
                              ("--folder", self.folder)):
            check_text(option, value, optional=True, path=True, error=TrainError)
        for name in ("val_fraction", "test_fraction", "weight_decay", "plateau_factor",
                     "dropout"):
            if getattr(self, name) is None:  # was: a TypeError comparing None below
                raise TrainError(f"--{name.replace('_', '-')} must be a number, got None")
            check_number(f"--{name.replace('_', '-')}", getattr(self, name), 0)
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise TrainError(f"--val-fraction and --test-fraction ({self.val_fraction}, "
                             f"{self.test_fraction}) must each be in (0, 1) and sum under 1")
        for name in ("epochs", "batch_size", "d_model", "depth", "plateau_patience",
                     "early_stop_patience", "limit"):
            check_integer(f"--{name.replace('_', '-')}", getattr(self, name), 1, TrainError,
                          optional=name in ("d_model", "depth", "limit"))
        check_integer("--seed", self.seed, error=TrainError, optional=False)
        check_seeds("--seed", self.seed)  # as every command: 0 .. 2^32 - 1
        check_integer("--negatives", self.negatives, 0, TrainError, optional=False)
        if self.negatives > len(RELATIONS) - 1:
            raise TrainError(f"--negatives {self.negatives}: a caption has only "
                             f"{len(RELATIONS) - 1} wrong relations, so at most "
                             f"{len(RELATIONS) - 1} distinct negatives per image")
        check_number("--lr", self.lr, 0, strict=True)
        if not 0 < self.plateau_factor < 1 or not 0 <= self.dropout < 1:
            raise TrainError(f"plateau_factor ({self.plateau_factor}) must be in (0, 1) and "
                             f"dropout ({self.dropout}) in [0, 1)")
        if not isinstance(self.positive_only, bool):
            raise TrainError(f"positive_only must be True or False, got {self.positive_only!r}")
        from l2s.inversion.sources import SOURCES

        if isinstance(self.data, str) or not isinstance(self.data, tuple | list):
            raise TrainError(f"--data takes sources ({', '.join(SOURCES)}); from Python a "
                             f"tuple such as ('shapes',), got {self.data!r}")
        for d in self.data:
            check_choice("--data", d, SOURCES)

    def options(self) -> dict:
        """This run in `l2s train`'s option names and values: what config.yaml holds (the
        fields without an option only where a run changed them)."""
        values = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        values["data"] = list(self.data)
        return {k: v for k, v in values.items()
                if k not in _PYTHON_ONLY or v != getattr(TrainConfig, k)}

    @classmethod
    def from_options(cls, values: Mapping) -> TrainConfig:
        """The config of `l2s train`'s option values (``options()``, a --config file); None is
        "not given" (an unset option, a YAML null): the default."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainError(f"unknown train option(s) {', '.join(unknown)}: valid ones are "
                             f"{', '.join(sorted(known))}")
        values = {k: v for k, v in values.items() if v is not None}
        if "data" in values:
            values["data"] = (values["data"],) if isinstance(values["data"], str) \
                else tuple(values["data"])
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """The config a run wrote as config.yaml (or any --config file of `l2s train`)."""
        return cls.from_options(load_yaml(path))

    def invert_config(self, sources: Sequence[str]) -> InvertConfig:
        """How `sources` are inverted before training: as `l2s invert` with these options."""
        return InvertConfig(data=tuple(sources), model=self.model, cache_dir=self.cache_dir,
                            limit=self.limit, negatives=self.negatives, seed=self.seed,
                            gqa_root=self.gqa_root, folder=self.folder, device=self.device,
                            inversion=InversionConfig(method=self.inversion))

    def settings(self) -> dict:
        """The training settings (the card's "training"): every field but what to invert."""
        return {k: v for k, v in asdict(self).items() if k not in INVERT_FIELDS}

    def _defaults(self) -> TrainDefaults:
        preset = get_preset(self.model)
        return preset.training if preset else TrainDefaults()

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else self._defaults().lr

    def resolved_size(self) -> tuple[int, int]:
        """(d_model, depth) of the classifier (the reference network: its published sizes)."""
        d, depth = self._defaults().size if self.arch == "l2s" else TrainDefaults().size
        return self.d_model or d, self.depth or depth


@dataclass
class TrainResult:
    """What a run produced: the card (with metrics), where it and the run's config.yaml were
    written, and what was inverted first (None: nothing was missing, or ``invert="never"``)."""

    card_path: Path
    card: dict
    history: list[dict] = field(default_factory=list)  # one record per epoch
    seconds: float = 0.0
    config_path: Path | None = None  # the run's options, beside the card
    inverted: InvertResult | None = None
    # True when the folder already held a finished classifier of these settings and data: the
    # card is that one, nothing was trained (``train(..., fresh=True)`` retrains)
    already_trained: bool = False

    @property
    def metrics(self) -> dict:
        return self.card["metrics"]

    def to_json(self) -> dict:
        return {"card": str(self.card_path), "metrics": self.metrics,
                "data": self.card["data"], "training": self.card["training"],
                "seconds": self.seconds,
                "config": None if self.config_path is None else str(self.config_path),
                "inverted": None if self.inverted is None else self.inverted.to_json(),
                "already_trained": self.already_trained}


# ---------------------------------------------------------------------------------------------
# Metrics


# The leakage warning (docs/classifier.md, "Relation leakage"). A wrong caption's relation is
# drawn uniformly from the three the image does not show, independently of the image, so a
# classifier that ignores the caption lands on the caption's relation for a third of its errors on
# wrong-caption samples, exactly as often as on each of the two other wrong relations, and is as
# accurate on wrong captions as on true ones. A classifier that reads the relation word lands on
# the caption's relation far more often than on the others, and loses accuracy on wrong captions.
LEAK_FOLLOWS = 0.15  # share of wrong-caption samples predicted as the caption's relation ...
LEAK_RATIO = 2.0  # ... and over this many times the share predicted as each other wrong relation
LEAK_GAP = 0.10  # true-caption accuracy minus wrong-caption accuracy
LEAK_MIN_SAMPLES = 50  # wrong-caption samples a timestep needs before it is judged on its own


def leakage_verdict(overall: dict, by_timestep: Mapping[str, dict]) -> dict:
    """Whether the diagnostic looks leaky, over all samples or at a timestep with at least
    LEAK_MIN_SAMPLES wrong-caption samples: the share of wrong-caption samples predicted as the
    caption's relation above LEAK_FOLLOWS and LEAK_RATIO times the share of each other wrong
    relation (a caption-blind classifier at chance, 25% accurate, predicts the caption's relation
    for 25% of the samples, and each other wrong relation as often), or wrong-caption accuracy
    more than LEAK_GAP under true-caption accuracy."""
    reasons = []
    for where, m in [("all timesteps", overall)] + [(f"t={t}", m) for t, m in
                                                     by_timestep.items()]:
        if where != "all timesteps" and m["samples"]["wrong_caption"] < LEAK_MIN_SAMPLES:
            continue
        follows, true, wrong = (m["wrong_caption_predicts_caption"], m["true_caption"],
                                m["wrong_caption"])
        if follows is not None and wrong is not None:
            other = max(0.0, 1 - wrong - follows) / 2  # each of the two other wrong relations
            if follows > LEAK_FOLLOWS and follows > LEAK_RATIO * other:
                reasons.append(f"{where}: {follows:.0%} of wrong-caption samples predicted as "
                               f"the caption's relation (> {LEAK_FOLLOWS:.0%}; each other wrong "
                               f"relation {other:.0%})")
        if true is not None and wrong is not None and true - wrong > LEAK_GAP:
            reasons.append(f"{where}: accuracy {true:.0%} on true captions vs {wrong:.0%} on "
                           f"wrong ones (gap > {LEAK_GAP:.0%})")
    return {"leaky": bool(reasons), "reasons": reasons,
            "thresholds": {"wrong_caption_predicts_caption": LEAK_FOLLOWS,
                           "over_other_wrong_relations": LEAK_RATIO, "accuracy_gap": LEAK_GAP,
                           "min_samples": LEAK_MIN_SAMPLES}}


def relation_metrics(pred: torch.Tensor, data: MapData, idx: torch.Tensor) -> dict:
    """Test metrics with the leakage diagnostic (L2S sec. 2): accuracy on true-caption and on
    wrong-caption samples, how often a wrong caption's relation was predicted (over all samples
    and per timestep), the leakage verdict (``leakage_verdict``), confusion matrices (rows:
    true relation, columns: predicted) and accuracy per timestep."""
    k = len(RELATIONS)
    y, neg, py, t = data.y[idx], data.neg[idx], data.prompt_y[idx], data.t[idx]
    ok = pred == y

    def acc(mask: torch.Tensor) -> float | None:
        return round(ok[mask].float().mean().item(), 4) if mask.any() else None

    def confusion(mask: torch.Tensor) -> list[list[int]]:
        cm = torch.zeros(k, k, dtype=torch.long)
        cm.index_put_((y[mask], pred[mask]), torch.ones_like(y[mask]), accumulate=True)
        return cm.tolist()

    def follows(mask: torch.Tensor) -> float | None:
        m = mask & neg
        return round((pred[m] == py[m]).float().mean().item(), 4) if m.any() else None

    def diagnostic(mask: torch.Tensor) -> dict:
        return {"true_caption": acc(mask & ~neg), "wrong_caption": acc(mask & neg),
                "wrong_caption_predicts_caption": follows(mask),
                "samples": {"true_caption": int((mask & ~neg).sum()),
                            "wrong_caption": int((mask & neg).sum())}}

    every = torch.ones_like(neg)
    overall = diagnostic(every)
    by_timestep = {str(int(s)): diagnostic(t == s)
                   for s in sorted(t.unique().tolist(), reverse=True)}
    return {
        "test_accuracy": acc(every),
        "test_accuracy_true_caption": acc(~neg),
        "test_accuracy_wrong_caption": acc(neg),
        # Share of wrong-caption samples classified as the caption's (wrong) relation: near 0
        # when the classifier reads geometry, high when it reads the relation word.
        "test_wrong_caption_predicts_caption": overall["wrong_caption_predicts_caption"],
        "test_samples": {"true_caption": int((~neg).sum()), "wrong_caption": int(neg.sum())},
        "confusion": confusion(every),
        "confusion_true_caption": confusion(~neg),
        "confusion_wrong_caption": confusion(neg),
        "confusion_axes": "rows: true relation, columns: predicted; order = classes",
        "test_accuracy_by_timestep": {str(int(s)): acc(t == s) for s in t.unique().tolist()},
        # Per timestep (noisiest first): where a classifier reads the word instead of the layout.
        "test_leakage_by_timestep": by_timestep,
        "leakage": leakage_verdict(overall, by_timestep),
    }


# ---------------------------------------------------------------------------------------------
# Training


def _batches(data: MapData, idx: torch.Tensor, size: int, device: torch.device):
    t = data.t if data.t_input is None else data.t_input
    for b in idx.split(size):
        yield (data.maps[b].to(device, torch.float32), t[b].to(device), data.y[b].to(device))


def _new_classifier(cfg: TrainConfig, data: MapData, d_model: int, depth: int
                    ) -> torch.nn.Module:
    """An untrained classifier of cfg.arch for these maps."""
    n_maps, size = data.maps.shape[2], data.maps.shape[-1]
    if cfg.arch == "reference":
        from l2s.classifier.reference import ReferenceClassifier, ReferenceConfig

        return ReferenceClassifier(ReferenceConfig(
            n_maps=n_maps, relations=RELATIONS, map_size=size, d_model=d_model,
            n_times=len(set(data.timesteps)), extractor_layers=depth, relation_layers=depth,
            dropout=cfg.dropout))
    return RelationClassifier(ClassifierConfig(
        n_maps=n_maps, map_size=size, relations=RELATIONS,
        heads_per_layer=tuple(la["heads"] for la in data.layers), tokens=cfg.tokens,
        d_model=d_model, depth=depth, n_heads=4 if d_model % 4 == 0 else 1,
        head_hidden=d_model, dropout=cfg.dropout))


def augment_batch(x: torch.Tensor, y: torch.Tensor, mode: str, classes: Sequence[str],
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply each symmetry of ``mode`` to a random half of the batch, relabelling exactly.

    x: (B, 2, C, S, S) subject/object maps, y: (B,) indices into ``classes``. A left-right
    flip turns "left of" into "right of", an up-down flip "above" into "below", and swapping
    subject and object inverts the relation; GenEval's rule is exactly symmetric under all
    three, so the labels stay true while the classifier sees new layouts.
    """
    if mode == "none":
        return x, y
    for dim, table in _symmetries(mode, tuple(classes), y.device):
        pick = torch.rand(len(y), generator=generator) < 0.5
        if not pick.any():
            continue
        pick = pick.to(x.device)
        x = torch.where(pick.view(-1, 1, 1, 1, 1), x.flip(dim), x)
        y = torch.where(pick, table[y], y)
    return x, y


@functools.lru_cache(maxsize=8)
def _symmetries(mode: str, classes: tuple[str, ...], device: torch.device
                ) -> list[tuple[int, torch.Tensor]]:
    """(dim of (B, 2, C, S, S) to flip, class relabelling table on ``device``) per symmetry:
    built once, not per batch."""
    ops = [(-1, _H_FLIP), (1, _SWAP)] + ([(-2, _V_FLIP)] if mode == "all" else [])
    return [(dim, torch.tensor([classes.index(relabel.get(c, c)) for c in classes],
                               device=device)) for dim, relabel in ops]


@torch.no_grad()
def _evaluate(model: torch.nn.Module, data: MapData, idx: torch.Tensor, size: int,
              device: torch.device) -> tuple[float, torch.Tensor]:
    """(mean cross-entropy, predictions on the CPU) over the samples idx."""
    model.eval()
    loss, preds = 0.0, []
    for x, t, y in _batches(data, idx, size, device):
        logits = model(x, t)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        preds.append(logits.argmax(-1).cpu())
    return loss / max(len(idx), 1), torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def _counts(data: MapData, parts: dict[str, torch.Tensor]) -> dict:
    """What the run used, after the image split (and the positive-only filter)."""
    per_entry = len(data.timesteps)  # samples per cache entry
    by_source: dict = {}
    for s, idx in parts.items():
        used = Counter((data.source[j], "neg" if data.neg[j] else "pos") for j in idx.tolist())
        for (src, pol), n in sorted(used.items()):
            by_source.setdefault(src, {}).setdefault(s, {})[pol] = n // per_entry
    return {
        "entries": by_source,  # source -> split -> polarity -> cache entries
        "samples": {s: int(len(i)) for s, i in parts.items()},  # after the split (and filter)
        "images": {s: len({data.image[j] for j in i.tolist()}) for s, i in parts.items()},
        "samples_per_class": {s: {r: int((data.y[i] == c).sum()) for c, r in enumerate(RELATIONS)}
                              for s, i in parts.items()},
    }


def invert_missing(cfg: TrainConfig, denoiser, callback: Callable[[dict], None] | None = None
                   ) -> InvertResult | None:
    """Invert what the cache lacks of ``cfg.data`` (``cfg.invert``), as `l2s invert` would;
    None when there is nothing to invert.

    ``callback`` gets ``{"stage": "invert", "sources": [...]}`` first, then the invert job's
    per-batch events, each with ``"stage": "invert"``, and last ``{"stage": "invert",
    "result": InvertResult}``.
    """
    from l2s.inversion import job
    from l2s.inversion.cache import AttentionCache

    if not cfg.data or cfg.invert == "never":
        return None
    todo = list(cfg.data) if cfg.invert == "always" else \
        AttentionCache(cfg.cache_dir, denoiser.fingerprint,
                       readable_only=True).sources_to_invert(cfg.data)
    if not todo:
        return None
    if callback:
        callback({"stage": "invert", "sources": todo})
    on_batch = (lambda ev: callback({**ev, "stage": "invert"})) if callback else None
    res = job.invert(cfg.invert_config(todo), denoiser, callback=on_batch)
    if callback:
        callback({"stage": "invert", "result": res})
    return res


LOCK_NAME = ".lock"  # held in the output folder while a run writes it


def train(cfg: TrainConfig, denoiser=None, callback: Callable[[dict], None] | None = None,
          fresh: bool = False) -> TrainResult:
    """Train a relation classifier on the cached maps of cfg.model and write it with its card.

    First inverts what the cache lacks of ``cfg.data`` (``cfg.invert``, ``invert_missing``).
    ``callback`` gets the inversion's events (``"stage": "invert"``), then one dict per epoch
    (``"stage": "train"``): epoch, epochs, train_loss, val_loss, val_acc, lr, best (and
    ``resumed: True`` for the epochs a resumed run already had). The run's state is saved
    after every epoch (``l2s.classifier.checkpoint``): the same call after an interruption
    continues from the last finished epoch; ``fresh`` discards a saved state instead. The
    run's options are written beside the card as config.yaml. When the folder already holds
    the finished classifier of these settings, backbone and data, nothing is trained: the
    result is that card (``already_trained``); ``fresh`` retrains it.
    """
    check_config("train", cfg, TrainConfig)
    start = time.perf_counter()
    if denoiser is None:
        from l2s.engine.loading import load_backbone

        denoiser = load_backbone(cfg.model, device=cfg.device)
    out = Path(cfg.out).expanduser() if cfg.out else trained_classifier_dir(denoiser.name)
    check_writable_dir(out)  # before inverting and training: the result must be savable
    # one run per folder: a second would interleave epochs in one checkpoint
    with locks.exclusive(out / LOCK_NAME, "l2s train", out):
        return _train(cfg, denoiser, callback, fresh, out, start)


# What a card's "training" holds beyond the settings, and the settings that do not change the
# classifier (where it ran) or that a card leaves out (paths)
_NOT_SETTINGS = ("epochs_run", "seconds", "parameters", "device", "cache_dir", "out")


def finished_card(out: Path, resolved: TrainConfig, backbone: Mapping, counts: Mapping
                  ) -> tuple[dict | None, list[str]]:
    """(the card in ``out``, how it differs from ``resolved``'s run): the differences are
    empty when the card is the finished result of ``resolved`` (its settings with the
    defaults filled in) on this backbone and data (``_counts``). (None, []) when ``out`` holds
    no usable classifier (no card, an unreadable one, weights damaged or gone): a new run,
    which loses nothing."""
    path = out / CARD_FILE
    if not path.exists():
        return None, []
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, []
    if not isinstance(card, dict) or not isinstance(card.get("training"), dict):
        return None, []
    try:  # its weights as the card wrote them (damaged or gone: trained again)
        if sha256_file(out / WEIGHTS_FILE) != card.get("weights_sha256"):
            return None, []
    except OSError:
        return None, []

    def settings(values: Mapping) -> dict:  # as JSON holds them (tuples as lists)
        return json.loads(json.dumps({k: v for k, v in values.items()
                                      if k not in _NOT_SETTINGS}))

    was, now = settings(card["training"]), settings(resolved.settings())
    diff = [f"{k} {was.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(was) | set(now))
            if was.get(k) != now.get(k)]
    backbone_of = card.get("backbone") or {}
    if backbone_of.get("fingerprint") != backbone["fingerprint"]:
        diff.append(f"backbone {backbone_of.get('name')} ({backbone_of.get('fingerprint')}) -> "
                    f"{backbone['name']} ({backbone['fingerprint']})")
    data = {k: v for k, v in (card.get("data") or {}).items() if k in counts}
    if data != json.loads(json.dumps(dict(counts))):
        diff.append("the cached data (entries were added or removed since)")
    return card, diff


def _train(cfg: TrainConfig, denoiser, callback: Callable[[dict], None] | None, fresh: bool,
           out: Path, start: float) -> TrainResult:
    inverted = invert_missing(cfg, denoiser, callback)
    # another process still inverting into the cache: its images are not all there yet
    writers = cache_writers(Path(cfg.cache_dir or default_cache_dir()).expanduser()
                            / denoiser.fingerprint)
    layers = [{"name": la.name, "heads": la.heads} for la in denoiser.cross_attention_layers()]
    backbone = {"name": denoiser.name, "fingerprint": denoiser.fingerprint, "layers": layers}
    data = load_maps(cfg.cache_dir, denoiser.fingerprint, name=denoiser.name, model=cfg.model,
                     layers=layers, sources=cfg.data)
    parts = split_images(data, cfg)
    if cfg.positive_only:
        parts["train"] = parts["train"][~data.neg[parts["train"]]]
        parts["val"] = parts["val"][~data.neg[parts["val"]]]
    only = "true-caption samples only, " if cfg.positive_only else ""
    for s in ("train", "val"):
        if len(parts[s]) == 0:
            raise TrainError(f"no {s} samples left ({only}{len(data.image)} samples in all): "
                             "invert more images")
    have = torch.bincount(data.y[parts["train"]], minlength=len(RELATIONS))
    absent = [r for r, n in zip(RELATIONS, have.tolist(), strict=True) if n == 0]
    if absent:
        raise TrainError(f"no training samples of class {', '.join(repr(a) for a in absent)} "
                         f"(per class: {dict(zip(RELATIONS, have.tolist(), strict=True))}): "
                         "invert images showing every relation (`l2s invert --model "
                         f"{cfg.model}`), or add a source that has them with --data")

    from l2s.engine.loading import resolve_device

    device = resolve_device(cfg.device)
    lr = cfg.resolved_lr()
    d_model, depth = cfg.resolved_size()
    resolved = replace(cfg, lr=lr, d_model=d_model, depth=depth, device=str(device),
                       out=str(out))
    torch.manual_seed(cfg.seed)
    model = _new_classifier(cfg, data, d_model, depth).to(device)
    if cfg.arch == "reference":  # its time input: the row of t in the card's timesteps
        table = sorted(set(data.timesteps), reverse=True)
        data.t_input = torch.tensor([table.index(int(s)) for s in data.t.tolist()])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
    order = torch.Generator().manual_seed(cfg.seed)

    checkpoint = out / CHECKPOINT_NAME
    if not fresh and not checkpoint.exists():  # a checkpoint: a run to resume, not finished
        done, diff = finished_card(out, resolved, backbone, _counts(data, parts))
        if diff:  # another classifier is there: replacing it takes --fresh
            raise TrainError(f"{out} already holds a classifier of another run "
                             f"({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}): "
                             "rerun with --fresh to replace it (or choose another --out)")
        if done is not None:
            config_path = out / CONFIG_FILE
            # written again (deleted or damaged, it would not repeat the run)
            dump_yaml({**cfg.options(), "out": str(out)}, config_path)
            return TrainResult(out / CARD_FILE, done, done.get("history", []), 0.0,
                               config_path, inverted, already_trained=True)
    identity = run_identity(resolved.settings(), parts, len(data.image))
    if fresh:
        checkpoint.unlink(missing_ok=True)
    st = load_epoch(checkpoint, identity, model, opt, plateau, order) or EpochState()
    for record in st.history:  # a resumed run shows the epochs it already has
        if callback:
            callback({**record, "stage": "train", "resumed": True,
                      "checkpoint": str(checkpoint)})
    clock = time.perf_counter()
    setup_seconds = clock - start  # reading the maps (this process)
    first = st.epoch + 1
    if st.epoch and st.epoch - st.best_epoch >= cfg.early_stop_patience:
        first = cfg.epochs + 1  # the interrupted run had already stopped early
    for epoch in range(first, cfg.epochs + 1):
        model.train()
        total, seen = 0.0, 0
        perm = parts["train"][torch.randperm(len(parts["train"]), generator=order)]
        for x, t, y in _batches(data, perm, cfg.batch_size, device):
            x, y = augment_batch(x, y, cfg.augment, RELATIONS, order)
            loss = F.cross_entropy(model(x, t), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
            seen += len(y)
        val_loss, val_pred = _evaluate(model, data, parts["val"], cfg.batch_size, device)
        val_acc = (val_pred == data.y[parts["val"]]).float().mean().item()
        plateau.step(val_loss)
        improved = val_loss < st.best_loss - 1e-6
        if improved:
            st.best_loss, st.best_epoch = val_loss, epoch
            st.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        record = {"epoch": epoch, "epochs": cfg.epochs, "train_loss": total / seen,
                  "val_loss": val_loss, "val_acc": val_acc, "lr": opt.param_groups[0]["lr"],
                  "best": improved}
        st.history.append(record)
        st.epoch = epoch
        st.seconds += time.perf_counter() - clock
        clock = time.perf_counter()
        save_epoch(checkpoint, identity, model, opt, plateau, order, st)
        if callback:
            callback({**record, "stage": "train"})
        if epoch - st.best_epoch >= cfg.early_stop_patience:
            break
    history = st.history
    if st.best_state is None:
        checkpoint.unlink(missing_ok=True)  # nothing in it worth resuming
        raise TrainError(f"training diverged (validation loss {history[-1]['val_loss']}): "
                         f"lower --lr (was {lr})")
    model.load_state_dict(st.best_state)
    best_loss, best_epoch = st.best_loss, st.best_epoch

    _, test_pred = _evaluate(model, data, parts["test"], cfg.batch_size, device)
    metrics = relation_metrics(test_pred, data, parts["test"])
    metrics.update(best_epoch=best_epoch, val_loss=round(best_loss, 5),
                   val_accuracy=round(history[best_epoch - 1]["val_acc"], 4))
    seconds = st.seconds + time.perf_counter() - clock + setup_seconds
    card = {
        "backbone": {**backbone, "model": cfg.model},
        "timesteps": sorted(set(data.timesteps), reverse=True),
        # text keys each map was softmaxed over: steering encodes prompts so (None: unknown)
        "text_len": data.text_len,
        # No machine's paths in a card that is shared (cache_dir, out): config.yaml beside it
        # holds them for a rerun.
        "data": {**_counts(data, parts),
                 "corrupt_dropped": len(data.corrupt),  # broken entries found and left out
                 # of them, those left in the cache (it could not be changed: read-only)
                 **({"corrupt_left_in_cache": len(data.corrupt_kept)}
                    if data.corrupt_kept else {}),
                 # the cache was still being written (by these processes) when it was read
                 **({"cache_being_written": writers} if writers else {})},
        "metrics": metrics,
        "training": {**{k: v for k, v in resolved.settings().items()
                        if k not in ("cache_dir", "out")}, "epochs_run": len(history),
                     "seconds": round(seconds, 1), "parameters": num_parameters(model)},
        "history": history,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "l2s_version": __version__,
    }
    card_path = save_classifier(model.cpu(), card, out)
    checkpoint.unlink(missing_ok=True)  # the card is the result now
    # The options with the model's defaults as used (lr, sizes), the device as given, the
    # folder as used: --config repeats it whatever the defaults become
    config_path = dump_yaml({**replace(resolved, device=cfg.device).options(),
                             "out": str(out)}, out / CONFIG_FILE)
    return TrainResult(card_path, json.loads(card_path.read_text()), history, seconds,
                       config_path, inverted)


run_train = train  # the name before the API named every job by its command
