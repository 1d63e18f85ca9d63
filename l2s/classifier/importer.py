"""`l2s classifier import`: a published L2S checkpoint (.pth) -> safetensors + a card.

The paper's authors publish trained classifiers for SD1.4, SD2.1-base (and Flux) as PyTorch
pickles under a non-commercial licence; users download them themselves. This module reads one
with ``torch.load(weights_only=True)`` (never unpickling objects), checks everything the file
holds against the reference architecture and the backbone it is imported for, and writes the
weights as safetensors with a card (source sha256, classes, map layout, trained steps,
backbone fingerprint) where `l2s steer` finds that backbone's default classifier.
"""

from __future__ import annotations

import pickle
import re
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from l2s import __version__
from l2s.classifier.layout import LayoutError, channels, reference_for
from l2s.classifier.model import (
    CARD_FILE,
    ClassifierError,
    _state_problems,
    save_classifier,
    sha256_file,
    trained_classifier_dir,
    weight_problems,
)
from l2s.classifier.reference import (
    REFERENCE_CLASSES,
    ReferenceClassifier,
    ReferenceConfig,
)
from l2s.config import check_text
from l2s.errors import one_line
from l2s.relations import RELATIONS

REQUIRED_KEYS = ("model_state_dict", "rel_name_to_idx", "config", "training_config")
LICENCE_NOTE = ("The published L2S classifiers are the authors' work under a non-commercial "
                "licence: this converted copy is for its user's own non-commercial use; do not "
                "redistribute it.")
_PLAIN = (str, int, float, bool, type(None))


class ImportRefused(ClassifierError):
    """A checkpoint cannot be imported as asked; the message says why and what to do."""


@dataclass
class ImportResult:
    """Where the converted classifier went, and its card."""

    card_path: Path
    card: dict

    def to_json(self) -> dict:
        keep = ("backbone", "classes", "timesteps", "text_len", "layout", "source",
                "architecture", "notes")
        return {"card": str(self.card_path), **{k: self.card[k] for k in keep}}


_REDOWNLOAD = ("download it again (an interrupted or HTML download is a common cause) from the "
               "L2S authors' release (docs/classifier.md, 'Published classifiers')")


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's dict, loaded with ``weights_only=True``; objects are refused, naming
    the first type the safe loader would not accept."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ImportRefused(f"no checkpoint file {p}: download the .pth from the L2S authors' "
                            "release (docs/classifier.md, 'Published classifiers')")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's wordings: "Unsupported global: GLOBAL mod.Name was not an allowed
        # global" (a class), "unsupported GLOBAL posix.system whose module posix is
        # blocked" (torch 2.13: a function of a module never allowed, such as os.system)
        m = re.search(r"unsupported global:?\s+(?:GLOBAL\s+)?([\w.]+)", str(e), re.IGNORECASE)
        if m is None:  # not a pickle of objects: not a checkpoint at all (text, HTML, ...)
            raise ImportRefused(f"{p} is not a PyTorch checkpoint (the unpickler stopped "
                                f"at its first bytes): {_REDOWNLOAD}") from e
        what = m.group(1)
        if "is blocked" in str(e):
            raise ImportRefused(
                f"{p} holds a call of {what}, which loading it as a pickle would run: do not "
                "load this file with torch.load outside l2s (it may be malicious); l2s never "
                f"unpickles objects (torch.load weights_only=True): {_REDOWNLOAD}") from e
        raise ImportRefused(
            f"{p} holds a Python object of type {what}, not only tensors and plain data; "
            "l2s never unpickles objects (torch.load weights_only=True): re-save the "
            "checkpoint's dict with tensors, dicts, lists, str, int, float and bool only") from e
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise ImportRefused(f"{p} is not a readable PyTorch checkpoint ({one_line(e, 200)}): "
                            f"{_REDOWNLOAD}") from e
    if not isinstance(obj, Mapping):
        raise ImportRefused(f"{p} holds a {type(obj).__name__}, not the dict of an L2S "
                            f"checkpoint (keys {', '.join(REQUIRED_KEYS)})")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise ImportRefused(f"{p} is not an L2S classifier checkpoint: it lacks "
                            f"{', '.join(missing)} (has {', '.join(map(str, obj))})")
    return dict(obj)


def _plain_data(obj, where: str) -> None:
    """Refuse anything but YAML-like data (dicts, lists, str, numbers, bool, None)."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _plain_data(v, f"{where}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _plain_data(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise ImportRefused(f"checkpoint {where} holds a {type(obj).__name__}; a config must "
                            "be plain data (dicts, lists, str, int, float, bool)")


def _get(cfg: Mapping, dotted: str, kind: type, default=None):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is not None:
                return default
            raise ImportRefused(f"checkpoint config lacks {dotted!r}: not a published L2S "
                                "classifier (or a newer format this l2s does not know)")
        node = node[part]
    if kind is int and isinstance(node, bool) or not isinstance(node, kind):
        raise ImportRefused(f"checkpoint config {dotted!r} is {node!r}, expected {kind.__name__}")
    return node


def checkpoint_classes(ckpt: Mapping) -> tuple[str, ...]:
    """Class names in logit order, from ``rel_name_to_idx`` (checked against the inverse map)."""
    to_idx = ckpt["rel_name_to_idx"]
    if not isinstance(to_idx, Mapping) or not to_idx:
        raise ImportRefused("checkpoint rel_name_to_idx is not a non-empty {name: index} dict")
    if sorted(to_idx.values()) != list(range(len(to_idx))) or \
            not all(isinstance(k, str) for k in to_idx):
        raise ImportRefused(f"checkpoint rel_name_to_idx {dict(to_idx)} is not a numbering "
                            f"0..{len(to_idx) - 1} of class names")
    classes = tuple(sorted(to_idx, key=to_idx.get))
    unknown = [c for c in classes if c not in REFERENCE_CLASSES and c not in RELATIONS]
    if unknown:
        raise ImportRefused(f"checkpoint classes {unknown} are unknown to l2s (known: "
                            f"{', '.join(REFERENCE_CLASSES)}): l2s cannot tell which relation "
                            "they stand for")
    from_idx = ckpt.get("idx_to_rel_name")
    if from_idx is not None and (not isinstance(from_idx, Mapping) or
                                 {int(i): n for i, n in from_idx.items()}
                                 != dict(enumerate(classes))):
        raise ImportRefused("checkpoint idx_to_rel_name does not invert rel_name_to_idx: the "
                            "file is inconsistent")
    steerable = {REFERENCE_CLASSES.get(c, c) for c in classes}
    lacking = [r for r in RELATIONS if r not in steerable]
    if lacking:
        raise ImportRefused(f"checkpoint classes {list(classes)} lack {lacking}: l2s steers "
                            "towards left of, right of, above and below")
    return classes


def reference_config(ckpt: Mapping, n_maps: int) -> tuple[ReferenceConfig, list[int]]:
    """The architecture a checkpoint holds, and its trained step indices; refuses what does
    not match the reference network or does not fit ``n_maps`` maps per object."""
    cfg, train_cfg = ckpt["config"], ckpt["training_config"]
    for name, obj in (("config", cfg), ("training_config", train_cfg)):
        if not isinstance(obj, Mapping):
            raise ImportRefused(f"checkpoint {name} is a {type(obj).__name__}, not a dict")
        _plain_data(obj, name)
    state = ckpt["model_state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor)
                                                 for v in state.values()):
        raise ImportRefused("checkpoint model_state_dict is not a dict of tensors")
    if _get(cfg, "extractor.use_mean", bool, default=False) is True:
        raise ImportRefused("checkpoint uses the mean-map extractor ablation, not the "
                            "published network")
    enabled = _get(cfg, "extractor.timestep_embedding.enable", bool)
    mode = _get(cfg, "extractor.timestep_embedding.mode", str) if enabled else "none"
    pe_key = "object_extractor.positional_encoding.pe"
    rel_pe_key = "relation_classifier.positional_encoding.pe"
    for key in (pe_key, rel_pe_key):
        if key not in state or state[key].ndim != 3:
            raise ImportRefused(f"checkpoint state lacks the position table {key} (1, rows, d)")
    rows = int(state[pe_key].shape[1])
    if n_maps > rows:
        raise ImportRefused(f"the backbone gives {n_maps} maps per object but the checkpoint's "
                            f"position table has {rows} rows: it was trained for a backbone "
                            "with fewer attention maps (another model)")
    steps = _get(train_cfg, "timesteps", list)
    if not steps or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
        raise ImportRefused(f"checkpoint training_config timesteps {steps!r} is not a list of "
                            "step indices")
    n_times = _get(cfg, "num_timesteps", int)
    if max(steps) >= n_times or min(steps) < 0:
        raise ImportRefused(f"checkpoint timesteps {steps} fall outside its {n_times}-row "
                            "time embedding")
    try:
        arch = ReferenceConfig(
            n_maps=n_maps, relations=checkpoint_classes(ckpt), max_maps=rows,
            map_size=_get(cfg, "map_size", int), d_model=_get(cfg, "d_model", int),
            n_times=n_times, extractor_heads=_get(cfg, "extractor.nhead", int),
            extractor_layers=_get(cfg, "extractor.num_layers", int),
            extractor_ff=_get(cfg, "extractor.dim_feedforward", int),
            pool_heads=_get(cfg, "extractor.layer_attn_nheads", int), time_mode=mode,
            relation_heads=_get(cfg, "classifier.nhead", int),
            relation_layers=_get(cfg, "classifier.num_layers", int),
            relation_ff=_get(cfg, "classifier.dim_feedforward", int),
            relation_time_dim=_get(cfg, "classifier.timestep_embedding_dim", int),
            relation_positions=int(state[rel_pe_key].shape[1]), dropout=0.0)
    except ValueError as e:
        raise ImportRefused(f"checkpoint config does not describe the reference network: {e}"
                            ) from e
    if arch.map_size != 16:
        raise ImportRefused(f"checkpoint reads {arch.map_size}x{arch.map_size} maps; l2s "
                            "records 16x16")
    return arch, sorted(steps)


def _check_shape(ref, arch: ReferenceConfig, name: str) -> None:
    """Refuse a checkpoint whose sizes are another family's published classifiers' (each
    family's ``ReferenceLayout.shaped``; one without a test takes the sizes none claims)."""
    from l2s.engine.registry import families

    declared = {f.reference_layout.name: (f.name, f.reference_layout)
                for f in families().values() if f.reference_layout is not None}
    claims = [r for _, r in declared.values() if r.shaped is not None and r.shaped(arch)]
    if ref.shaped is not None and ref.shaped(arch) or ref.shaped is None and not claims:
        return
    if claims:
        other = claims[0]
        raise ImportRefused(f"this checkpoint has the published {other.label} classifiers' "
                            f"shape ({other.shape}): {other.label} classifiers need the "
                            f"{declared[other.name][0]} family, and {name} is not a "
                            f"{other.label} backbone (use --model {' or '.join(other.presets)})")
    rest = [r for _, r in declared.values() if r.shaped is None]
    raise ImportRefused(f"this checkpoint has the published "
                        f"{' or '.join(r.label for r in rest) or 'other'} classifiers' shape, "
                        f"not the {ref.label} one ({ref.shape}): {name} is a {ref.label} "
                        "backbone; import it with --model "
                        f"{' or '.join(p for r in rest for p in r.presets)}")


def has_architecture(model: str) -> bool:
    """Whether ``model`` is a preset whose exact architecture l2s builds without weights."""
    from l2s.engine.registry import presets

    preset = presets().get(model)
    return preset is not None and bool(preset.configs)


def import_classifier(checkpoint: str | Path, model: str, *, out: str | Path | None = None,
                      force: bool = False, random_weights: bool = False, denoiser=None
                      ) -> ImportResult:
    """Convert a published checkpoint for backbone ``model`` and install it (``out``, else
    where `l2s steer --model model` looks); returns the card.

    A preset is read from its known architecture (``load_architecture``: nothing is
    downloaded or loaded) and the card binds to that architecture; a hub id or folder is
    loaded, and the card binds to its weights' fingerprint; ``random_weights`` binds it to
    the preset's random-weights build."""
    check_text("CHECKPOINT", checkpoint, path=True, error=ImportRefused)
    check_text("--model", model, error=ImportRefused)
    check_text("--out", out, optional=True, path=True, error=ImportRefused)
    src = Path(checkpoint).expanduser()
    ckpt = read_checkpoint(src)
    # A preset's architecture is known without its weights: the card then binds to that
    # architecture (its layer list), not to one set of weights (fingerprint None).
    weightless = denoiser is None and not random_weights and has_architecture(model)
    if denoiser is None:
        from l2s.engine.loading import load_architecture, load_backbone

        denoiser = (load_architecture(model) if weightless else
                    load_backbone(model, device="cpu", dtype="fp32",
                                  random_weights=random_weights))
    layers = denoiser.cross_attention_layers()
    try:
        ref = reference_for(denoiser)
        layout = ref.layout(layers)
    except LayoutError as e:
        raise ImportRefused(str(e)) from e
    arch, steps = reference_config(ckpt, channels(layers))
    _check_shape(ref, arch, denoiser.name)
    notes = []
    own = denoiser.text_len
    text_len = ref.text_len or own
    if text_len != own and not text_len <= (denoiser.max_text_len or 0):
        raise ImportRefused(f"the published classifier read maps over {text_len} text tokens; "
                            f"{denoiser.name} encodes prompts as {own}, which it cannot change")
    if text_len != own:
        notes.append(f"the published classifier saw maps softmaxed over {text_len} text keys "
                     f"(T5 tokens); {denoiser.name} encodes prompts as {own} by default (its "
                     f"max_sequence_length), so l2s steer, bench and speed encode them as "
                     f"{text_len} when steering with this classifier (card text_len): its "
                     f"images differ from plain {denoiser.name}'s at {own} tokens")
    net = ReferenceClassifier(arch)
    bad = weight_problems(ckpt["model_state_dict"])
    if bad:  # a silent cast would steer with garbage
        raise ImportRefused(f"checkpoint weights cannot steer: {'; '.join(bad)}; download the "
                            "checkpoint again")
    state = {k: v.float() for k, v in ckpt["model_state_dict"].items()}
    problems = _state_problems(net.state_dict(), state)
    if problems:
        raise ImportRefused(f"checkpoint weights do not match the reference network its "
                            f"config describes: {'; '.join(problems[:6])}")
    net.load_state_dict(state, strict=True)

    dest = Path(out).expanduser() if out else trained_classifier_dir(model)
    if (dest / CARD_FILE).exists() and not force:
        raise ImportRefused(f"{dest} already holds a classifier: pass --force to replace it, "
                            "or --out DIR to install this one elsewhere (then steer with "
                            "--classifier DIR)")
    card = {
        # fingerprint None: any weights of this layer list (imported from the architecture)
        "backbone": {"name": denoiser.name,
                     "fingerprint": None if weightless else denoiser.fingerprint,
                     "layers": [{"name": la.name, "heads": la.heads} for la in layers],
                     "model": model},
        "timesteps": steps,
        "text_len": text_len,  # text keys each map was softmaxed over: steering encodes so
        "clock": "step",  # the time input is the denoising step index (step_time_input)
        "layout": layout.to_dict(),
        "source": {
            "file": src.name, "sha256": sha256_file(src),
            "kind": "published L2S checkpoint (PyTorch .pth)",
            "input_channels": ckpt.get("input_channels"),
            "rel_name_to_idx": dict(ckpt["rel_name_to_idx"]),
            "config": ckpt["config"], "training_config": ckpt["training_config"],
        },
        "licence": LICENCE_NOTE,
        "notes": notes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "l2s_version": __version__,
    }
    import json

    path = save_classifier(net.eval(), card, dest)
    return ImportResult(path, json.loads(path.read_text()))
