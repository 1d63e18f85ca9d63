"""Which SDPA kernels a backbone's forwards may use (``Denoiser.sdpa_backends``,
$L2S_SDPA_BACKENDS): Flux never runs cuDNN attention, whose backward crashed its steering
iterations on torch 2.11 + CUDA 13 (docs/design.md). PyTorch's SDPA switches are plain
process-wide flags on CPU builds too, so what the attention sees is observable here."""

import contextlib

import pytest
import torch

from l2s.engine.backbone import BackboneError
from l2s.engine.loading import load_backbone
from l2s.families.flux import FluxDenoiser
from l2s.families.mmdit_tiny import TINY_T5_TOKENS, tiny_flux_pipeline, tiny_sd3_pipeline
from l2s.families.sd3 import SD3Denoiser
from l2s.relations import parse
from l2s.steering.loop import SteerSettings, steer_latents
from l2s.steering.losses import CentroidLoss

FLAGS = {"cudnn": torch.backends.cuda.cudnn_sdp_enabled,
         "flash": torch.backends.cuda.flash_sdp_enabled,
         "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled,
         "math": torch.backends.cuda.math_sdp_enabled}


PROMPT = "a dog to the left of a cat"


@pytest.fixture(scope="module")
def flux():
    p = tiny_flux_pipeline()
    return FluxDenoiser(p.transformer, p.vae, p.text_encoder, p.tokenizer, p.text_encoder_2,
                        p.tokenizer_2, dict(p.scheduler.config), name="tiny-flux",
                        max_sequence_length=TINY_T5_TOKENS)


@pytest.fixture(scope="module")
def sd3():
    p = tiny_sd3_pipeline()
    return SD3Denoiser(p.transformer, p.vae, [p.text_encoder, p.text_encoder_2, p.text_encoder_3],
                       [p.tokenizer, p.tokenizer_2, p.tokenizer_3], dict(p.scheduler.config),
                       name="tiny-sd3", max_sequence_length=TINY_T5_TOKENS)


@contextlib.contextmanager
def attention_sees(den):
    """The SDPA switches each attention module sees when its forward starts (hooks on the
    modules, so they see the capture processors' forwards too)."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda *_: seen.append({k: f() for k, f in
                                                                 FLAGS.items()}))
             for name, m in den.transformer.named_modules() if name.endswith(".attn")]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def steer(den, truncate: bool = True):
    """One steered step of two iterations (forward with the latent requiring grad, the
    backward, the update), then the plain steps."""
    settings = SteerSettings(steps=2, guidance=0.0, steer_until=1, iterations=2,
                             step_size=1.0, truncate_forward=truncate)
    x = den.prepare_latents(1, torch.Generator().manual_seed(0))
    _, stats = steer_latents(den, [PROMPT], [parse(PROMPT)], CentroidLoss(margin=10.0),
                             settings, x)
    assert stats.steps[0].iterations >= 1  # a gradient was taken


@pytest.mark.parametrize("truncate", [True, False], ids=["truncated", "full-forward"])
def test_flux_steering_never_lets_attention_use_cudnn_and_restores_the_switches(
        flux, truncate, monkeypatch):
    # Catches: Flux forwards (the steered ones above all) free to pick cuDNN attention, the
    # H200 crash; and switches left changed after l2s returns (a truncated forward ends in
    # an exception inside the context), which would silently change the user's own code.
    monkeypatch.delenv("L2S_SDPA_BACKENDS", raising=False)
    before = {k: f() for k, f in FLAGS.items()}
    assert before["cudnn"]  # PyTorch's default: all kernels allowed
    with attention_sees(flux) as seen:
        steer(flux, truncate)
    assert seen and all(not s["cudnn"] for s in seen)
    assert all(s["flash"] and s["mem_efficient"] and s["math"] for s in seen)
    assert {k: f() for k, f in FLAGS.items()} == before


def test_sd3_keeps_pytorchs_kernel_choice(sd3, monkeypatch):
    # Catches: the Flux exclusion applied to every family (SD3.5 ran fine with cuDNN).
    monkeypatch.delenv("L2S_SDPA_BACKENDS", raising=False)
    with attention_sees(sd3) as seen:
        sd3.predict(sd3.prepare_latents(1, None), sd3.timesteps(2)[0],
                    sd3.encode_prompt([PROMPT]))
    assert seen and all(s["cudnn"] for s in seen)


def fused_backward_nodes(out: torch.Tensor) -> set[str]:
    """Names of the fused-SDPA backward nodes in the autograd graph behind ``out``."""
    names, todo, done = set(), [out.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in done:
            continue
        done.add(fn)
        if "ScaledDotProduct" in fn.name():
            names.add(fn.name())
        todo.extend(f for f, _ in fn.next_functions)
    return names


def test_the_kernel_chosen_in_the_forward_is_the_one_the_backward_runs(flux, monkeypatch):
    monkeypatch.delenv("L2S_SDPA_BACKENDS", raising=False)
    # The steering backward (torch.autograd.grad) runs after predict has returned, outside
    # the context; it is governed all the same because autograd records the chosen kernel's
    # own backward node. Catches: a selection that would only hold while the context is open
    # (CPU analogue: the fused CPU flash kernel excluded in the forward is absent from the
    # graph the backward walks).
    x = flux.prepare_latents(1, torch.Generator().manual_seed(0)).requires_grad_(True)
    t, cond = flux.timesteps(2)[0], flux.encode_prompt([PROMPT])
    with torch.enable_grad():
        assert fused_backward_nodes(flux.predict(x, t, cond)) == {
            "ScaledDotProductFlashAttentionForCpuBackward0"}
        flux.sdpa_backends = ("math",)
        try:
            out = flux.predict(x, t, cond)
        finally:
            del flux.sdpa_backends  # back to the class's
    assert fused_backward_nodes(out) == set()
    (g,) = torch.autograd.grad(out.sum(), x)  # runs with every switch on again
    assert g.abs().sum() > 0


def test_environment_variable_overrides_the_backbone_and_is_checked(flux, monkeypatch):
    # Catches: no way for a user to undo (or extend) the exclusion on a stack where cuDNN
    # works or another kernel breaks; and a typo silently ignored.
    x, t = flux.prepare_latents(1, None), flux.timesteps(2)[0]
    cond = flux.encode_prompt([PROMPT])
    for value, expect in [("all", {"cudnn": True, "flash": True}),
                          ("flash, math", {"cudnn": False, "mem_efficient": False,
                                           "flash": True, "math": True})]:
        monkeypatch.setenv("L2S_SDPA_BACKENDS", value)
        with attention_sees(flux) as seen:
            flux.predict(x, t, cond)
        assert seen and all({k: s[k] for k in expect} == expect for s in seen), value
    monkeypatch.setenv("L2S_SDPA_BACKENDS", "cudnn,flsh")
    with pytest.raises(BackboneError, match="L2S_SDPA_BACKENDS='cudnn,flsh'.*mem_efficient"):
        load_backbone("toy")  # refused before anything loads


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flux_on_cuda_in_bf16_records_no_cudnn_attention_and_its_backward_runs(monkeypatch):
    # Catches, where it matters: a steering forward on CUDA that still records cuDNN's
    # attention (whose backward crashed on torch 2.11 + CUDA 13), or one whose backward fails.
    monkeypatch.delenv("L2S_SDPA_BACKENDS", raising=False)
    p = tiny_flux_pipeline()
    den = FluxDenoiser(p.transformer.to("cuda", torch.bfloat16), p.vae.to("cuda"),
                       p.text_encoder.to("cuda"), p.tokenizer, p.text_encoder_2.to("cuda"),
                       p.tokenizer_2, dict(p.scheduler.config), name="tiny-flux",
                       max_sequence_length=TINY_T5_TOKENS)
    x = den.prepare_latents(1, torch.Generator().manual_seed(0)).requires_grad_(True)
    with torch.enable_grad():
        out = den.predict(x, den.timesteps(2)[0], den.encode_prompt([PROMPT]))
    nodes = fused_backward_nodes(out)
    assert nodes and not any("Cudnn" in n for n in nodes), nodes
    (g,) = torch.autograd.grad(out.sum(), x)
    torch.cuda.synchronize()
    assert torch.isfinite(g).all() and g.abs().sum() > 0
