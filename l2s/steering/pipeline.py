"""Steer a stock diffusers pipeline (Stable Diffusion, Flux, SD3, ...) through
`callback_on_step_end`.

The pipeline's loop stands in for ``l2s.engine.sampling.denoise``: its callback hands the
same step state to the same :class:`l2s.steering.loop.Steerer` callback. The Denoiser over
the pipeline's components comes from the family that claims its class
(``Family.from_pipeline``), so this module names no family.
"""

from __future__ import annotations

from collections.abc import Sequence

from l2s.engine.backbone import BackboneError, Denoiser
from l2s.engine.registry import family_for_pipeline
from l2s.relations import parse
from l2s.steering.loop import Steerer, SteerSettings
from l2s.steering.losses import RelationLoss


class PipelineSteerer:
    """A `callback_on_step_end` that steers the latents a pipeline hands it.

    diffusers calls it after step i with the latents for step i + 1, so steering starts at
    step 1 (the initial noise is never seen) and runs while i + 1 < the steered-step count.
    Use it with ``callback_on_step_end_tensor_inputs=["latents"]``; the pipeline's
    scheduler must keep its latents unscaled (a DDIM-type one, ``DDIMScheduler``, for SD;
    flow-matching pipelines' Euler scheduler as it comes). ``image_size`` and ``text_len``
    are the call's height/width and max_sequence_length (None: the pipeline's defaults).
    """

    def __init__(self, pipe, prompts: Sequence[str], loss: RelationLoss,
                 settings: SteerSettings, name: str = "pipeline", image_size: int | None = None,
                 text_len: int | None = None) -> None:
        if getattr(pipe.scheduler, "init_noise_sigma", 1.0) != 1.0:
            raise BackboneError(f"{type(pipe.scheduler).__name__} scales its latents; steer with "
                                "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)")
        self.denoiser = pipeline_denoiser(pipe, name, image_size, text_len)
        self.steerer = Steerer(self.denoiser, list(prompts), [parse(p) for p in prompts], loss,
                               settings)

    @property
    def stats(self):
        return self.steerer.stats

    def __call__(self, pipe, i: int, t, callback_kwargs: dict) -> dict:
        ts = pipe.scheduler.timesteps
        step = i + 1
        if step >= len(ts):
            return callback_kwargs
        new = self.steerer({"step": step, "steps": len(ts), "t": ts[step].item(),
                            "latents": callback_kwargs["latents"]})
        if new is not None:
            callback_kwargs["latents"] = new.to(callback_kwargs["latents"].dtype)
        return callback_kwargs


def pipeline_denoiser(pipe, name: str = "pipeline", image_size: int | None = None,
                      text_len: int | None = None) -> Denoiser:
    """The Denoiser over a loaded pipeline's components, from the family that claims its
    class (a class no family claims goes to the fallback family, Stable Diffusion's)."""
    family = family_for_pipeline(type(pipe).__name__)
    if family.from_pipeline is None:
        raise BackboneError(f"the {family.name} family cannot steer a {type(pipe).__name__} "
                            "through its callback: load the model with l2s.load_backbone and "
                            "use l2s.steer")
    return family.from_pipeline(pipe, name, image_size, text_len)


def steering_callback(pipe, prompt: str | Sequence[str], *, method: str = "l2s",
                      classifier: str | None = None, num_images_per_prompt: int = 1,
                      settings: SteerSettings | None = None, model: str = "pipeline",
                      image_size: int | None = None, text_len: int | None = None
                      ) -> PipelineSteerer:
    """Build the callback for ``pipe(prompt, ...)``: the l2s classifier loss (``classifier``
    card, or the registered default of ``model``) or the ``centroid`` baseline.
    ``image_size`` / ``text_len``: the call's height and width / max_sequence_length, when
    not the pipeline's defaults."""
    from l2s.steering.job import build_loss

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
    steerer = PipelineSteerer(pipe, prompts, loss=None, settings=settings or SteerSettings(),
                              name=model, image_size=image_size, text_len=text_len)
    loss, _ = build_loss(method, steerer.denoiser, model, classifier)
    steerer.steerer.loss_fn = loss
    return steerer
