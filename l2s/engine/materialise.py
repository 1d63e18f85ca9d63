"""Random-weight networks built on the meta device and materialised once, where they run.

A 12B-parameter transformer built the ordinary way is first allocated in float32 on the CPU
(48 GB) and then copied; here the module tree is built with meta parameters (no memory),
and each parameter is then allocated once, directly in the target dtype on the target
device, and filled there. Buffers (position ids, fixed embeddings) are built for real, as
the constructor computes them, and moved. Speed work only: the weights mean nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


@torch.no_grad()
def materialise(factory: Callable[[], nn.Module], device: torch.device | str,
                dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """``factory()`` with random weights, floating parameters in ``dtype`` on ``device``.

    Matrices get N(0, 1/fan_in) (each layer keeps its input's scale, so deep random stacks
    stay finite in bf16), 1-d ``bias`` vectors zeros, other 1-d vectors (norm scales) ones.
    Tied parameters stay tied. The module is frozen (``requires_grad_(False)``) and in eval.
    """
    from accelerate import init_empty_weights

    device = torch.device(device)
    with init_empty_weights(include_buffers=False):
        module = factory()
    if hasattr(module, "tie_weights"):  # transformers skips tying on meta tensors
        module.tie_weights()
    gen = torch.Generator(device).manual_seed(seed)
    made: dict[int, nn.Parameter] = {}
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                dt = dtype if p.is_floating_point() else p.dtype
                x = torch.empty(p.shape, device=device, dtype=dt)
                if p.ndim >= 2:
                    x.normal_(0.0, (p[0].numel()) ** -0.5, generator=gen)
                elif name.endswith("bias"):
                    x.zero_()
                else:
                    x.fill_(1.0)
                made[id(p)] = nn.Parameter(x, requires_grad=False)
            mod._parameters[name] = made[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = b.to(device)
    return module.eval()
