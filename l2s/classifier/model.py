"""The relation classifier: subject/object cross-attention maps + timestep -> relation logits.

Learn-to-Steer (Yiflach et al., WACV 2026, sec. 3) reads the spatial relation between two
objects from a diffusion model's own attention maps; at generation time the classifier's
cross-entropy is the steering loss, so it runs, and is differentiated through, on every steering
iteration. This module owns the network, its checkpoint format (safetensors weights + a JSON
card) and where a backbone's default classifier lives. It does no I/O except save/load.
Cards of the reference architecture (``l2s/classifier/reference.py``, trained by
`l2s train --arch reference` or converted by `l2s classifier import`) load through the same
functions: ``architecture["kind"]`` says which network a card holds.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from l2s.classifier.layout import check_maps, check_relations, check_sizes
from l2s.classifier.reference import (
    ReferenceClassifier,
    ReferenceConfig,
    step_time_input,
)
from l2s.config import is_whole
from l2s.errors import L2SError
from l2s.inversion.cache import atomic_write, atomic_write_text
from l2s.relations import RELATIONS

CARD_FORMAT = "l2s-relation-classifier/1"  # bump when the card or weight layout changes
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
TOKEN_MODES = ("map", "layer")
ARCHITECTURES = ("l2s", "reference")  # --arch: ours, or the published checkpoints' network


class ClassifierError(L2SError, RuntimeError):
    """A classifier checkpoint cannot be used as asked; the message says what to do."""


class ClassifierMismatchError(ClassifierError):
    """The classifier was trained on another backbone's attention maps."""


@dataclass(frozen=True)
class ClassifierConfig:
    """Sizes of a RelationClassifier; written into its card as ``architecture``."""

    n_maps: int = 128  # C: maps per object = recorded layers x heads (SD1.4 128, SD2.1 195)
    map_size: int = 16  # S: side of every (resized, sum-1) attention map
    relations: tuple[str, ...] = RELATIONS  # class names, in logit order
    # Heads of each recorded layer, in the order the C maps are stacked; needed by
    # tokens="layer" (sum must be n_maps), informative otherwise. None: unknown.
    heads_per_layer: tuple[int, ...] | None = None
    tokens: str = "map"  # "map": one token per map (reference); "layer": heads averaged per layer
    d_model: int = 256  # token width of the per-object extractor
    depth: int = 2  # Transformer encoder layers of the extractor
    n_heads: int = 4  # attention heads of those encoder layers
    mlp_ratio: int = 4  # encoder feed-forward width = mlp_ratio x d_model
    head_hidden: int = 256  # hidden width of the relation head MLP
    dropout: float = 0.1  # in the encoder and the relation head (training only)

    def __post_init__(self) -> None:
        check_sizes(self, ("n_maps", "map_size", "d_model", "depth", "n_heads", "mlp_ratio",
                           "head_hidden"))
        check_relations(self.relations)
        if self.heads_per_layer is not None:
            check_sizes(self, (), counts=("heads_per_layer",))
        if self.tokens not in TOKEN_MODES:
            raise ValueError(f"tokens must be one of {TOKEN_MODES}, got {self.tokens!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if not self.relations:
            raise ValueError("a classifier needs at least one relation class")
        if self.heads_per_layer is not None and sum(self.heads_per_layer) != self.n_maps:
            raise ValueError(f"heads_per_layer {self.heads_per_layer} sums to "
                             f"{sum(self.heads_per_layer)}, not n_maps {self.n_maps}")
        if self.tokens == "layer" and self.heads_per_layer is None:
            raise ValueError('tokens="layer" needs heads_per_layer')

    @property
    def n_tokens(self) -> int:
        """Tokens per object the encoder sees."""
        return len(self.heads_per_layer) if self.tokens == "layer" else self.n_maps

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> ClassifierConfig:
        """Inverse of to_dict; unknown keys are an error (a newer card format)."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown architecture fields {sorted(unknown)}")
        kw = dict(d)
        for k in ("relations", "heads_per_layer"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
        return cls(**kw)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of timesteps (B,) (DDPM / "Attention is all you need")."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim - 2 * half))


def map_moments(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Centre and spread (N, 4) = (mean x, mean y, std x, std y) of maps (N, S*S) of mass > 0,
    with coordinates in [-1, 1] (x to the right, y down)."""
    p = maps.clamp_min(0).reshape(-1, size, size)
    p = p / p.sum(dim=(1, 2), keepdim=True).clamp_min(1e-8)
    coords = torch.linspace(-1, 1, size, device=maps.device, dtype=maps.dtype)
    px, py = p.sum(dim=1), p.sum(dim=2)  # marginals over x (N, S) and over y (N, S)
    mx, my = px @ coords, py @ coords
    sx = (px @ coords**2 - mx**2).clamp_min(1e-8).sqrt()
    sy = (py @ coords**2 - my**2).clamp_min(1e-8).sqrt()
    return torch.stack([mx, my, sx, sy], dim=-1)


class RelationClassifier(nn.Module):
    """Maps (B, 2, C, S, S) + timesteps (B,) -> relation logits (B, K) (L2S sec. 3).

    One extractor, shared by subject and object: each map (or each layer's head-averaged map)
    becomes a token (linear on its S*S values) plus a learned embedding of its index and the
    timestep embedding; a Transformer encoder mixes the tokens; attention pooling weighs them
    into one pooled feature and one pooled map (a convex mix of the input maps). The relation
    head reads both objects' pooled features, pooled maps and the maps' centres and spreads.
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = cfg = config
        d, area = cfg.d_model, cfg.map_size**2
        if cfg.tokens == "layer":
            # (L, C) averaging matrix: row l holds 1/heads on layer l's maps.
            rows = []
            for i, h in enumerate(cfg.heads_per_layer):
                start = sum(cfg.heads_per_layer[:i])
                rows.append(torch.zeros(cfg.n_maps).index_fill_(0, torch.arange(start, start + h),
                                                                 1.0 / h))
            self.register_buffer("layer_mean", torch.stack(rows), persistent=False)
        self.embed = nn.Linear(area, d)
        self.index_embedding = nn.Parameter(torch.randn(cfg.n_tokens, d) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, cfg.mlp_ratio * d, cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.pool_score = nn.Linear(d, 1)
        self.pool_value = nn.Linear(d, d)
        head_in = 2 * (d + area + 4)
        self.head = nn.Sequential(
            nn.LayerNorm(head_in), nn.Linear(head_in, cfg.head_hidden), nn.GELU(),
            nn.Dropout(cfg.dropout), nn.Linear(cfg.head_hidden, cfg.head_hidden), nn.GELU(),
            nn.Linear(cfg.head_hidden, len(cfg.relations)))

    def forward(self, maps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Logits (B, K) for maps (B, 2, C, S, S) at timesteps t, (B,) or one for all."""
        cfg = self.config
        check_maps(maps, cfg.n_maps, cfg.map_size)
        b, area = maps.shape[0], cfg.map_size**2
        # Maps sum to 1; scaled by S*S their mean value is 1, a scale the linear layers like.
        x = maps.to(self.embed.weight.dtype).flatten(3) * area  # (B, 2, C, S*S)
        if cfg.tokens == "layer":
            x = torch.einsum("lc,bocp->bolp", self.layer_mean, x)  # (B, 2, L, S*S)
        x = x.reshape(2 * b, cfg.n_tokens, area)  # subject and object through one extractor
        t = torch.as_tensor(t, device=maps.device).reshape(-1).expand(b)  # an int is fine too
        temb = self.time_mlp(timestep_embedding(t, cfg.d_model))
        temb = temb.repeat_interleave(2, dim=0)  # (2B, d): rows follow (b, object) order
        tok = self.embed(x) + self.index_embedding + temb[:, None]  # (2B, N, d)
        tok = self.norm(self.encoder(tok))
        w = self.pool_score(tok).squeeze(-1).softmax(-1)  # (2B, N) pooling weights
        feat = torch.einsum("bn,bnd->bd", w, self.pool_value(tok))  # (2B, d)
        pooled = torch.einsum("bn,bnp->bp", w, x)  # (2B, S*S), mean value 1
        moments = map_moments(pooled, cfg.map_size)  # (2B, 4)
        z = torch.cat([feat, pooled, moments], dim=-1).reshape(b, -1)  # [subject, object]
        return self.head(z)  # (B, K)


# ---------------------------------------------------------------------------------------------
# Timesteps


def nearest_trained_timestep(card_or_list: Mapping | Sequence[int], t: int) -> int:
    """The trained timestep the classifier is fed at sampling timestep ``t`` (L2S sec. 4: "the
    current step rounded up to the next trained timestep").

    Sampling runs from large t (noisy) to small t, so "the next trained step" is the largest
    trained timestep <= t: at t = 981 with trained [881, 781, ...] the classifier gets 881, at
    881 it gets 881, at 861 it gets 781. Past the last trained timestep (t below all of them)
    the smallest trained timestep is used.
    """
    trained = card_or_list.get("timesteps") if isinstance(card_or_list, Mapping) else card_or_list
    if not trained:
        raise ValueError("no trained timesteps: the card lists none")
    at_or_after = [int(s) for s in trained if int(s) <= t]
    return max(at_or_after) if at_or_after else min(int(s) for s in trained)


def time_input(card: Mapping) -> Callable[[int, int], int]:
    """The classifier's time input at (sampling timestep t, denoising step index), per card.

    Ours reads the nearest trained timestep itself; a reference network `l2s train` wrote
    reads that timestep's row in the card's ``timesteps``; an imported published classifier
    (``clock: "step"``) reads the step-index table (``step_time_input``).
    """
    trained = [int(s) for s in card["timesteps"]]
    if card.get("clock", "timestep") == "step":
        return lambda t, step: step_time_input(trained, step)
    if card.get("architecture", {}).get("kind", "l2s") == "reference":
        return lambda t, step: trained.index(nearest_trained_timestep(trained, t))
    return lambda t, step: nearest_trained_timestep(trained, t)


def build_classifier(architecture: Mapping) -> nn.Module:
    """An untrained network from a card's ``architecture`` (either kind)."""
    kind = architecture.get("kind", "l2s")
    if kind == "reference":
        return ReferenceClassifier(ReferenceConfig.from_dict(architecture))
    if kind != "l2s":
        raise ValueError(f"unknown classifier kind {kind!r} (known: {', '.join(ARCHITECTURES)})")
    return RelationClassifier(ClassifierConfig.from_dict(
        {k: v for k, v in architecture.items() if k != "kind"}))


# ---------------------------------------------------------------------------------------------
# Checkpoints: model.safetensors + card.json


def num_parameters(module: nn.Module) -> int:
    """Number of parameters of a network (the card's ``training.parameters``)."""
    return sum(p.numel() for p in module.parameters())


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_classifier(model: nn.Module, card: dict, out_dir: str | Path) -> Path:
    """Write ``model.safetensors`` and ``card.json`` into out_dir; returns the card's path.

    The card's ``format``, ``architecture``, ``classes``, ``map_size`` and ``weights_sha256``
    come from the model itself, so they cannot disagree with the weights.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = out / WEIGHTS_FILE
    atomic_write(weights, lambda tmp: save_file(
        state, tmp, metadata={"format": CARD_FORMAT, "architecture": json.dumps(cfg.to_dict())}))
    full = {"format": CARD_FORMAT, **card, "architecture": cfg.to_dict(),
            "classes": list(cfg.relations), "map_size": cfg.map_size, "weights": WEIGHTS_FILE,
            "weights_sha256": sha256_file(weights)}
    path = out / CARD_FILE
    atomic_write_text(path, json.dumps(full, indent=2) + "\n")
    return path


def read_card(path: str | Path) -> tuple[Path, dict]:
    """(card path, card) from a card.json or the folder holding it, or from a hub repo id
    (``user/name``, when no such local path exists: fetched into the HF cache, see
    l2s.classifier.hub)."""
    from l2s.classifier.hub import resolve_classifier

    p = resolve_classifier(path)
    if p.is_dir():
        p = p / CARD_FILE
    if not p.is_file():
        raise ClassifierError(f"no classifier card at {p}: pass a card.json written by "
                              "`l2s train`, the folder holding it, or a hub repo id user/name")
    try:
        card = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise ClassifierError(f"classifier card {p} is not readable JSON ({e}): retrain with "
                              "`l2s train`") from e
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        got = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise ClassifierError(f"{p} is not an l2s classifier card (format {got!r}, expected "
                              f"{CARD_FORMAT!r}): retrain with `l2s train`")
    return p, card


def card_sha256(source: str | Path) -> str:
    """A fingerprint of a classifier card and the weights it names: what records and data made
    with it carry, so another classifier (retrained in place, too) is told apart."""
    path, card = read_card(source)
    h = hashlib.sha256(path.read_bytes())
    if not card.get("weights_sha256"):  # a card that does not pin its weights
        h.update(sha256_file(path.parent / str(card.get("weights", WEIGHTS_FILE))).encode())
    return h.hexdigest()


def check_backbone(card: Mapping, denoiser, card_path: str | Path = "") -> None:
    """Raise ClassifierMismatchError unless the card was trained on this denoiser's maps."""
    bb = card.get("backbone") or {}
    mine = [{"name": la.name, "heads": la.heads} for la in denoiser.cross_attention_layers()]
    # A card imported from a preset's architecture (fingerprint None) fits any weights of it
    same_fp = bb.get("fingerprint") in (None, denoiser.fingerprint)
    same_layers = bb.get("layers") == mine
    if same_fp and same_layers:
        return
    why = "" if not same_fp else " (same fingerprint, but its recorded layer list differs)"
    raise ClassifierMismatchError(
        f"classifier {card_path} belongs to backbone {bb.get('name')} ({bb.get('fingerprint')}), "
        f"not {denoiser.name} ({denoiser.fingerprint}){why}: train one with "
        f"`l2s train --model {denoiser.name}`")


def load_classifier(path: str | Path, denoiser=None, device: str | torch.device | None = None
                    ) -> tuple[nn.Module, dict]:
    """(model in eval mode, card) from a card.json or its folder; safetensors only.

    With ``denoiser``, the card must name that backbone's fingerprint and layer list, and the
    model goes to the denoiser's device unless ``device`` says otherwise (float32 always).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    card_path, card = read_card(path)
    if denoiser is not None:
        check_backbone(card, denoiser, card_path)
    try:
        model = build_classifier(card["architecture"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ClassifierError(f"card {card_path} has no usable architecture ({e}): retrain with "
                              "`l2s train`") from e
    folder = card_path.parent.resolve()
    weights = (folder / str(card.get("weights", WEIGHTS_FILE))).resolve()
    if not weights.is_relative_to(folder):
        raise ClassifierError(f"card {card_path} names weights {card.get('weights')!r} outside "
                              "its own folder: a card may only load the weights beside it; put "
                              "model.safetensors next to card.json")
    if not weights.is_file():
        raise ClassifierError(f"card {card_path} does not match its weights: {weights} is "
                              "missing; copy the whole classifier folder")
    problem = card_problem(card)
    if problem:
        raise ClassifierError(f"card {card_path} {problem}: retrain with `l2s train` (or "
                              "re-import it with `l2s classifier import`)")
    expected_sha = card.get("weights_sha256")
    if expected_sha and sha256_file(weights) != expected_sha:
        raise ClassifierError(f"card {card_path} does not match its weights: {weights.name} "
                              "was replaced after the card was written (sha256 differs); "
                              "keep each card with the weights it was written with")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise ClassifierError(f"card {card_path} does not match its weights: {weights} is not "
                              f"a readable safetensors file ({e})") from e
    problems = _state_problems(model.state_dict(), state) or weight_problems(state)
    if problems:
        raise ClassifierError(f"card {card_path} does not match its weights: "
                              f"{'; '.join(problems)}")
    model.load_state_dict(state)
    if device is None and denoiser is not None:
        device = denoiser.device
    return model.to(device or "cpu").eval(), card


def card_problem(card: Mapping) -> str | None:
    """What is wrong with a card's fields besides its architecture (which building the network
    checks), as the rest of a sentence; None for a sound card. Each would otherwise fail deep
    in steering: ``timesteps: []``, ``text_len: "long"``, ``classes`` that are not the
    network's outputs or lack a relation l2s steers."""
    from l2s.classifier.reference import relation_of_class

    ts = card.get("timesteps")
    if not isinstance(ts, list) or not ts or not all(is_whole(t) and t >= 0 for t in ts):
        return f"has timesteps {ts!r}: a non-empty list of the trained timesteps (integers >= 0)"
    text_len = card.get("text_len")
    if text_len is not None and (not is_whole(text_len) or text_len < 1):
        return f"has text_len {text_len!r}: the text tokens of its maps, an integer >= 1"
    classes = card.get("classes")
    logits = list(card["architecture"].get("relations", []))
    if classes != logits:
        return (f"has classes {classes!r}, not the {len(logits)} outputs its architecture "
                f"names ({logits})")
    lacking = [r for r in RELATIONS if r not in {relation_of_class(c) for c in classes}]
    if lacking:
        return f"has classes {classes} that lack {', '.join(map(repr, lacking))}, which l2s steers"
    if card.get("clock", "timestep") not in ("timestep", "step"):
        return f"has clock {card.get('clock')!r}: 'timestep' or 'step'"
    return None


def weight_problems(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Weights a classifier must not run with: not a float dtype l2s computes in (int, bool,
    complex, float8 would be cast silently), or NaN / infinite values (a loss of NaN steers
    nothing)."""
    problems = []
    for k, v in state.items():
        if v.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            problems.append(f"{k} is {str(v.dtype).removeprefix('torch.')}, not a float16, "
                            "bfloat16 or float32 tensor")
        elif not bool(torch.isfinite(v).all()):
            problems.append(f"{k} holds NaN or infinite values")
        if len(problems) == 3:
            break
    return problems


def _state_problems(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]
                    ) -> list[str]:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}"
                        f"{' ...' if len(unexpected) > 5 else ''}")
    for k in sorted(set(expected) & set(got)):
        if expected[k].shape != got[k].shape:
            problems.append(f"{k} is {tuple(got[k].shape)} in the weights but "
                            f"{tuple(expected[k].shape)} by the card's architecture")
    return problems


# ---------------------------------------------------------------------------------------------
# Where classifiers live

PACKAGE_CLASSIFIERS = Path(__file__).parents[1] / "classifiers"  # shipped cards (e.g. the toy's)


def safe_model_name(model_name: str) -> str:
    """A folder name for a preset, hub id or path ("stabilityai/sd-2-1" -> "stabilityai_sd-2-1")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("_.") or "model"


def trained_classifier_dir(model_name: str) -> Path:
    """Where `l2s train` writes a backbone's classifier by default."""
    from l2s.inversion.cache import default_cache_dir

    return default_cache_dir() / "classifiers" / safe_model_name(model_name)


def default_classifier(model_name: str, fingerprint: str | None = None) -> Path | None:
    """The card of a backbone's default classifier: the one `l2s train` wrote
    (``<cache>/classifiers/<name>/card.json``: the user's own wins), else the one shipped in
    the package (``l2s/classifiers/<name>/card.json``); None if neither exists. With
    ``fingerprint``, a card trained on another fingerprint (or unreadable) is passed over."""
    for folder in (trained_classifier_dir(model_name),
                   PACKAGE_CLASSIFIERS / safe_model_name(model_name)):
        card = folder / CARD_FILE
        if not card.is_file():
            continue
        if fingerprint is not None:
            try:
                fp = json.loads(card.read_text()).get("backbone", {}).get("fingerprint")
            except (OSError, ValueError, AttributeError):  # ValueError: bad JSON or UTF-8
                continue
            if fp not in (None, fingerprint):  # None: any weights of the architecture
                continue
        return card
    return None


def card_origin(card_path: str | Path) -> str:
    """'shipped' for a card that comes with l2s, 'from the hub (user/name@revision)' for a
    hub repo, 'imported from FILE' for a published checkpoint `l2s classifier import`
    converted, else 'trained' (the user's)."""
    from l2s.classifier.hub import hub_origin, is_repo_id

    if is_repo_id(card_path):
        return "from the hub"
    if hub_origin(card_path):
        return f"from the hub ({hub_origin(card_path)})"
    try:
        Path(card_path).resolve().relative_to(PACKAGE_CLASSIFIERS.resolve())
    except ValueError:
        try:
            source = json.loads(Path(card_path).read_text()).get("source") or {}
        except (OSError, json.JSONDecodeError, AttributeError):
            source = {}
        return f"imported from {source['file']}" if source.get("file") else "trained"
    return "shipped"


def describe_models() -> list[dict]:
    """One record per preset (``l2s.engine.loading.describe_presets``: what it is, its
    defaults, whether it loads offline) with its default classifier and where that came from."""
    from l2s.engine.loading import describe_presets

    rows = describe_presets()
    for row in rows:
        card = default_classifier(row["name"])
        row["classifier"] = str(card) if card else None
        row["classifier_origin"] = card_origin(card) if card else None
    return rows
