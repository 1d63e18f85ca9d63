"""Map layouts: which recorded map feeds which classifier channel, and how maps are resized;
the shapes a classifier's input and sizes must have (``check_maps``, ``check_sizes``).

l2s records a backbone's maps in forward order (layer-major, head-minor) and resizes them its
own way (area when shrinking, bilinear when growing, renormalised); classifiers `l2s train`
writes read exactly that ("l2s" layout). The published L2S classifiers read another order and
resizing: a backbone family declares its reference layout (``Family.reference_layout``: a
function of the backbone's own layer list, so any SD-layout UNet, a fine-tune or a tiny test
model, gets the order its blocks imply) and its backbones name it
(``Denoiser.reference_layout``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from l2s.config import is_whole
from l2s.engine.backbone import CrossAttnLayer
from l2s.errors import L2SError

RESIZES = ("l2s", "bilinear")  # l2s: the recorder's own; bilinear: the reference's
RENORMALISE = ("always", "resized")  # divide by (sum + 1e-8): every map, or resized ones only


class LayoutError(L2SError, ValueError):
    """A classifier's map layout does not fit this backbone; the message says what to do."""


@dataclass(frozen=True)
class MapLayout:
    """How a classifier's C input channels come from a backbone's recorded maps."""

    name: str  # "l2s", or the family's reference layout (ReferenceLayout.name)
    order: tuple[int, ...] | None = None  # classifier channel c <- recorded channel order[c]
    resize: str = "l2s"  # how the recorder brings maps to S x S
    renormalise: str = "always"  # with resize "bilinear": which maps are divided by their sum

    def __post_init__(self) -> None:
        if self.resize not in RESIZES or self.renormalise not in RENORMALISE:
            raise LayoutError(f"unknown layout resize {self.resize!r} / renormalise "
                              f"{self.renormalise!r}: expected {RESIZES} / {RENORMALISE}")
        if self.order is not None and sorted(self.order) != list(range(len(self.order))):
            raise LayoutError(f"layout {self.name!r}: order is not a permutation")

    def resize_fn(self) -> Callable[[torch.Tensor, int], torch.Tensor] | None:
        """The recorder's resize for this layout (None: the recorder's own)."""
        if self.resize == "l2s":
            return None
        return partial(bilinear_resize, renormalise=self.renormalise)

    def to_dict(self) -> dict:
        return {"name": self.name, "order": None if self.order is None else list(self.order),
                "resize": self.resize, "renormalise": self.renormalise}

    @classmethod
    def from_dict(cls, d: Mapping | None) -> MapLayout:
        """A card's ``layout`` (absent in cards `l2s train` writes: the l2s layout)."""
        if not d:
            return L2S_LAYOUT
        order = d.get("order")
        return cls(d["name"], None if order is None else tuple(int(i) for i in order),
                   d.get("resize", "l2s"), d.get("renormalise", "always"))


L2S_LAYOUT = MapLayout("l2s")


def bilinear_resize(maps: torch.Tensor, size: int, renormalise: str = "always"
                    ) -> torch.Tensor:
    """(..., h, w) -> (..., size, size): bilinear (align_corners False, no antialias) when the
    size differs, then each map divided by (its sum + 1e-8) (always, or only when resized)."""
    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    x = maps.reshape(-1, 1, h, w).float()
    resized = (h, w) != (size, size)
    if resized:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=False)
    if resized or renormalise == "always":
        x = x / (x.sum(dim=(-2, -1), keepdim=True) + 1e-8)
    return x.reshape(*lead, size, size)


def check_sizes(cfg, names: Sequence[str], minimum: int = 1, *,
                counts: Sequence[str] = ()) -> None:
    """Raise ValueError unless each field of ``names`` is an integer >= ``minimum`` and each
    of ``counts`` a non-empty sequence of integers >= 1; ``dropout`` (when ``cfg`` has one)
    must lie in [0, 1). A card that says ``n_heads: 0`` or ``d_model: -4`` is refused here,
    not by a ZeroDivisionError or a negative dimension inside torch."""
    for name in names:
        v = getattr(cfg, name)
        if not is_whole(v) or v < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    for name in counts:
        v = getattr(cfg, name)
        if not isinstance(v, Sequence) or not v or not all(is_whole(x) and x >= 1 for x in v):
            raise ValueError(f"{name} must be a non-empty list of integers >= 1, got {v!r}")
    dropout = getattr(cfg, "dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
            or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")


def check_relations(relations) -> None:
    """Raise ValueError unless the class names are distinct strings."""
    if not isinstance(relations, Sequence) or isinstance(relations, str) or not relations \
            or not all(isinstance(r, str) for r in relations) \
            or len(set(relations)) != len(relations):
        raise ValueError(f"relations must be a non-empty list of distinct class names, "
                         f"got {relations!r}")


def check_maps(maps: torch.Tensor, n_maps: int, map_size: int) -> None:
    """Refuse classifier input that is not (B, 2, n_maps, map_size, map_size)."""
    if maps.ndim != 5 or maps.shape[1:] != (2, n_maps, map_size, map_size):
        raise ValueError(f"maps must be (B, 2, {n_maps}, {map_size}, {map_size}), "
                         f"got {tuple(maps.shape)}")


def channels(layers: Sequence[CrossAttnLayer]) -> int:
    return sum(la.heads for la in layers)


def resolution_order(layers: Sequence[CrossAttnLayer]) -> tuple[int, ...]:
    """Recorded channels (forward order, layer-major, head-minor) regrouped by map resolution,
    coarsest first; forward order (down blocks, then up blocks) inside a resolution.

    SD2.1-base: the 8x8 mid block, then 16x16 (down 2, up 1), 32x32, 64x64.
    """
    starts, c = [], 0
    for la in layers:
        starts.append(c)
        c += la.heads
    ranked = sorted(range(len(layers)),  # sorted() is stable: ties keep forward order
                    key=lambda i: layers[i].resolution[0] * layers[i].resolution[1])
    return tuple(starts[i] + h for i in ranked for h in range(layers[i].heads))


def reference_for(denoiser):
    """The published classifiers' layout declaration of this backbone's family
    (``l2s.engine.registry.ReferenceLayout``); LayoutError when it has none."""
    from l2s.engine.registry import reference_layouts

    known = reference_layouts()
    name = getattr(denoiser, "reference_layout", None)
    if name not in known:
        raise LayoutError(f"{denoiser.name} declares no reference map layout, so the published "
                          "classifiers cannot read its maps: they fit "
                          f"{published_presets() or 'no registered backbone'}")
    return known[name]


def published_presets(notes: bool = False) -> str:
    """The presets published classifiers exist for, as one phrase ("a, b (note), c or d"),
    from the families' declarations; ``notes`` adds each family's note after its last."""
    from l2s.engine.registry import reference_layouts

    items = []
    for ref in reference_layouts().values():
        for i, preset in enumerate(ref.presets):
            last = i == len(ref.presets) - 1
            items.append(f"{preset} ({ref.note})" if notes and last and ref.note else preset)
    return ", ".join(items[:-1]) + " or " + items[-1] if len(items) > 1 else "".join(items)


def reference_layout(denoiser) -> MapLayout:
    """The layout the published classifiers of this backbone's family read."""
    return reference_for(denoiser).layout(denoiser.cross_attention_layers())
