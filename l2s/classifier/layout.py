"""Map layouts: which recorded map feeds which classifier channel, and how maps are resized.

l2s records a backbone's maps in forward order (layer-major, head-minor) and resizes them its
own way (area when shrinking, bilinear when growing, renormalised); classifiers `l2s train`
writes read exactly that ("l2s" layout). The published L2S classifiers read another order and
resizing: a backbone family declares its reference layout by name (``Denoiser.reference_layout``)
and this module turns the backbone's own layer list into the channel permutation, so any
SD-layout UNet (a fine-tune, a tiny test model) gets the order its blocks imply.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from l2s.engine.backbone import CrossAttnLayer
from l2s.errors import L2SError

RESIZES = ("l2s", "bilinear")  # l2s: the recorder's own; bilinear: the reference's
RENORMALISE = ("always", "resized")  # divide by (sum + 1e-8): every map, or resized ones only


class LayoutError(L2SError, ValueError):
    """A classifier's map layout does not fit this backbone; the message says what to do."""


@dataclass(frozen=True)
class MapLayout:
    """How a classifier's C input channels come from a backbone's recorded maps."""

    name: str  # "l2s", or the family's reference layout ("unet", "flux", ...)
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


def unet_layout(layers: Sequence[CrossAttnLayer]) -> MapLayout:
    """The published SD classifiers' layout over a UNet's cross-attention layers."""
    return MapLayout("unet", resolution_order(layers), "bilinear", "always")


def flux_layout(layers: Sequence[CrossAttnLayer]) -> MapLayout:
    """The published Flux classifiers' layout: the 19 double-stream then 38 single-stream
    blocks, 24 heads each, channel = layer x 24 + head (l2s's forward order already); 16x16
    maps (schnell at 256 px) are used as they are, larger ones (dev at 512 px: 32x32) resized
    bilinearly and renormalised."""
    if not any(la.name.startswith("single_transformer_blocks.") for la in layers):
        raise LayoutError("the published Flux classifiers read all 57 blocks, double- and "
                          "single-stream: record every layer (FluxDenoiser layers='all')")
    return MapLayout("flux", None, "bilinear", "resized")


# Reference layouts by the name a family declares in ``Denoiser.reference_layout``.
REFERENCE_LAYOUTS: dict[str, Callable[[Sequence[CrossAttnLayer]], MapLayout]] = {
    "unet": unet_layout,
    "flux": flux_layout,
}


def reference_layout(denoiser) -> MapLayout:
    """The layout the published classifiers of this backbone's family read."""
    name = getattr(denoiser, "reference_layout", None)
    if name not in REFERENCE_LAYOUTS:
        raise LayoutError(f"{denoiser.name} declares no reference map layout, so the published "
                          "classifiers cannot read its maps: they fit Stable Diffusion UNets "
                          "(--model sd1.4, sd2.1-base or a diffusers SD folder) and Flux.1 "
                          "(flux-schnell, flux-dev)")
    return REFERENCE_LAYOUTS[name](denoiser.cross_attention_layers())
