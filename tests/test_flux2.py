"""The FLUX.2 family ([klein]: Qwen3, [dev]: Mistral3) on tiny random components built here:
parity with Flux2KleinPipeline / Flux2Pipeline, maps, gradients, token alignment inside the
chat templates, inversion, and the CLI on a tiny folder (steer, invert, train, speed)."""

import json
import re

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

from l2s.engine.hooks import AttentionRecorder
from l2s.engine.sampling import denoise, sample, to_uint8
from l2s.engine.tokens import TokenAlignmentError, pair_tokens, triplet_tokens
from l2s.families.flux2 import (
    DEV,
    KLEIN_4B,
    PRESETS,
    ChatTokenizer,
    Flux2Denoiser,
    TextKeySoftmax,
    flux2_sigmas,
    random_chat_tokenizer,
    text_layers,
)
from l2s.families.joint_attention import text_key_probs
from l2s.inversion.loop import ddim_invert, reconstruct

PROMPT = "a dog to the left of a cat"
SIZE, TEXT = 16, 64  # tiny image side (8x8 image tokens) and text length
KINDS = ("klein", "klein-base", "dev")


def suite_prompts_all():
    """Every prompt of every shipped benchmark suite (fixed ones whole, generated ones at
    their default count)."""
    from l2s.bench.suites import suite_names, suite_prompts

    return [p for name in suite_names() for p in suite_prompts(name, None, 0)]


def vocabulary():
    """The words of the benchmark prompts (and the tests'), so each is one tiny token."""
    words = {w for p in suite_prompts_all() for w in re.findall(r"[a-z]+", p.prompt.lower())}
    return sorted(words | set(PROMPT.split()) | {"user", "assistant"})


@pytest.fixture(scope="module")
def words():
    return vocabulary()


def tiny_pipeline(kind: str, words, seed: int = 0, blocks=(1, 1)):
    """A Flux2KleinPipeline ("klein": distilled, "klein-base": CFG) or Flux2Pipeline ("dev")
    of tiny random components, with diffusers' test sizes: 2 heads x 16, VAE factor 1 with
    1-channel latents (4 channels once patchified), a 2-layer text encoder of width 16 whose
    layer 1 is the context; the VAE's batch-norm statistics are random, so the latent
    normalisation is exercised; the scheduler is FLUX.2's (dynamic exponential shifting)."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Pipeline,
        Flux2Transformer2DModel,
    )

    chat = "mistral" if kind == "dev" else "qwen3"
    tok = random_chat_tokenizer(chat, words=words)
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=blocks[0], num_single_layers=blocks[1],
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
        timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=kind == "dev")
    text = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
    if chat == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), head_dim=8, **text))
    else:
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration

        ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id)
        encoder = Mistral3ForConditionalGeneration(Mistral3Config(
            text_config={"model_type": "mistral", "vocab_size": len(tok) + 1,
                         "rms_norm_eps": 1e-5, "sliding_window": None, **text, **ids},
            vision_config={"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1,
                           "num_attention_heads": 4, "intermediate_size": 37, "image_size": 30,
                           "patch_size": 6, "num_channels": 3},
            image_token_index=len(tok), image_seq_length=4, vision_feature_layer=-1, **ids))
    vae = AutoencoderKLFlux2(
        sample_size=SIZE, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1,
        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False)
    vae.bn.running_mean.normal_(0, 0.3)
    vae.bn.running_var.uniform_(0.5, 2.0)
    scheduler = FlowMatchEulerDiscreteScheduler(**KLEIN_4B["scheduler"])
    parts = dict(scheduler=scheduler, vae=vae.eval(), text_encoder=encoder.eval(), tokenizer=tok,
                 transformer=transformer.eval())
    if kind == "dev":
        return Flux2Pipeline(**parts)
    return Flux2KleinPipeline(**parts, is_distilled=kind == "klein")


@pytest.fixture(scope="module")
def pipes(words):
    return {k: tiny_pipeline(k, words) for k in KINDS}


def denoiser(pipe, text=TEXT, **kw):
    from l2s.families.flux2 import from_pipeline

    den = from_pipeline(pipe, "tiny", SIZE, text)
    for k, v in kw.items():
        setattr(den, k, v)
    return den


def pipeline_latents(pipe, guidance, steps=2, prompt=PROMPT):
    """The pipeline's image (uint8) and its final packed latents (read at its last step)."""
    seen = {}

    def grab(_pipe, i, t, kw):
        seen["latents"] = kw["latents"]
        return kw

    out = pipe(prompt=prompt, height=SIZE, width=SIZE, num_inference_steps=steps,
               guidance_scale=guidance, max_sequence_length=TEXT, output_type="np",
               generator=torch.Generator().manual_seed(0), text_encoder_out_layers=(1,),
               callback_on_step_end=grab)
    return (np.clip(out.images * 255 + 0.5, 0, 255)).astype(np.uint8), seen["latents"]


@pytest.mark.parametrize("kind,guidance", [("klein", 1.0), ("klein-base", 4.0), ("dev", 4.0)])
def test_plain_generation_equals_the_diffusers_pipeline(kind, guidance, pipes):
    """Would catch any drift from Flux2KleinPipeline / Flux2Pipeline: chat template, padding
    side, stacked layers, text and image ids, the noise draw and packing, the empirical-mu
    shift, CFG (klein base) or the embedded scale (dev), the batch-norm denormalisation and
    the 2x2 unpatchify before the VAE."""
    pipe = pipes[kind]
    den = denoiser(pipe)
    assert den.guidance_mode == {"klein": "none", "klein-base": "cfg", "dev": "embedded"}[kind]
    ref_images, ref_latents = pipeline_latents(pipe, guidance)
    cond = den.encode_prompt([PROMPT])
    x = den.prepare_latents(1, torch.Generator().manual_seed(0))
    ours = denoise(den, x, cond, steps=2, guidance=guidance)
    torch.testing.assert_close(ours, ref_latents, rtol=1e-4, atol=1e-5)
    images = to_uint8(den.decode(ours))
    assert np.abs(images.astype(int) - ref_images.astype(int)).max() <= 1


def test_sigmas_are_the_pipelines_and_shift_with_resolution_and_steps():
    """flux2_sigmas follows compute_empirical_mu: more image tokens or fewer steps keep more
    of the schedule at high noise; the first sigma is 1 and there are n of them."""
    cfg = KLEIN_4B["scheduler"]
    small, big = flux2_sigmas(cfg, 50, 256), flux2_sigmas(cfg, 50, 4096)
    assert len(small) == 50 and small[0] == pytest.approx(1.0)
    assert all(b >= s for s, b in zip(small[1:], big[1:], strict=True))
    assert flux2_sigmas(cfg, 4, 4096)[2] > flux2_sigmas(cfg, 50, 4096)[25] - 1e-9


def test_text_layers_are_the_pipelines_defaults_for_both_releases():
    """The stacked layers derived from the configs are the pipelines' (9, 18, 27) for klein 4B
    and (10, 20, 30) for dev: a wrong rule would feed the transformer other states."""
    from types import SimpleNamespace

    for cfg, want in ((KLEIN_4B, (9, 18, 27)), (DEV, (10, 20, 30))):
        enc = SimpleNamespace(config=SimpleNamespace(**cfg["text_encoder"]))
        assert text_layers(enc, cfg["transformer"]["joint_attention_dim"]) == want


def _projections(attn, kw, single, text_len):
    """Queries and keys of a layer recomputed from its inputs, independently of the processor
    ([text; image], after QK-norm and RoPE): (B, S, H, D)."""
    heads = lambda y: y.unflatten(-1, (-1, attn.head_dim))  # noqa: E731
    x = kw["hidden_states"]
    if single:
        qkv = attn.to_qkv_mlp_proj(x)[..., :3 * attn.inner_dim]
        q, k, _ = qkv.chunk(3, dim=-1)
        q, k = attn.norm_q(heads(q)), attn.norm_k(heads(k))
    else:
        ctx = kw["encoder_hidden_states"]
        q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(ctx))),
                       attn.norm_q(heads(attn.to_q(x)))], 1)
        k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(ctx))),
                       attn.norm_k(heads(attn.to_k(x)))], 1)
    rope = kw["image_rotary_emb"]
    return (apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1))


@pytest.mark.parametrize("block", ["transformer_blocks.0.attn",
                                   "single_transformer_blocks.0.attn"])
def test_maps_equal_softmax_of_the_layers_own_qk_and_output_is_unchanged(block, pipes):
    """The recorded maps are softmax(Q K^T / sqrt(d)) of the layer's own projections over the
    text keys, image queries only; recording leaves the network's output as it was."""
    den = denoiser(pipes["dev"])
    attn = den.transformer.get_submodule(block)
    seen = {}
    handle = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    cond = den.encode_prompt([PROMPT])
    x = den.prepare_latents(1, torch.Generator().manual_seed(1))
    t = den.timesteps(2)[0]
    with torch.no_grad():
        plain = den.predict(x, t, cond)
        layers = [la for la in den.cross_attention_layers() if la.name == block]
        tokens = list(range(TEXT))  # every text token as its own group
        with AttentionRecorder(den, layers, [[i] for i in tokens]) as rec:
            recorded = den.predict(x, t, cond)
    handle.remove()
    torch.testing.assert_close(recorded, plain, rtol=1e-5, atol=1e-6)
    q, k = _projections(attn, seen, block.startswith("single"), TEXT)
    logits = torch.einsum("bshd,bthd->bhst", q, k) / q.shape[-1] ** 0.5
    want = logits[:, :, TEXT:, :TEXT].softmax(-1)  # image queries x text keys
    got = rec.maps[block]  # (B, G, heads, h, w)
    torch.testing.assert_close(got.flatten(3).permute(0, 2, 3, 1), want, rtol=1e-4, atol=1e-6)


def test_light_softmax_gradient_is_exact_and_saves_no_query_by_text_block():
    """TextKeySoftmax's hand-written backward equals autograd's through a plain softmax (a
    wrong sign or scale would steer the wrong way), and what it saves for the backward holds
    no (image x text) tensor: memory follows the recorded tokens, not all text tokens."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 12, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 7, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(TextKeySoftmax.apply, (q, k))
    w = torch.randn(2, 3, 12, 7, generator=g, dtype=torch.float64)
    want = torch.autograd.grad((text_key_probs(q, k) * w).sum(), (q, k))
    got = torch.autograd.grad((TextKeySoftmax.apply(q, k) * w).sum(), (q, k))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        TextKeySoftmax.apply(q, k)
    assert saved and all(s[-2:] != (12, 7) for s in saved)


def test_steering_forward_keeps_no_image_by_text_tensor_and_reaches_the_latent(pipes):
    """Through the recorder with gradients: the latent gets a gradient from the object maps,
    and nothing saved for the backward is an (image tokens x all text tokens) block, though
    the maps are softmaxed over all of them."""
    den = denoiser(pipes["klein"], text=TEXT)
    dog, cat = pair_tokens(den.tokenizer, PROMPT, "dog", "cat")
    cond = den.encode_prompt([PROMPT])
    x = den.prepare_latents(1, torch.Generator().manual_seed(2)).requires_grad_(True)
    n_img = den.latent_shape[0]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        with AttentionRecorder(den, den.cross_attention_layers(),
                               [list(dog.indices), list(cat.indices)], keep_grad=True) as rec:
            den.predict(x, den.timesteps(2)[0], cond)
            maps = rec.stacked()  # (B, 2, C, 16, 16)
    assert not [s for s in saved if tuple(s[-2:]) == (n_img, TEXT)]
    assert torch.allclose(maps.sum((-1, -2)), torch.ones(()), atol=1e-4)
    (grad,) = torch.autograd.grad((maps[:, 0] - maps[:, 1]).pow(2).sum(), x)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("chat", ["qwen3", "mistral"])
def test_token_alignment_inside_the_chat_template_for_every_benchmark_prompt(chat, words):
    """For every prompt of the shipped suites, each relation's subject and object tokens spell
    exactly that phrase, sit inside the prompt's part of the templated, padded sequence (never
    on a system, template or padding token) and are the ids the text encoder reads there."""
    tok = random_chat_tokenizer(chat, words=words)
    chat_tok = ChatTokenizer(tok, chat, 128)
    checked = 0
    for bp in suite_prompts_all():
        ids, _ = chat_tok.encode([bp.prompt])
        enc = chat_tok(bp.prompt, return_offsets_mapping=True)
        assert enc["input_ids"] == ids[0].tolist()
        inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a]
        assert tok.decode([enc["input_ids"][i] for i in inside]).strip() == bp.prompt.strip()
        for t in bp.triplets:
            for pt in triplet_tokens(chat_tok, bp.prompt, t):
                assert set(pt.indices) <= set(inside)
                spelt = tok.decode([enc["input_ids"][i] for i in pt.indices]).strip().lower()
                assert spelt == pt.phrase.lower(), (bp.prompt, pt)
                checked += 1
    assert checked > 500  # every suite has relations; all of them were checked


def test_token_alignment_refuses_a_prompt_the_text_length_cannot_hold(words):
    chat_tok = ChatTokenizer(random_chat_tokenizer("mistral", words=words), "mistral", 30)
    with pytest.raises(TokenAlignmentError, match="inside the chat template"):
        pair_tokens(chat_tok, PROMPT, "dog", "cat")


def test_inversion_round_trip_on_the_tiny_model(words):
    """Euler inversion with fixed-point refinement, then sampling, gives back the image's
    latents through the adapter (schedule, packing, encode). The tiny random network's
    output is scaled down: at full scale its velocity field changes faster than the
    fixed-point iteration of the last (largest) step can follow, a property of random
    weights, not of the inversion."""
    pipe = tiny_pipeline("klein", words)
    with torch.no_grad():
        pipe.transformer.proj_out.weight.mul_(0.05)
    den = denoiser(pipe)
    images = sample(den, [PROMPT], steps=4, guidance=1.0,
                    generator=torch.Generator().manual_seed(3))
    x0 = den.encode_image(images)
    assert x0.shape == (1, *den.latent_shape)
    cond = den.encode_prompt([PROMPT])
    back = reconstruct(den, ddim_invert(den, x0, cond, steps=4, fixed_point=30)[0], cond,
                       steps=4)
    torch.testing.assert_close(back, x0, rtol=0, atol=1e-4)
    # Without refinement the explicit backward Euler is not the forward step's inverse.
    rough = reconstruct(den, ddim_invert(den, x0, cond, steps=4)[0], cond, steps=4)
    assert (rough - x0).abs().max() > 1e-2


def test_random_weights_builder_runs_the_preset_path_on_shrunk_configs():
    """build_random_flux2 on each preset's configs cut to test size (same keys and code path):
    the architecture, chat template and guidance mode follow the preset."""
    from dataclasses import replace

    from l2s.families.flux2 import build_random_flux2

    for preset in PRESETS:
        den = build_random_flux2(replace(preset, configs=_shrunk(preset.configs)),
                                 device=torch.device("cpu"), dtype=torch.float32, image_size=32)
        assert den.guidance_mode == ("embedded" if preset.name == "flux2-dev" else "none")
        assert den.tokenizer.chat == preset.configs["chat"]
        images = sample(den, [PROMPT], steps=1, guidance=preset.defaults.guidance,
                        generator=torch.Generator().manual_seed(0))
        assert images.shape == (1, 32, 32, 3) and torch.isfinite(images).all()


@pytest.mark.parametrize("kind", ["klein", "dev"])
def test_callback_steers_both_flux2_pipelines_through_the_family(kind, pipes):
    """steering_callback finds the flux2 family from the pipeline's class (from_pipeline),
    steers the latents the pipeline hands it at the steered steps, and leaves the pipeline
    plain again afterwards."""
    from l2s.steering.loop import SteerSettings
    from l2s.steering.pipeline import steering_callback

    pipe = pipes[kind]

    def run(cb):
        return pipe(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=4,
                    guidance_scale=4.0, max_sequence_length=TEXT, output_type="np",
                    text_encoder_out_layers=(1,), callback_on_step_end=cb,
                    callback_on_step_end_tensor_inputs=["latents"],
                    generator=torch.Generator().manual_seed(0)).images

    plain = run(None)
    cb = steering_callback(pipe, PROMPT, method="centroid", image_size=SIZE, text_len=TEXT,
                           settings=SteerSettings(steps=4, steer_until=3, iterations=2,
                                                  step_size=3000.0))
    assert isinstance(cb.denoiser, Flux2Denoiser)
    steered = run(cb)
    assert [r.step for r in cb.stats.steps] == [1, 2]
    assert not np.allclose(steered, plain)
    assert np.allclose(run(None), plain)


def _shrunk(configs: dict) -> dict:
    small = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=4,
                 num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                 max_position_embeddings=512)
    return {**configs, "max_sequence_length": 48,
            "transformer": {**configs["transformer"], "in_channels": 4, "num_layers": 1,
                            "num_single_layers": 1, "attention_head_dim": 16,
                            "num_attention_heads": 2, "joint_attention_dim": 48,
                            "axes_dims_rope": [4, 4, 4, 4]},
            "text_encoder": {**configs["text_encoder"], **small},
            "vae": {**configs["vae"], "block_out_channels": [4], "latent_channels": 1,
                    "norm_num_groups": 1, "layers_per_block": 1, "sample_size": 32,
                    "down_block_types": ["DownEncoderBlock2D"],
                    "up_block_types": ["UpDecoderBlock2D"]}}


# ------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def folder(tmp_path_factory, words):
    """A tiny distilled klein saved in diffusers layout, as a hub snapshot is."""
    path = tmp_path_factory.mktemp("flux2") / "klein"
    tiny_pipeline("klein", words).save_pretrained(path)
    return path


def _cli(*args):
    from typer.testing import CliRunner

    from l2s.cli import app

    r = CliRunner().invoke(app, [*map(str, args)])
    assert r.exit_code == 0, r.output
    return r


def test_models_lists_both_presets():
    rows = {m["name"]: m for m in json.loads(_cli("models", "--json").stdout)}
    for name, repo in (("flux2-klein", "black-forest-labs/FLUX.2-klein-4B"),
                       ("flux2-dev", "black-forest-labs/FLUX.2-dev")):
        assert rows[name]["family"] == "flux2" and rows[name]["random_weights"]
        assert repo in json.dumps(rows[name])


def test_a_folder_loads_and_gets_the_klein_defaults(folder):
    from l2s.engine.loading import load_backbone
    from l2s.engine.registry import steer_defaults

    den = load_backbone(str(folder), device="cpu")
    assert isinstance(den, Flux2Denoiser) and den.guidance_mode == "none"
    assert den.image_size == (SIZE, SIZE) and den.text_len == 512
    assert steer_defaults(str(folder)) == PRESETS[0].defaults


def _image_folder(root):
    """12 random images with a dog and a cat in each of the four relations, 4 per split, as
    the folder source reads them (annotations.jsonl)."""
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(0)
    boxes = {"left of": ([1, 4, 6, 12], [9, 4, 15, 12]),
             "right of": ([9, 4, 15, 12], [1, 4, 6, 12]),
             "above": ([4, 1, 12, 6], [4, 9, 12, 15]),
             "below": ([4, 9, 12, 15], [4, 1, 12, 6])}
    lines = []
    for i in range(12):
        a, b = boxes[list(boxes)[i % 4]]
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(
            root / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "subject": "dog", "object": "cat",
                                 "subject_box": a, "object_box": b,
                                 "split": ("train", "val", "test")[i // 4]}))
    (root / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_cli_train_on_a_folder_then_steer_with_that_classifier(tmp_path, folder):
    """`l2s train --data folder --model <tiny FLUX.2>` inverts the images (flow noising),
    records their maps and writes a card over the klein's layers; `l2s steer` with that card
    then updates the latent at the steered step and lowers the classifier's loss there."""
    data = _image_folder(tmp_path / "data")
    r = _cli("train", "--model", folder, "--data", "folder", "--folder", data, "--cache-dir",
             tmp_path / "cache", "--out", tmp_path / "clf", "--epochs", "2", "--d-model", "16",
             "--depth", "1", "--inversion", "noise", "--split", "recorded", "--json")
    res = json.loads(r.stdout)
    assert res["inverted"]["written"] == 24
    assert res["data"]["images"] == {"train": 4, "val": 4, "test": 4}
    card = json.loads((tmp_path / "clf" / "card.json").read_text())
    assert [la["name"] for la in card["backbone"]["layers"]] == [
        "transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    assert card["text_len"] == 512
    r = _cli("steer", PROMPT, "--model", folder, "--classifier", tmp_path / "clf", "--steps",
             "2", "--steer-until", "1", "--iterations", "2", "--compare-plain", "--out",
             tmp_path / "steer", "--json")
    step = json.loads(r.stdout)["steps"][0]
    assert step["image_updates"] == 2 and step["loss_after"] < step["loss_before"]
    from PIL import Image

    steered, plain = (np.asarray(Image.open(tmp_path / "steer" / name)).astype(int)
                      for name in ("image_0000.png", "plain_0000.png"))
    assert np.abs(steered - plain).max() > 0  # the moved latent gives another image


def test_cli_invert_records_euler_inversion_of_a_folder(tmp_path, folder):
    data = _image_folder(tmp_path / "data")
    r = _cli("invert", "--data", "folder", "--folder", data, "--model", folder, "--cache-dir",
             tmp_path / "cache", "--steps", "4", "--timesteps", "1,3", "--min-psnr", "0",
             "--json")
    assert json.loads(r.stdout)["written"] == 24  # true and wrong caption of each image


def test_cli_speed_runs_on_a_tiny_folder_and_random_weights_wiring(tmp_path, folder,
                                                                   monkeypatch):
    """`l2s speed` on the tiny folder, and `--random-weights` through the CLI on the klein
    preset with its configs cut to test size (real sizes need a GPU:
    scripts/gpu/flux2_speed.sh)."""
    from dataclasses import replace

    from l2s.engine import registry

    _cli("speed", "--model", folder, "--repeats", "1", "--out", tmp_path / "a.json")
    assert json.loads((tmp_path / "a.json").read_text())["units"]["ours_iteration"]["ms"] > 0
    small = replace(PRESETS[0], image_size=32, configs=_shrunk(PRESETS[0].configs))
    monkeypatch.setitem(registry._PRESETS, "flux2-klein", small)
    _cli("speed", "--model", "flux2-klein", "--random-weights", "--repeats", "1",
         "--out", tmp_path / "b.json")
    rep = json.loads((tmp_path / "b.json").read_text())
    assert rep["units"]["plain_step"]["ms"] > 0 and rep["image_size"] == [32, 32]
