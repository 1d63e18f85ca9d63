"""Steer a stock diffusers StableDiffusionPipeline you already have, via its step callback.

With real weights (downloaded once, then offline) and a trained classifier card:

    python examples/steer_diffusers_pipeline.py --model stabilityai/stable-diffusion-2-1 \
        --classifier ~/.cache/l2s/classifiers/sd2.1/card.json

Without arguments it runs offline on tiny random components with the hand-made centroid
loss, just to show the wiring.
"""

import argparse

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from l2s.steering.loop import SteerSettings
from l2s.steering.pipeline import steering_callback

ap = argparse.ArgumentParser()
ap.add_argument("--model", default=None, help="hub id or folder (default: tiny random parts)")
ap.add_argument("--classifier", default=None, help="classifier card.json for --method l2s")
ap.add_argument("--prompt", default="a dog to the right of a teddy bear")
args = ap.parse_args()

if args.model:
    # float16 only on a GPU: a CPU runs (most of) its ops in float32 only
    cuda = torch.cuda.is_available()
    pipe = StableDiffusionPipeline.from_pretrained(
        args.model, torch_dtype=torch.float16 if cuda else torch.float32)
    pipe = pipe.to("cuda" if cuda else "cpu")
    size, steps = None, 50
else:
    from l2s.families.tiny import tiny_sd_components

    unet, vae, te, tok, sch = tiny_sd_components()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=sch, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    size, steps = 32, 10
# Steering needs a DDIM-type scheduler (unscaled latents).
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

callback = steering_callback(
    pipe, args.prompt, method="l2s" if args.classifier else "centroid",
    classifier=args.classifier,
    settings=SteerSettings(steps=steps, iterations=4, step_size=5.0 if args.model else 3000.0))
image = pipe(args.prompt, num_inference_steps=steps, height=size, width=size,
             callback_on_step_end=callback,
             callback_on_step_end_tensor_inputs=["latents"]).images[0]
image.save("steered.png")
for r in callback.stats.steps:
    print(f"step {r.step}: {r.iterations} iterations, loss {r.loss_before:.4f} -> "
          f"{r.loss_after:.4f}, forward {r.forward_ms:.0f} ms, backward {r.backward_ms:.0f} ms")
