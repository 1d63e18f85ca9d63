"""The one denoiser interface every backbone family implements, and the values it exchanges.

A backbone family (``l2s/families/``: the toy, Stable Diffusion, later Flux / SD3) adapts its
networks to :class:`Denoiser`; sampling, steering, inversion, caching and benchmarks talk only
to this interface, so none of them branches on the family. How to add a family:
``docs/architecture.md``, "Adding a backbone family".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from l2s.engine.schedules import NoiseSchedule, Timestep
from l2s.errors import L2SError

if TYPE_CHECKING:
    from l2s.engine.world import World


class BackboneError(L2SError, RuntimeError):
    """A backbone could not be loaded or used; the message says what to do."""


@dataclass(frozen=True)
class CrossAttnLayer:
    """One attention layer whose image-query x text-key maps the hooks can record."""

    name: str  # module path, e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    heads: int  # attention heads in this layer
    resolution: tuple[int, int]  # (h, w) of its image-query grid at the backbone's image size


@dataclass(frozen=True)
class Conditioning:
    """The text conditioning of a batch: named tensors, as many as the family needs.

    ``batched`` tensors are batch-first (B, ...) and follow the images when a batch is indexed
    (:meth:`select`) or joined (:meth:`cat`, e.g. the CFG batch [uncond; cond]); ``shared``
    ones are the same for every image (e.g. position ids). Every family has ``"states"``:
    (B, T, D), the token states whose T tokens the recorded maps index; the other keys are
    the family's business: SD uses only "states" (B, 77, D); a Flux family adds "pooled"
    (CLIP, (B, 768)) and shared "text_ids" (T, 3); SD3 its joint states and pooled vector.
    """

    batched: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = {k: v.shape[0] for k, v in self.batched.items()}
        if not sizes or len(set(sizes.values())) != 1:
            raise ValueError(f"conditioning needs batch-first tensors of one batch size, "
                             f"got {sizes}")

    def __len__(self) -> int:
        return next(iter(self.batched.values())).shape[0]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.batched[key] if key in self.batched else self.shared[key]

    def select(self, index) -> Conditioning:
        """The conditioning of some images (an index tensor, list or slice)."""
        return Conditioning({k: v[index] for k, v in self.batched.items()}, self.shared)

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Batches joined in order (shared tensors from the first part)."""
        keys = parts[0].batched.keys()
        return Conditioning({k: torch.cat([p.batched[k] for p in parts]) for k in keys},
                            parts[0].shared)


# Receives one layer's attention probabilities (B, heads, Q, T): image queries x text keys,
# softmax over the text tokens, still in the autograd graph when the forward has one.
AttentionSink = Callable[[CrossAttnLayer, torch.Tensor], None]

GUIDANCE_MODES = ("cfg", "embedded", "none")


class Denoiser(ABC):
    """A text-conditioned denoiser seen through the operations l2s needs.

    A family implements the abstract members; the rest (timesteps, predict, step, add_noise,
    prepare_latents) are shared and run through ``self.schedule``. Conventions:

    * Latents are float32 between steps, (B, *latent_shape); ``predict`` casts them to the
      model dtype only at the network input and returns float32.
    * ``t`` is the family's model time, noisiest first from ``timesteps``: integer DDPM
      timesteps for SD and the toy, sigma * 1000 for flow-matching models.
    * ``predict`` returns what ``schedule.step`` consumes: epsilon (DDPM) or velocity (flow);
      CFG mixes it linearly whichever it is.
    """

    name: str  # preset name, hub id or local path it was loaded from
    fingerprint: str  # model id + config/weights hash: keys caches and classifier cards
    image_size: tuple[int, int]  # (H, W) in pixels of generated images
    latent_shape: tuple[int, ...]  # one image's latent, without the batch: (C, h, w) for SD
    schedule: NoiseSchedule  # time grid and deterministic moves (DDPM or rectified flow)
    device: torch.device
    dtype: torch.dtype  # the network's dtype (latents stay float32)
    # How guidance reaches the network: "cfg" (a [uncond; cond] batch mixed by the scale),
    # "embedded" (the scale is a network input, e.g. Flux-dev), "none" (e.g. Flux-schnell).
    guidance_mode: str = "cfg"
    # What a closed-vocabulary model draws and how its images are judged
    # (l2s.engine.world.World); None: open vocabulary.
    world: World | None = None
    # The map layout the published L2S classifiers of this family read (the name of the
    # ReferenceLayout its family declares, e.g. "unet"); None: none are published for it.
    reference_layout: str | None = None
    # The longest text length ``set_text_len`` accepts (e.g. 512 for Flux's T5, FluxPipeline's
    # cap); None: the text length is fixed by the text encoder (CLIP's 77 for SD).
    max_text_len: int | None = None
    # The SDPA kernels this backbone's forwards may use (names of SDPA_BACKENDS, e.g. Flux
    # leaves out "cudnn"); None: PyTorch's own choice. $L2S_SDPA_BACKENDS overrides it.
    sdpa_backends: tuple[str, ...] | None = None

    # --- what a family implements ---------------------------------------------------------
    @property
    @abstractmethod
    def tokenizer(self):
        """The tokenizer whose tokens the recorded maps refer to (a transformers fast
        tokenizer with offset mappings; for multi-encoder models the one the attention
        layers see, e.g. T5 for Flux)."""

    @property
    @abstractmethod
    def attention_model(self) -> nn.Module:
        """The module with diffusers' ``attn_processors`` / ``set_attn_processor`` API."""

    @abstractmethod
    def cross_attention_layers(self) -> list[CrossAttnLayer]:
        """All layers the hooks can record, in forward order, with heads and resolution."""

    @abstractmethod
    def capture_processor(self, layer: CrossAttnLayer, original, sink: AttentionSink):
        """An attention processor for ``layer`` that gives ``sink`` the layer's probabilities
        (B, heads, Q, T) and returns what ``original`` (the processor installed now) would.

        Wrap ``original`` rather than replace it, so LoRA / IP-Adapter processors keep
        working; raise :class:`l2s.engine.hooks.HookError` naming the processor if it cannot
        be wrapped faithfully.
        """

    @abstractmethod
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """Text conditioning for the prompts; "" is the unconditional prompt."""

    @abstractmethod
    def model_output(self, latents: torch.Tensor, t: Timestep, cond: Conditioning,
                     guidance: float | None) -> torch.Tensor:
        """The network's raw output for latents already in the model dtype.

        ``guidance`` is the scale for ``guidance_mode == "embedded"`` families (None: use
        the family's default, e.g. in inversion and map recording), always None otherwise.
        """

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, H, W, 3) float in [0, 1] from clean latents."""

    @abstractmethod
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Clean float32 latents from images (B, H, W, 3) float in [0, 1]."""

    @property
    def known_objects(self) -> tuple[str, ...] | None:
        """The object words its world draws; None: open vocabulary."""
        return None if self.world is None else self.world.objects

    @property
    def text_len(self) -> int:
        """Text tokens every prompt is padded to: the keys each recorded map is softmaxed
        over (a classifier reads maps made over one such key set)."""
        return self.tokenizer.model_max_length

    def set_text_len(self, n: int) -> None:
        """Encode prompts (and record maps) over ``n`` text tokens from now on, e.g. the
        length a classifier's maps were made with; refuses a length this backbone cannot
        encode."""
        if n == self.text_len:
            return
        if self.max_text_len is None:
            raise BackboneError(f"{self.name} encodes prompts as {self.text_len} text tokens, "
                                f"fixed by its text encoder; maps over {n} tokens cannot come "
                                "from it")
        if not 1 <= n <= self.max_text_len:
            raise BackboneError(f"{self.name} encodes prompts as at most {self.max_text_len} "
                                f"text tokens, not {n}")
        self.tokenizer.model_max_length = n  # what encode_prompt pads to and the hooks read

    def reference_processors(self) -> dict | None:
        """Explicit-softmax processors for every attention layer, for the reference-style
        baseline of ``l2s speed``; None: diffusers' AttnProcessor (UNets)."""
        return None

    # --- shared, through the schedule -----------------------------------------------------
    def timesteps(self, num_steps: int) -> list[Timestep]:
        """The sampling timesteps, noisiest first; more steps than the schedule's training
        timesteps is a ConfigError (was: a ValueError from diffusers, or for a flow a grid
        of 10^20 sigmas built until memory ran out)."""
        from l2s.errors import ConfigError

        most = self.schedule.max_steps
        if most is not None and num_steps > most:
            raise ConfigError(f"--steps {num_steps}: {self.name} was trained on {most} "
                              f"timesteps, so it samples in at most {most} steps: pass --steps "
                              f"{most} or fewer")
        return self.schedule.timesteps(num_steps)

    def predict(self, latents: torch.Tensor, t: Timestep, cond: Conditioning,
                guidance: float | None = None) -> torch.Tensor:
        """The schedule's prediction (epsilon or velocity, float32) for one batch.

        ``guidance`` reaches the network only for ``guidance_mode == "embedded"``.
        """
        # Every eager forward of sampling, steering and inversion passes here (the compiled
        # steering forward, l2s.engine.compiled, uses the same two calls). PyTorch picks the
        # SDPA kernel when the forward runs and autograd records that kernel's own backward
        # node (e.g. ScaledDotProductCudnnAttentionBackward0), so a steering iteration's
        # backward, taken after this returns, runs the kernels chosen here.
        with self.attention_kernels():
            out = self.network_output(latents, t, cond, guidance)
        return self.schedule.to_prediction(out.float(), latents.float(), t)

    def network_output(self, latents: torch.Tensor, t, cond: Conditioning,
                       guidance: float | None = None) -> torch.Tensor:
        """The network's raw output for one batch (run it inside ``attention_kernels()``);
        ``guidance`` reaches the network only for ``guidance_mode == "embedded"``. ``t``: a
        Python number, or a 0-d tensor (the compiled path's)."""
        g = guidance if self.guidance_mode == "embedded" else None
        return self.model_output(latents.to(self.dtype), t, cond, g)

    def attention_kernels(self) -> contextlib.AbstractContextManager:
        """The context allowing only this backbone's SDPA kernels (``sdpa_backends``, or
        $L2S_SDPA_BACKENDS)."""
        return sdpa_kernels(resolve_sdpa_backends(self.sdpa_backends))

    def step(self, pred: torch.Tensor, t: Timestep | None, t_next: Timestep | None,
             latents: torch.Tensor) -> torch.Tensor:
        """One deterministic move from t to t_next (None: the clean end), float32.

        Runs in either direction: inversion calls it with t_next noisier than t.
        """
        return self.schedule.step(pred.float(), t, t_next, latents.float())

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: Timestep) -> torch.Tensor:
        """A forward-process sample at t from clean latents and Gaussian noise."""
        return self.schedule.add_noise(x0, noise, t)

    def prepare_latents(self, batch: int, generator: torch.Generator | None) -> torch.Tensor:
        """Initial Gaussian latents (B, *latent_shape), float32, drawn on the CPU (so a seed
        gives the same noise on every device)."""
        x = torch.randn((batch, *self.latent_shape), generator=generator, device="cpu",
                        dtype=torch.float32)
        return x.to(self.device)


# SDPA kernels by the names of torch.backends.cuda's switches (enable_<name>_sdp).
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "mem_efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
SDPA_ENV = "L2S_SDPA_BACKENDS"


def resolve_sdpa_backends(default: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """The SDPA kernels a forward may use: $L2S_SDPA_BACKENDS ("flash,mem_efficient", or
    "all" for PyTorch's own choice) when set, else the backbone's ``default``."""
    value = os.environ.get(SDPA_ENV, "").strip()
    if not value:
        return default
    if value == "all":
        return None
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in SDPA_BACKENDS]
    if unknown or not names:
        raise BackboneError(f"{SDPA_ENV}={value!r}: use a comma-separated list of "
                            f"{', '.join(SDPA_BACKENDS)}, or 'all' for PyTorch's own choice")
    return names


def sdpa_kernels(names: tuple[str, ...] | None) -> contextlib.AbstractContextManager:
    """A context allowing only these SDPA kernels (None: PyTorch's switches untouched);
    torch's switches are process-wide and come back as they were on exit, also on errors."""
    if names is None:
        return contextlib.nullcontext()
    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[n]) for n in names])


def vae_scale(vae: nn.Module | None) -> int:
    """Pixels per latent cell: 2^(VAE levels - 1); 1 without a VAE (a pixel-space model)."""
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


def checked_image_size(size: int | Sequence[int], multiple: int) -> tuple[int, int]:
    """(H, W) from a side or a pair, refused unless both are multiples of ``multiple`` px
    (what the adapter's VAE, patching and down-sampling need)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if size[0] % multiple or size[1] % multiple:
        raise BackboneError(f"image size {size[0]}x{size[1]} is not a multiple of {multiple} "
                            f"px, which this backbone needs; pick e.g. "
                            f"{(size[0] // multiple) * multiple or multiple}")
    return size


def freeze(*modules: nn.Module | None) -> None:
    """Inference only: no gradients into the weights (steering differentiates the latent)."""
    for m in modules:
        if m is not None:
            m.requires_grad_(False).eval()


def _incidental_config_key(key: str) -> bool:
    return key.startswith("_") or key.endswith("_version") or key in ("dtype", "torch_dtype")


def config_fingerprint(*modules: nn.Module | None) -> str:
    """A short stable hash of a model's identity: its configs and a sample of its weights.

    The name it was loaded by is left out on purpose: the same weights reached as a preset,
    a hub id or a folder share caches and classifiers.
    """
    h = hashlib.sha256(b"l2s-backbone")
    for m in modules:
        if m is None:
            continue
        cfg = getattr(m, "config", None)
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
        # Version stamps and the load dtype say how, not what, was loaded: transformers writes
        # "transformers_version" and "dtype" into to_dict(), so they would split caches
        # between machines with other library versions or a GPU (fp16).
        cfg = {k: v for k, v in cfg.items() if not _incidental_config_key(k)}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
        # A few values of every parameter tensor: cheap, yet changes when weights change.
        for pname, p in m.named_parameters():
            h.update(pname.encode())
            # Rounded to fp16 so a model loaded in fp16 or fp32 gets the same fingerprint.
            h.update(p.detach().flatten()[:8].half().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
