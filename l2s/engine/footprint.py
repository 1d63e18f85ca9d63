"""What a backbone will take before it is built: its weights' bytes and one forward's FLOPs
(counted on an architecture built on the meta device, ``l2s.engine.loading.load_architecture``),
the memory free on a device, and how fast the device multiplies matrices."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from l2s.engine.backbone import Denoiser


def networks(denoiser: Denoiser) -> list[nn.Module]:
    """The networks a denoiser holds (attributes, and those in lists, e.g. text encoders)."""
    found: dict[int, nn.Module] = {}
    for value in vars(denoiser).values():
        for v in value if isinstance(value, list | tuple) else (value,):
            if isinstance(v, nn.Module):
                found.setdefault(id(v), v)
    return list(found.values())


def weight_bytes(modules: list[nn.Module]) -> int:
    """Bytes of the parameters and buffers of ``modules`` (each tensor once)."""
    seen: dict[int, int] = {}
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            seen.setdefault(id(t), t.numel() * t.element_size())
    return sum(seen.values())


def forward_flops(denoiser: Denoiser) -> int | None:
    """FLOPs of one batch-1 forward of the attention model (torch's FlopCounterMode, run on
    the meta device: shapes only); None when the architecture does not run on meta tensors."""
    import warnings

    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Mismatch dtype" of fused norms on meta
            x = torch.zeros((1, *denoiser.latent_shape), device="meta")
            cond = denoiser.encode_prompt(["a photo"])
            with FlopCounterMode(display=False) as counter:
                denoiser.model_output(x, denoiser.timesteps(2)[0], cond, None)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return None
    return int(counter.get_total_flops())


def free_memory(device: torch.device | str) -> int | None:
    """Bytes a new allocation can take on ``device``: free CUDA memory, else the system's
    available memory (psutil when installed, else /proc/meminfo); None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def matmul_rate(device: torch.device | str, dtype: torch.dtype, seconds: float = 0.2) -> float:
    """FLOP/s of square matrix products on ``device`` in ``dtype``, measured for about
    ``seconds`` (a ceiling: convolutions and attention run slower)."""
    device = torch.device(device)
    n = 2048 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(4):
            a @ a
        sync()
        done += 4
    return done * 2 * n ** 3 / (time.perf_counter() - start)
