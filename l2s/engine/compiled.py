"""torch.compile of the steering forward (opt-in, ``--compile MODE``): fixed shapes, maps only.

The compiled region is one steering forward that returns the recorded maps and drops the
network's output, so the compiler's dead-code elimination removes every layer after the last
recorded one: the truncation ``AttentionRecorder.truncated`` gets eagerly by raising, which
inside a compiled region would end the graph and send the whole forward back to eager.
AOTAutograd compiles the backward of the same region, so the iteration's forward and
backward through the network both run compiled; the classifier loss stays eager.

Shapes stay fixed (``dynamic=False``) so a few compilations serve a whole run: the latent
batch is padded to a power of two with detached copies of its first row (their maps are
dropped and they take no gradient), and the timestep enters as a tensor, not as a Python
number the graph would be specialised (and recompiled) on at every step. The recorder has no host
read on this path, so "reduce-overhead" (CUDA graphs: static input buffers, no syncs inside)
can capture it.
"""

from __future__ import annotations

import torch

from l2s.engine.backbone import Conditioning, Denoiser
from l2s.engine.hooks import AttentionRecorder
from l2s.engine.schedules import Timestep
from l2s.errors import ConfigError

# "off": eager. The others are torch.compile modes: "default" (Inductor kernels),
# "reduce-overhead" (Inductor + CUDA graphs: one launch per graph, for launch-bound GPUs),
# "max-autotune-no-cudagraphs" (kernel autotuning, long compiles). On a CPU every mode
# compiles the same scalar C++ code (see _compiled_forward).
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune-no-cudagraphs")

_compiled: dict[tuple[str, str], object] = {}  # one torch.compile wrapper per (mode, device)


def check_compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise ConfigError(f"unknown compile mode {mode!r}: use {', '.join(COMPILE_MODES)}")
    return mode


def _maps_forward(denoiser: Denoiser, rec: AttentionRecorder, z: torch.Tensor, t: torch.Tensor,
                  cond: Conditioning, guidance: float | None) -> torch.Tensor:
    """The recorded maps (B, G, C, S, S) of one forward; the network's output is unused."""
    denoiser.network_output(z, t, cond, guidance)
    return rec.stacked()


def _compiled_forward(mode: str, device: torch.device):
    key = (mode, device.type)
    if key not in _compiled:
        if device.type == "cpu":
            # Inductor's vectorised C++ code (torch 2.13) gets the toy UNet's batch-1 backward
            # wrong (a directional derivative of -0.007 against -0.020 by finite differences
            # and eager; the forward is right, and so are the aot_eager backend and the scalar
            # code): compile scalar code. CUDA graphs and autotuning are GPU modes anyway.
            _compiled[key] = torch.compile(_maps_forward, dynamic=False,
                                           options={"cpp.simdlen": 1})
        else:
            _compiled[key] = torch.compile(_maps_forward, dynamic=False,
                                           mode=None if mode == "default" else mode)
    return _compiled[key]


def compiled_maps(denoiser: Denoiser, rec: AttentionRecorder, z: torch.Tensor, t: Timestep,
                  cond: Conditioning, weights: torch.Tensor, guidance: float | None, *,
                  rows: int, mode: str) -> torch.Tensor:
    """The maps (R, G, C, S, S) of latents z (R, ...) with token weights (R, T, G), from the
    compiled forward of a padded batch: the next power of two >= R, at most ``rows`` (the
    step's batch), so a batch whose images stop one by one compiles log2(rows) + 1 shapes
    at most and forwards under twice the rows it needs (padding rows are dropped)."""
    r = z.shape[0]
    n = min(rows, 1 << (r - 1).bit_length())
    if r < n:
        fill = torch.cat((torch.arange(r, device=z.device),
                          torch.zeros(n - r, dtype=torch.long, device=z.device)))
        z = torch.cat((z, z[:1].detach().expand(n - r, *z.shape[1:])))
        cond, weights = cond.select(fill), weights[fill]
    rec.set_weights(weights)
    if mode == "reduce-overhead":  # the previous iteration's graph outputs are dead now
        torch.compiler.cudagraph_mark_step_begin()
    # The SDPA kernels Denoiser.predict allows: the compiled graph and its backward are
    # traced with them. The timestep is filled on the device (a tensor made from the Python
    # number would be a copy from the host: a GPU sync at every iteration).
    with denoiser.attention_kernels():
        maps = _compiled_forward(mode, z.device)(
            denoiser, rec, z, torch.full((), t, device=z.device), cond, guidance)
    return maps[:r]
