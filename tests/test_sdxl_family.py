"""The SDXL family on a tiny random SDXL built here: diffusers parity, capture, gradient,
steering, inversion, token alignment of the shipped suites, loading, speed and training.

The tiny model keeps what makes SDXL SDXL: a UNet with ``addition_embed_type="text_time"``
and no attention at its first level, two CLIP encoders of different widths (the second with
a projection, giving the pooled vector), tokenizers from one vocabulary whose second pads
with "!" as the hub's tokenizer_2 does. Nothing comes from the hub.
"""

import copy
import json
import re

import numpy as np
import pytest
import torch

from l2s.engine.hooks import AttentionRecorder
from l2s.engine.sampling import denoise, sample, to_uint8
from l2s.engine.tokenizers import build_clip_tokenizer
from l2s.engine.tokens import pair_tokens
from l2s.families.sdxl import SDXL_BASE, SDXLDenoiser
from l2s.families.tiny import TINY_WORDS
from l2s.inversion.loop import ddim_invert, reconstruct

PROMPT = "a dog to the left of a cat"
SIZE = 32  # px: 16x16 latents (VAE factor 2), maps at 8x8 and 4x4


def sdxl_tokenizers(words):
    """(tokenizer, tokenizer_2): one vocabulary and merges, the second padding with "!"."""
    tok = build_clip_tokenizer(words)
    tok2 = copy.deepcopy(tok)
    tok2.pad_token = "!"
    return tok, tok2


def tiny_sdxl_pipeline(seed: int = 0, force_zeros: bool = True):
    """A StableDiffusionXLPipeline of tiny random components, about 600k parameters."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok, tok2 = sdxl_tokenizers(TINY_WORDS)

    def clip(t, hidden, projection):
        return CLIPTextConfig(
            vocab_size=len(t), hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=2, num_attention_heads=4, projection_dim=projection,
            max_position_embeddings=77, hidden_act="gelu", bos_token_id=t.bos_token_id,
            eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id)

    # Widths differ (32 and 48) so the feature-axis join has one right order.
    te, te2 = CLIPTextModel(clip(tok, 32, 32)), CLIPTextModelWithProjection(clip(tok2, 48, 16))
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 32), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4),
        use_linear_projection=True, cross_attention_dim=32 + 48,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, layers_per_block=1, sample_size=SIZE, scaling_factor=0.13025)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
        unet=unet, scheduler=DDIMScheduler(**SDXL_BASE["scheduler"]),
        force_zeros_for_empty_prompt=force_zeros, add_watermarker=False)


def denoiser(pipe) -> SDXLDenoiser:
    return SDXLDenoiser(pipe.unet, [pipe.text_encoder, pipe.text_encoder_2],
                        [pipe.tokenizer, pipe.tokenizer_2], pipe.scheduler, pipe.vae,
                        name="tiny-sdxl", zero_uncond=pipe.config.force_zeros_for_empty_prompt)


@pytest.fixture(scope="module")
def pipe():
    return tiny_sdxl_pipeline()


@pytest.fixture(scope="module")
def den(pipe):
    return denoiser(pipe)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, pipe):
    """The tiny pipeline saved in diffusers layout, as a hub snapshot is."""
    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    pipe.save_pretrained(path)
    return path


# --- plain generation equals the pipeline --------------------------------------------------
@pytest.mark.parametrize("force_zeros", [True, False], ids=["zero-uncond", "encoded-uncond"])
def test_plain_generation_equals_stable_diffusion_xl_pipeline(force_zeros, pipe):
    """Catches a wrong unconditional branch (SDXL base's is zeros, not the encoded ""), the
    encoders' states joined in the wrong order or from the wrong layer, a missing pooled
    vector or size ids, and any drift from the pipeline's DDIM loop."""
    p = pipe if force_zeros else tiny_sdxl_pipeline(force_zeros=False)
    den = denoiser(p)
    run = dict(height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=5.0)
    x = den.prepare_latents(1, torch.Generator().manual_seed(0))
    ours = denoise(den, x, den.encode_prompt([PROMPT]), steps=3, guidance=5.0)
    ref = p(PROMPT, output_type="latent", generator=torch.Generator().manual_seed(0),
            **run).images
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)  # float noise
    img = sample(den, [PROMPT], steps=3, guidance=5.0,
                 generator=torch.Generator().manual_seed(0))
    ref_img = p(PROMPT, output_type="np", generator=torch.Generator().manual_seed(0),
                **run).images
    diff = to_uint8(img).astype(int) - (ref_img * 255).round().astype(int)
    assert abs(diff).max() <= 1  # within one 8-bit level


def test_unconditional_prompt_is_zeros_and_size_ids_follow_the_image(den):
    """Catches encoding "" for SDXL base (trained with zeroed dropped captions) and size ids
    that do not say the generated size."""
    cond = den.encode_prompt(["", PROMPT])
    assert cond["states"].shape == (2, 77, 32 + 48) and cond["pooled"].shape == (2, 16)
    assert not cond["states"][0].any() and not cond["pooled"][0].any()
    assert cond["states"][1].abs().sum() > 0
    assert cond["time_ids"].tolist() == [[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2
    wide = SDXLDenoiser(den.unet, [den.text_encoder, den.text_encoder_2],
                        [den.tokenizer, den.tokenizer_2], den.scheduler, den.vae,
                        name="wide", image_size=(32, 64))
    assert wide.encode_prompt([PROMPT])["time_ids"].tolist() == [[32, 64, 0, 0, 32, 64]]


# --- capture --------------------------------------------------------------------------------
def test_maps_equal_an_independent_softmax_of_each_layers_projections(den):
    """Catches maps over the wrong keys (one encoder's features only, the pooled vector) or
    the wrong heads: each recorded map is recomputed from the layer's own to_q / to_k on the
    inputs it got, softmax(q k^T / sqrt(d)) over the 77 shared token positions."""
    dog, cat = pair_tokens(den.tokenizer, PROMPT, "dog", "cat")
    groups = [list(dog.indices), list(cat.indices)]
    layers = den.cross_attention_layers()
    # down 1 + 2, mid 2, up 4 + 2: forward order, no attention at the first level
    assert [la.resolution for la in layers] == [(8, 8)] + [(4, 4)] * 8 + [(8, 8)] * 2
    inputs, hooks = {}, []
    for la in layers:
        def grab(module, args, kwargs, name=la.name):
            inputs[name] = (args[0] if args else kwargs["hidden_states"],
                            kwargs["encoder_hidden_states"])
        hooks.append(den.unet.get_submodule(la.name).register_forward_pre_hook(
            grab, with_kwargs=True))
    cond = den.encode_prompt([PROMPT])
    x = den.prepare_latents(1, torch.Generator().manual_seed(0))
    try:
        with torch.no_grad(), AttentionRecorder(den, layers, groups) as rec:
            den.predict(x, den.timesteps(4)[1], cond)
    finally:
        for h in hooks:
            h.remove()
    for la in layers:
        attn = den.unet.get_submodule(la.name)
        hidden, context = inputs[la.name]
        assert context.shape == (1, 77, 80)  # both encoders' features at every position
        q = attn.to_q(hidden).unflatten(-1, (la.heads, -1)).transpose(1, 2)  # (B, h, Q, d)
        k = attn.to_k(context).unflatten(-1, (la.heads, -1)).transpose(1, 2)  # (B, h, T, d)
        probs = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)  # (B, h, Q, 77)
        want = torch.stack([probs[..., g].mean(-1) for g in groups], dim=1)  # (B, G, h, Q)
        torch.testing.assert_close(rec.maps[la.name], want.unflatten(-1, la.resolution),
                                   rtol=1e-5, atol=1e-6)


def test_gradient_of_a_map_loss_reaches_the_latent(den):
    """Catches maps detached from the graph (steering would silently do nothing)."""
    dog, cat = pair_tokens(den.tokenizer, PROMPT, "dog", "cat")
    layers = den.cross_attention_layers()
    x = den.prepare_latents(1, torch.Generator().manual_seed(0)).requires_grad_(True)
    with torch.enable_grad(), AttentionRecorder(
            den, layers, [list(dog.indices), list(cat.indices)], keep_grad=True) as rec:
        den.predict(x, den.timesteps(4)[0], den.encode_prompt([PROMPT]))
        maps = rec.stacked()
        heads = sum(la.heads for la in layers)
        assert maps.shape == (1, 2, heads, 16, 16)
        torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(1, 2, heads))
        (grad,) = torch.autograd.grad(maps[:, 0, :, :, :8].sum(), x)
    assert grad.abs().sum() > 0
    assert all(type(p).__name__ == "AttnProcessor2_0"
               for p in den.unet.attn_processors.values())  # the originals are back


def test_pipeline_callback_steers_a_stable_diffusion_xl_pipeline(pipe):
    """Catches the family's from_pipeline missing or building the wrong adapter: a stock
    StableDiffusionXLPipeline (DDIM scheduler) steered through callback_on_step_end gives
    another image than the same call without the callback."""
    from l2s.steering.loop import SteerSettings
    from l2s.steering.pipeline import steering_callback

    def run(cb):
        return pipe(PROMPT, num_inference_steps=4, guidance_scale=5.0, height=SIZE, width=SIZE,
                    output_type="np", callback_on_step_end=cb,
                    callback_on_step_end_tensor_inputs=["latents"],
                    generator=torch.Generator().manual_seed(0)).images

    plain = run(None)
    cb = steering_callback(pipe, PROMPT, method="centroid",
                           settings=SteerSettings(steps=4, steer_until=3, iterations=2,
                                                  step_size=3000.0))
    assert isinstance(cb.denoiser, SDXLDenoiser) and cb.denoiser.zero_uncond
    steered = run(cb)
    assert plain.shape == steered.shape == (1, SIZE, SIZE, 3)
    assert cb.stats and not np.allclose(steered, plain)


# --- inversion ------------------------------------------------------------------------------
def test_inversion_round_trip_on_the_tiny_sdxl():
    """Catches inversion and sampling disagreeing on conditioning (pooled vector, size ids)
    or timesteps: fixed-point DDIM inversion of a latent, then sampling from it with the
    same prompt, gives the latent back (to float error), which plain DDIM inversion does not.

    A random UNet's epsilon swings far more with its input than a trained one's, and the
    fixed-point iteration then diverges; its output layer is scaled down (every other
    weight as built) so the iteration converges as it does for a trained model."""
    p = tiny_sdxl_pipeline()
    with torch.no_grad():
        p.unet.conv_out.weight.mul_(0.05)
        p.unet.conv_out.bias.mul_(0.05)
    den = denoiser(p)
    cond = den.encode_prompt([PROMPT])
    x0 = torch.randn(1, *den.latent_shape, generator=torch.Generator().manual_seed(1))
    traj = ddim_invert(den, x0, cond, steps=10, fixed_point=5)
    assert traj.shape == (10, 1, 4, SIZE // 2, SIZE // 2)
    torch.testing.assert_close(reconstruct(den, traj[0], cond, steps=10), x0,
                               rtol=0, atol=1e-5)
    rough = reconstruct(den, ddim_invert(den, x0, cond, steps=10)[0], cond, steps=10)
    assert (rough - x0).abs().max() > 1e-2


# --- token alignment ------------------------------------------------------------------------
def _suite_prompts():
    from l2s.bench.suites import suite_names, suite_prompts

    shipped = [s for s in ("geneval", "compbench-spatial", "multirel") if s in suite_names()]
    assert len(shipped) == 3
    return [p for s in shipped for p in suite_prompts(s, None, 0)]


def test_token_alignment_of_every_shipped_suite_prompt_is_shared_by_both_tokenizers():
    """Catches the claim the maps rest on failing: for every prompt of the shipped suites,
    both tokenizers give the same pieces at the same positions (only padding differs), and
    each steered object's positions spell that object, inside the 77 tokens."""
    from l2s.engine.tokens import triplet_tokens

    prompts = _suite_prompts()
    words = sorted({w for p in prompts for w in re.findall(r"[a-z]+", p.prompt.lower())})
    tok, tok2 = sdxl_tokenizers(words)
    steered = 0
    for bp in prompts:
        ids = tok(bp.prompt, padding="max_length", max_length=77).input_ids
        ids2 = tok2(bp.prompt, padding="max_length", max_length=77).input_ids
        n = len(tok(bp.prompt).input_ids)
        assert ids[:n] == ids2[:n] and ids[n:] == [tok.pad_token_id] * (77 - n)
        assert ids2[n:] == [tok2.pad_token_id] * (77 - n) != ids[n:]
        for trip in bp.triplets:
            for a, b in zip(triplet_tokens(tok, bp.prompt, trip),
                            triplet_tokens(tok2, bp.prompt, trip), strict=True):
                assert a.indices == b.indices and a.pieces == b.pieces
                assert 0 < min(a.indices) and max(a.indices) < n - 1  # not BOS / EOS
                assert "".join(a.pieces).replace("</w>", "") == a.phrase.replace(" ", "")
            steered += 1
    assert steered >= 300 + 100 + 200  # compbench, geneval position, multirel at least


# --- loading, CLI ---------------------------------------------------------------------------
def test_a_diffusers_sdxl_folder_loads_as_the_family_and_matches_the_pipeline(folder, pipe):
    """Catches the folder going to another family, force_zeros_for_empty_prompt not read
    from model_index.json, or the loader's components differing from the pipeline's."""
    from l2s.engine.loading import load_backbone
    from l2s.engine.registry import steer_defaults

    den = load_backbone(str(folder), device="cpu")
    assert isinstance(den, SDXLDenoiser) and den.zero_uncond
    assert den.image_size == (SIZE, SIZE)
    assert steer_defaults(str(folder)).guidance == 5.0  # an SDXL folder gets sdxl's defaults
    ours = sample(den, [PROMPT], steps=2, guidance=5.0,
                  generator=torch.Generator().manual_seed(0))
    ref = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=5.0,
               output_type="pt", generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(ours, ref.permute(0, 2, 3, 1), rtol=1e-4, atol=1e-5)


def test_cli_models_lists_sdxl():
    from typer.testing import CliRunner

    from l2s.cli import app

    r = CliRunner().invoke(app, ["models", "--json"])
    assert r.exit_code == 0, r.output
    row = {m["name"]: m for m in json.loads(r.stdout)}["sdxl"]
    assert row["family"] == "sdxl" and row["random_weights"] and row["image_size"] == 1024
    assert row["repo_id"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert row["defaults"]["steps"] == 50 and row["defaults"]["guidance"] == 5.0
    assert "not yet tuned" in row["description"]


def test_cli_steer_moves_the_latent_of_a_tiny_sdxl_folder(tmp_path, folder):
    """Catches steering that runs but changes nothing on SDXL (maps off the graph, the
    update lost): the steered image differs from the plain one of the same seed."""
    from PIL import Image
    from typer.testing import CliRunner

    from l2s.cli import app

    runner = CliRunner()
    common = [PROMPT, "--model", str(folder), "--steps", "4", "--json"]
    r = runner.invoke(app, ["steer", *common, "--method", "centroid", "--steer-until", "2",
                            "--iterations", "2", "--step-size", "50",
                            "--out", str(tmp_path / "steer")])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert [s["iterations"] for s in rep["steps"]] == [2, 2]
    r = runner.invoke(app, ["steer", *common, "--method", "plain",
                            "--out", str(tmp_path / "plain")])
    assert r.exit_code == 0, r.output
    steered, plain = (sorted((tmp_path / d).glob("*.png")) for d in ("steer", "plain"))
    assert len(steered) == len(plain) == 1
    a, b = (np.asarray(Image.open(f), dtype=int) for f in (steered[0], plain[0]))
    assert abs(a - b).max() > 0


def test_cli_speed_runs_on_a_tiny_sdxl_folder(tmp_path, folder):
    """Wiring of `l2s speed` on the family (the real rows: scripts/gpu/sdxl_speed.sh)."""
    from typer.testing import CliRunner

    from l2s.cli import app

    r = CliRunner().invoke(app, ["speed", "--model", str(folder), "--steps", "2",
                                 "--steer-until", "1", "--iterations", "1", "--repeats", "1",
                                 "--units-only", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["units"]["ours_iteration"]["ms"] > 0 and rep["text_len"] == 77


def test_random_weights_build_the_preset_architecture_path():
    """The --random-weights path (`l2s speed --model sdxl --random-weights` on a GPU) on the
    preset's configs cut to test size: same keys, same code; catches a config the networks
    reject (the added-embedding width) or a tokenizer_2 without "!" padding."""
    from l2s.engine.registry import Preset, SteerDefaults
    from l2s.families.sdxl import build_random_sdxl

    small_clip = {"intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    cfg = {**SDXL_BASE,
           "unet": {**SDXL_BASE["unet"], "block_out_channels": [16, 32, 32],
                    "norm_num_groups": 8, "layers_per_block": 1, "sample_size": 16,
                    "transformer_layers_per_block": [1, 1, 2], "attention_head_dim": [2, 2, 4],
                    "cross_attention_dim": 32 + 48, "addition_time_embed_dim": 8,
                    "projection_class_embeddings_input_dim": 6 * 8 + 16},
           "vae": {**SDXL_BASE["vae"], "block_out_channels": [8, 8], "norm_num_groups": 4,
                   "down_block_types": ["DownEncoderBlock2D"] * 2,
                   "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1,
                   "sample_size": SIZE},
           "text_encoder": {**SDXL_BASE["text_encoder"], **small_clip, "hidden_size": 32,
                            "projection_dim": 32},
           "text_encoder_2": {**SDXL_BASE["text_encoder_2"], **small_clip, "hidden_size": 48,
                              "projection_dim": 16}}
    preset = Preset("sdxl", "sdxl", None, "", SIZE, SteerDefaults(), configs=cfg)
    den = build_random_sdxl(preset, device=torch.device("cpu"), dtype=torch.float32)
    assert den.tokenizer_2.pad_token == "!" and den.tokenizer.pad_token != "!"
    assert den.fingerprint == "sdxl-random-0" and den.image_size == (SIZE, SIZE)
    images = sample(den, [PROMPT], steps=2, guidance=5.0,
                    generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, SIZE, SIZE, 3) and torch.isfinite(images).all()


def test_the_preset_configs_are_sdxl_base(tmp_path):
    """Catches a typo in the exact configs --random-weights builds: the UNet's added
    embedding must take bigG's projection plus six 256-wide size ids, its cross-attention
    both encoders' widths, and it must have SDXL base's 70 cross-attention layers."""
    from diffusers import UNet2DConditionModel

    unet_cfg, te, te2 = (SDXL_BASE[k] for k in ("unet", "text_encoder", "text_encoder_2"))
    assert unet_cfg["cross_attention_dim"] == te["hidden_size"] + te2["hidden_size"]
    assert unet_cfg["projection_class_embeddings_input_dim"] == \
        6 * unet_cfg["addition_time_embed_dim"] + te2["projection_dim"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
    from l2s.families.unet import unet_cross_attention_layers

    layers = unet_cross_attention_layers(unet, (128, 128))
    assert len(layers) == 70 and sum(la.heads for la in layers) == 1300
    assert {la.resolution for la in layers} == {(64, 64), (32, 32)}


def test_cli_invert_ddim_writes_maps_of_a_tiny_sdxl_folder(tmp_path, folder):
    """`l2s invert` (DDIM, the default) on the SDXL folder writes cache entries; the PSNR
    gate is off because a random network does not reconstruct."""
    from typer.testing import CliRunner

    from l2s.cli import app

    r = CliRunner().invoke(app, ["invert", "--data", "shapes", "--model", str(folder),
                                 "--cache-dir", str(tmp_path / "cache"), "--limit", "1",
                                 "--per-relation", "1,1,1", "--steps", "4", "--timesteps",
                                 "1,3", "--min-psnr", "0", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["written"] >= 1


def test_cli_train_on_a_folder_source_with_a_tiny_sdxl(tmp_path, folder):
    """`l2s train --data folder --model <sdxl folder>` end to end: inverts the images with
    the SDXL backbone, trains, writes a card naming the backbone."""
    from PIL import Image
    from typer.testing import CliRunner

    from l2s.cli import app

    data = tmp_path / "images"
    data.mkdir()
    boxes = {"left of": ([4, 20, 24, 40], [40, 20, 60, 40]),
             "right of": ([40, 20, 60, 40], [4, 20, 24, 40]),
             "above": ([20, 4, 40, 24], [20, 40, 40, 60]),
             "below": ([20, 40, 40, 60], [20, 4, 40, 24])}
    lines = []
    for i in range(8):
        relation = list(boxes)[i % 4]
        Image.new("RGB", (64, 64), (30 * i, 200, 90)).save(data / f"{i}.png")
        subject, obj = ("dog", "cat") if i < 4 else ("cat", "dog")
        lines.append(json.dumps({"image": f"{i}.png", "subject": subject, "object": obj,
                                 "relation": relation, "subject_box": boxes[relation][0],
                                 "object_box": boxes[relation][1]}))
    (data / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "clf"
    r = CliRunner().invoke(app, ["train", "--data", "folder", "--folder", str(data),
                                 "--model", str(folder), "--cache-dir", str(tmp_path / "c"),
                                 "--out", str(out), "--epochs", "1", "--inversion", "noise",
                                 "--json"])
    assert r.exit_code == 0, r.output
    card = json.loads((out / "card.json").read_text())
    from l2s.engine.loading import load_backbone

    assert card["backbone"]["fingerprint"] == load_backbone(str(folder)).fingerprint


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_random_weights_sdxl_on_cuda_records_1300_maps_with_a_gradient_at_1024_px():
    """The full preset (`--random-weights`, fp16 UNet and encoders, fp32 VAE) on a GPU:
    catches a config the real-size networks reject, maps that are not the 70 layers' 1300
    at 64x64 / 32x32, fp16 overflow in the maps or their gradient, and a VAE decode that
    overflows."""
    from l2s.engine.loading import load_backbone

    den = load_backbone("sdxl", random_weights=True, device="cuda", dtype="float16")
    assert den.image_size == (1024, 1024) and den.vae.dtype == torch.float32
    layers = den.cross_attention_layers()
    assert sum(la.heads for la in layers) == 1300
    dog, cat = pair_tokens(den.tokenizer, PROMPT, "dog", "cat")
    x = den.prepare_latents(1, torch.Generator().manual_seed(0)).requires_grad_(True)
    with torch.enable_grad(), AttentionRecorder(
            den, layers, [list(dog.indices), list(cat.indices)], keep_grad=True) as rec:
        den.predict(x, den.timesteps(50)[0], den.encode_prompt([PROMPT]))
        maps = rec.stacked()
        assert maps.shape == (1, 2, 1300, 16, 16) and torch.isfinite(maps).all()
        (grad,) = torch.autograd.grad(maps[:, 0, :, :, :8].sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.isfinite(den.decode(x.detach())).all()
