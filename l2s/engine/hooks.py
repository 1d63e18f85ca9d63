"""Attention-map capture through the family's attention processors, with optional gradients.

The recorder owns what is common to every family: which layers and tokens, installing and
restoring processors, averaging a phrase's tokens, resizing and renormalising. How a layer's
probabilities are obtained is the family's: ``Denoiser.capture_processor`` wraps the layer's
installed processor and hands (B, heads, Q, T) probabilities to the recorder's sink.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Protocol

import diffusers
import torch
import torch.nn.functional as F

from l2s.engine.backbone import AttentionSink, CrossAttnLayer
from l2s.errors import L2SError

# Token groups: one list of token indices per recorded object ("teddy bear" -> [2, 3]), shared
# by the whole batch, or one such list of groups per batch element.
TokenGroups = Sequence[Sequence[int]] | Sequence[Sequence[Sequence[int]]]


class HookError(L2SError, RuntimeError):
    """The model does not have the attention layers (or processors) the hooks expect."""


class ForwardStopped(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Raised inside a recorder's ``truncated()`` once every recorded layer has run."""


def token_weights(groups: TokenGroups, seq_len: int) -> torch.Tensor:
    """Averaging weights (B or 1, T, G): column g has 1/n on the n tokens of group g."""
    if groups and groups[0] and isinstance(groups[0][0], int):
        groups = [groups]  # shared by the batch
    w = torch.zeros(len(groups), seq_len, len(groups[0]))
    for b, sample in enumerate(groups):
        if len(sample) != w.shape[2]:
            raise ValueError("every batch element needs the same number of token groups")
        for g, idx in enumerate(sample):
            if not idx:
                raise ValueError(f"token group {g} is empty")
            if max(idx) >= seq_len or min(idx) < 0:
                raise ValueError(f"token index {max(idx)} outside the prompt's {seq_len} tokens")
            w[b, list(idx), g] = 1.0 / len(idx)
    return w


def resize_maps(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(..., h, w) attention maps -> (..., size, size), renormalised to sum 1 per map."""
    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    x = maps.reshape(-1, 1, h, w)
    if (h, w) != (size, size):
        # Area averaging when shrinking keeps every query's mass; bilinear when growing.
        mode = "area" if h >= size and w >= size else "bilinear"
        x = F.interpolate(x.float(), size=(size, size), mode=mode,
                          **({"align_corners": False} if mode == "bilinear" else {}))
    x = x.float().clamp_min(0)
    x = x / x.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return x.reshape(*lead, size, size)


class AttentionHost(Protocol):
    """What the recorder needs of a backbone: a ``Denoiser``, or a bare network's attention
    side while it trains (``l2s.families.unet.UNetAttention``)."""

    attention_model: torch.nn.Module

    def capture_processor(self, layer: CrossAttnLayer, original, sink: AttentionSink): ...


class AttentionRecorder:
    """Record per-layer, per-head softmax maps of chosen tokens while the context is open.

    Only the chosen layers get the family's capture processor (which wraps the installed
    one); every other layer keeps its processor (the fused SDPA path), and the originals come
    back on exit, also on exceptions. Open it only around the forwards to record: steering
    does so per steered step, so unsteered steps run every layer on the fused path. After
    each forward, ``maps[layer_name]`` is (B, G, heads, h, w) for the G token groups at the
    layer's own resolution, and ``stacked()`` gives (B, G, C, S, S): resized to S =
    ``map_size`` and summing to 1 per map (or as ``resize`` does it), C = sum of heads over
    layers in forward order. The resize runs once per resolution, on all its layers together
    (a UNet has 3-4 resolutions for 16 layers, an MMDiT one for all), not once per layer:
    fewer kernel launches forward and backward. With ``keep_grad`` the maps stay in the
    autograd graph (steering); otherwise they are detached.
    """

    def __init__(self, denoiser: AttentionHost, layers: Sequence[CrossAttnLayer],
                 tokens: TokenGroups, *, map_size: int = 16, keep_grad: bool = False,
                 resize: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> None:
        self.denoiser, self.layers = denoiser, list(layers)
        self.model = denoiser.attention_model
        self.map_size, self.keep_grad = map_size, keep_grad
        self.resize = resize or resize_maps  # (..., h, w) maps -> (..., S, S)
        # True inside truncated(): end a forward (raise ForwardStopped) right after the last
        # recorded layer: what follows cannot change the maps, so a loss on them needs none.
        self.stop_after_last = False
        self._seen: set[str] = set()
        self.maps: dict[str, torch.Tensor] = {}
        self._tokens = tokens
        self._weights: torch.Tensor | None = None
        self._originals: dict | None = None

    def set_tokens(self, tokens: TokenGroups) -> None:
        """Record other token groups from the next forward on (e.g. another prompt)."""
        self._tokens, self._weights = tokens, None
        self.maps.clear()

    def set_weights(self, weights: torch.Tensor) -> None:
        """Record with ready-made token weights (B, T, G) from the next forward on (see
        ``token_weights``); saves rebuilding them when a loop forwards changing subsets."""
        self._tokens, self._weights = None, weights
        self.maps.clear()

    @contextlib.contextmanager
    def truncated(self):
        """Forwards inside are run for their maps only: each stops after the last recorded
        layer (its output is never computed)."""
        self.stop_after_last, self._seen = True, set()
        try:
            yield
        except ForwardStopped:
            pass
        finally:
            self.stop_after_last = False

    def __enter__(self) -> AttentionRecorder:
        procs = self.model.attn_processors
        missing = [la.name for la in self.layers if f"{la.name}.processor" not in procs]
        if missing:
            raise HookError(
                f"attention layers {missing[:3]} not found in {type(self.model).__name__} "
                f"(diffusers {diffusers.__version__}); l2s is tested with diffusers 0.42: "
                "install a version in the range pyproject.toml pins")
        new = dict(procs)
        for la in self.layers:
            key = f"{la.name}.processor"
            new[key] = self.denoiser.capture_processor(la, procs[key], self._record)
        self._originals = dict(procs)
        self.model.set_attn_processor(new)  # consumes the dict it is given
        return self

    def __exit__(self, *exc) -> None:
        if self._originals is not None:
            self.model.set_attn_processor(dict(self._originals))
            self._originals = None

    def _record(self, layer: CrossAttnLayer, probs: torch.Tensor) -> None:
        batch, heads, hw, seq_len = probs.shape  # (B, heads, Q, T)
        wts = self._weights
        if wts is None or (wts.shape[1] != seq_len and self._tokens is not None):
            wts = token_weights(self._tokens, seq_len)
        if wts.device != probs.device or wts.dtype != probs.dtype:
            # Built once per token set and kept on the device: a host-to-device copy in every
            # layer would synchronise the GPU 16 times per forward.
            wts = wts.to(probs.device, probs.dtype)
        self._weights = wts
        if wts.shape[0] not in (1, batch):
            raise ValueError(f"token groups given for {wts.shape[0]} prompts, batch is {batch}")
        p = probs if self.keep_grad else probs.detach()
        maps = torch.einsum("bhqt,btg->bghq", p, wts.expand(batch, -1, -1))  # (B, G, heads, HW)
        h, w = layer.resolution
        if h * w != hw:
            # Resolution from the actual query count when the input size differs from default.
            h = w = int(round(hw**0.5))
            if h * w != hw:
                raise HookError(f"cannot infer the map shape of {layer.name} from {hw} queries")
        self.maps[layer.name] = maps.reshape(batch, -1, heads, h, w)
        if self.stop_after_last:
            self._seen.add(layer.name)
            if len(self._seen) == len(self.layers):
                self._seen.clear()
                raise ForwardStopped

    def stacked(self) -> torch.Tensor:
        """All recorded layers' maps, resized, concatenated over heads: (B, G, C, S, S)."""
        missing = [la.name for la in self.layers if la.name not in self.maps]
        if missing:
            raise RuntimeError(f"no maps recorded yet for {missing[:3]}: run a forward first")
        by_size: dict[tuple[int, int], list[str]] = {}
        for la in self.layers:
            by_size.setdefault(tuple(self.maps[la.name].shape[-2:]), []).append(la.name)
        resized: dict[str, torch.Tensor] = {}
        for names in by_size.values():  # one resize per resolution (the maps are independent)
            parts = [self.maps[n] for n in names]
            out = self.resize(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0],
                              self.map_size)
            resized.update(zip(names, out.split([p.shape[2] for p in parts], dim=2),
                                   strict=True))
        if len(by_size) == 1:  # already in forward order
            return out
        return torch.cat([resized[la.name] for la in self.layers], dim=2)
