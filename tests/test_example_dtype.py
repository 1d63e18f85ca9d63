"""examples/steer_diffusers_pipeline.py with real weights: the dtype it loads them in."""

import runpy
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "steer_diffusers_pipeline.py"


class _Loaded(Exception):
    pass


@pytest.mark.parametrize("cuda", [False, True])
def test_the_diffusers_example_loads_float16_only_with_cuda(cuda, monkeypatch):
    """Catches the example loading float16 weights onto a CPU (slow or unsupported ops there)."""
    seen = {}

    def from_pretrained(model, **kw):
        seen.update(kw, model=model)
        raise _Loaded  # stop before anything else: no weights here

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", from_pretrained)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--model", "some/sd"])
    with pytest.raises(_Loaded):
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert seen["model"] == "some/sd"
    assert seen["torch_dtype"] == (torch.float16 if cuda else torch.float32)
