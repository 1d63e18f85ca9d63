"""The Qwen-Image family on tiny random components built here (diffusers' own test sizes for
QwenImagePipeline, a Qwen2 tokenizer from a small in-memory vocabulary): pipeline parity,
its flow schedule, map capture, gradients, inversion, token alignment in the chat template,
and the CLI (models, steer, speed, train) on a tiny folder."""

import json

import numpy as np
import pytest
import torch

from l2s.engine.hooks import AttentionRecorder
from l2s.engine.sampling import denoise, sample
from l2s.engine.tokens import phrase_tokens, triplet_tokens
from l2s.families import qwen_image as qi
from l2s.families.qwen_image import (
    PROMPT_TEMPLATE,
    QWEN_IMAGE,
    TEMPLATE_DROP,
    QwenImageDenoiser,
    TextKeyProbs,
    build_qwen_tokenizer,
)

PROMPT = "a dog to the left of a cat"
WORDS = "a dog cat to the left of right above below on top bottom teddy bear".split()
TINY_TEXT_LEN = 32


def tiny_qwen_pipeline(seed: int = 0, vae_levels: int = 2):
    """QwenImagePipeline of tiny random parts (sizes of diffusers' tests/pipelines/qwenimage),
    with Qwen-Image's scheduler config; a VAE of ``vae_levels`` levels (1: 1 px per cell)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = build_qwen_tokenizer(WORDS)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False,
        axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(
        base_dim=24, z_dim=4, dim_mult=[1, 2, 4][:vae_levels + 1], num_res_blocks=1,
        temperal_downsample=[False, True][:vae_levels], latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.8, 1.2, 1.0])
    special = tok.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2,
                     "vocab_size": len(tok), "bos_token_id": special, "eos_token_id": special,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default",
                                      "type": "default"}, "rope_theta": 1000000.0},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tok), bos_token_id=special, eos_token_id=special)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE["scheduler"])
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                             tokenizer=tok, transformer=transformer)


def tiny_denoiser(pipe, size=32) -> QwenImageDenoiser:
    return QwenImageDenoiser(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                             dict(pipe.scheduler.config), name="tiny-qwen", image_size=size,
                             max_sequence_length=TINY_TEXT_LEN)


@pytest.fixture(scope="module")
def pipe():
    return tiny_qwen_pipeline()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen") / "tiny-qwen-image"
    tiny_qwen_pipeline().save_pretrained(path)
    return path


def test_template_constants_are_the_pipelines_and_the_tokenizer_drops_its_system_part(pipe):
    """Catches a template or drop index drifting from diffusers', and a tokenizer that spells
    the system part in other than 34 tokens (the pipeline would cut into the prompt)."""
    assert pipe.prompt_template_encode == PROMPT_TEMPLATE
    assert pipe.prompt_template_encode_start_idx == TEMPLATE_DROP
    tok = pipe.tokenizer
    ids = tok(PROMPT_TEMPLATE.format(PROMPT)).input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[TEMPLATE_DROP - 3:TEMPLATE_DROP] == ["<|im_start|>", "user", "Ċ"]
    assert pieces[TEMPLATE_DROP:TEMPLATE_DROP + 8] == ["a", "Ġdog", "Ġto", "Ġthe", "Ġleft",
                                                       "Ġof", "Ġa", "Ġcat"]
    assert pieces[-5:] == ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]


@pytest.mark.parametrize("cfg", [1.0, 4.0], ids=["no-cfg", "true-cfg"])
def test_generation_reproduces_qwen_image_pipeline(pipe, cfg):
    """Same seed, steps, size and true CFG scale (with the model card's negative prompt " "):
    final latents equal to float noise, images within one 8-bit level. Catches a wrong
    template drop, sigma grid, mask, packing, VAE normalisation or a missing true-CFG rescale
    (which the next test shows is not a no-op)."""
    den = tiny_denoiser(pipe)
    neg = {"negative_prompt": " "} if cfg > 1 else {}
    kwargs = dict(height=32, width=32, num_inference_steps=3, true_cfg_scale=cfg,
                  max_sequence_length=TINY_TEXT_LEN, **neg)
    ref_latents = pipe(PROMPT, output_type="latent", generator=torch.Generator().manual_seed(0),
                       **kwargs).images
    ref_images = pipe(PROMPT, output_type="np", generator=torch.Generator().manual_seed(0),
                      **kwargs).images
    x = den.prepare_latents(1, torch.Generator().manual_seed(0))
    latents = denoise(den, x, den.encode_prompt([PROMPT]), steps=3, guidance=cfg)
    torch.testing.assert_close(latents, ref_latents, rtol=1e-5, atol=1e-5)
    ours = (den.decode(latents).numpy() * 255).round()
    assert np.abs(ours - (ref_images * 255).round()).max() <= 1


def test_true_cfg_rescale_is_what_makes_the_pipelines_guidance(pipe):
    """The rescale in ``step`` is not a no-op: without it (a plain linear CFG) the latents
    leave the pipeline's. Catches ``predict`` no longer recognising the CFG batch."""
    den = tiny_denoiser(pipe)
    x = den.prepare_latents(1, torch.Generator().manual_seed(0))
    cond = den.encode_prompt([PROMPT])
    rescaled = denoise(den, x, cond, steps=3, guidance=4.0)
    den.predict = lambda *a, **k: QwenImageDenoiser.__mro__[1].predict(den, *a, **k)
    linear = denoise(den, x, cond, steps=3, guidance=4.0)
    assert (rescaled - linear).abs().max() > 1e-3


def test_sigmas_are_the_pipelines_for_the_preset_at_1328_px():
    """QwenImagePipeline's grid: linspace(1, 1/n, n) shifted by mu of the image tokens, with
    Qwen-Image's exponential shift and shift_terminal. Catches the Flux/SD3 branch choice or
    the preset's scheduler config drifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    from l2s.families.mmdit import pipeline_sigmas

    seq = (1328 // 16) ** 2
    sched = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE["scheduler"])
    c = sched.config
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 50, 50), mu=calculate_shift(
        seq, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift))
    ours = pipeline_sigmas(QWEN_IMAGE["scheduler"], 50, seq, flux=True)
    assert ours == pytest.approx(sched.sigmas[:-1].tolist(), abs=1e-6)
    assert ours[-1] == pytest.approx(0.02, abs=1e-3)  # shift_terminal


def _layer_inputs(den, x, t, cond, layer_name):
    """The attention module's own inputs in one plain forward (a pre-hook, no processor)."""
    seen = {}
    module = den.transformer.get_submodule(layer_name)
    handle = module.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            out = den.predict(x, t, cond)
    finally:
        handle.remove()
    return seen, out


def test_maps_equal_an_independent_softmax_of_the_layers_own_projections(pipe):
    """A recorded map is softmax over the prompt's text keys of (image queries x text keys)
    built from the layer's own to_q / add_k_proj, QK-norms and RoPE, outside the processor;
    the output is unchanged by the capture. Catches [image; text] order mistakes, a
    missing RoPE or norm, padding keys in the softmax, or a group averaging the wrong
    columns."""
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    den = tiny_denoiser(pipe)
    prompts = [PROMPT, "a teddy bear below a dog"]  # two lengths: one row is padded
    cond = den.encode_prompt(prompts)
    x = den.prepare_latents(2, torch.Generator().manual_seed(1))
    t = den.timesteps(4)[1]
    layers = den.cross_attention_layers()
    assert [la.name for la in layers] == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    groups = [[list(phrase_tokens(den.tokenizer, p, w).indices) for w in ws]
              for p, ws in zip(prompts, (("dog", "cat"), ("teddy bear", "dog")), strict=True)]
    seen, plain = _layer_inputs(den, x, t, cond, layers[1].name)
    with AttentionRecorder(den, layers, groups, map_size=8) as rec, torch.no_grad():
        captured = den.predict(x, t, cond)
    torch.testing.assert_close(captured, plain, rtol=1e-5, atol=1e-6)

    attn = den.transformer.get_submodule(layers[1].name)
    img, txt, mask = seen["hidden_states"], seen["encoder_hidden_states"], \
        seen["encoder_hidden_states_mask"]
    img_freqs, txt_freqs = seen["image_rotary_emb"]
    q = apply_rotary_emb_qwen(attn.norm_q(attn.to_q(img).unflatten(-1, (3, 16))), img_freqs,
                              use_real=False)
    k = apply_rotary_emb_qwen(attn.norm_added_k(attn.add_k_proj(txt).unflatten(-1, (3, 16))),
                              txt_freqs, use_real=False)
    logits = torch.einsum("bqhd,bthd->bhqt", q, k) / 4.0
    probs = logits.masked_fill(~mask.bool()[:, None, None, :], float("-inf")).softmax(-1)
    for b, sample_groups in enumerate(groups):
        for g, idx in enumerate(sample_groups):
            want = probs[b][..., idx].mean(-1).reshape(3, *den.grid)
            torch.testing.assert_close(rec.maps[layers[1].name][b, g], want,
                                       rtol=1e-5, atol=1e-6)
    # The shorter prompt's row was padded, and its padding keys were masked out.
    assert mask.shape[1] < TINY_TEXT_LEN and mask[0].all() and not mask[1].all()


def test_text_key_probs_backward_is_the_softmaxs():
    """The recomputing autograd function against autograd through the plain softmax (double
    precision), with a key mask and zero-padded columns."""
    torch.manual_seed(0)
    q = torch.randn(2, 5, 3, 4, dtype=torch.double, requires_grad=True)
    k = torch.randn(2, 6, 3, 4, dtype=torch.double, requires_grad=True)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    assert torch.autograd.gradcheck(lambda a, b: TextKeyProbs.apply(a, b, mask, 9), (q, k))
    out = TextKeyProbs.apply(q, k, mask, 9)
    assert out.shape == (2, 3, 5, 9) and (out[1, ..., 4:] == 0).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3, 5, dtype=torch.double))


def test_recording_keeps_no_matrix_of_all_text_tokens_and_the_gradient_reaches_the_latent(
        pipe):
    """Steering's forward (maps kept for the gradient): autograd saves no (heads, image
    queries, text keys) tensor of any recorded layer, so the recorder's memory grows with the
    recorded tokens' maps, not with the text tokens; and a loss on the maps has a non-zero
    gradient on the latent."""
    den = tiny_denoiser(pipe)
    cond = den.encode_prompt([PROMPT])
    x = den.prepare_latents(1, torch.Generator().manual_seed(0)).requires_grad_(True)
    t = den.timesteps(4)[0]
    groups = [list(phrase_tokens(den.tokenizer, PROMPT, w).indices) for w in ("dog", "cat")]
    queries, keys = den.grid[0] * den.grid[1], den._longest
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    layers = den.cross_attention_layers()
    with AttentionRecorder(den, layers, groups, map_size=8, keep_grad=True) as rec, \
            torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        den.predict(x, t, cond)
        maps = rec.stacked()
    assert not [s for s in shapes if len(s) >= 2 and s[-2:] in
                ((queries, keys), (queries, TINY_TEXT_LEN))]
    loss = maps[:, 0, :, :, :4].sum() - maps[:, 1, :, :, :4].sum()
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_inversion_round_trips_on_the_tiny_model(pipe):
    """Euler inversion with fixed-point refinement, then the sampler: back to the clean
    latent (10 steps: the fixed point converges on the random network). Catches a
    step/predict pair that does not run backwards (e.g. a rescale or a stale CFG norm
    applied to an unguided step)."""
    from l2s.inversion.loop import ddim_invert, reconstruct

    den = tiny_denoiser(pipe)
    cond = den.encode_prompt([PROMPT])
    x0 = sample(den, [PROMPT], steps=4, guidance=4.0, generator=torch.Generator().manual_seed(0))
    z0 = den.encode_image(x0)
    traj = ddim_invert(den, z0, cond, steps=10, fixed_point=10)
    back = reconstruct(den, traj[0], cond, steps=10)
    torch.testing.assert_close(back, z0, rtol=1e-3, atol=1e-4)
    # encode_image / decode are inverse up to the random VAE's own error: shapes and range
    assert den.decode(back).shape == (1, 32, 32, 3)


def test_every_shipped_benchmark_prompt_aligns_inside_the_template():
    """For every prompt of every shipped suite, each steered phrase maps to kept tokens
    whose pieces spell it, never to the template tokens around the prompt, and the indices
    are those of the prompt's tokens in the states the pipeline keeps (template offset
    34). Words outside the tiny vocabulary fall back to bytes, as rare words do with the
    hub's tokenizer."""
    from l2s.bench.suites import suite_names, suite_prompts

    tok = build_qwen_tokenizer(WORDS)
    view = qi.PromptInTemplate(tok, 128)
    checked = 0
    for suite in suite_names():
        for bp in suite_prompts(suite, None, 0):
            full = tok(PROMPT_TEMPLATE.format(bp.prompt)).input_ids
            kept = view(bp.prompt)["input_ids"]
            assert kept == full[TEMPLATE_DROP:]
            n_prompt = len(kept) - 5  # the template's closing <|im_end|> \n <|im_start|> ...
            for triplet in bp.triplets:
                for pt in triplet_tokens(view, bp.prompt, triplet):
                    assert max(pt.indices) < n_prompt
                    spelled = tok.convert_tokens_to_string(list(pt.pieces)).strip()
                    assert pt.phrase.lower() in spelled.lower()
                    checked += 1
    assert checked > 1000


def test_prompt_words_cut_by_a_short_template_are_refused():
    """A tokenizer that spells the system part in fewer than 34 tokens would make the
    pipeline drop prompt words: alignment refuses instead of pointing at wrong tokens."""
    from l2s.engine.tokens import TokenAlignmentError

    class Short:
        def __call__(self, text, **kw):
            offsets = [(i, i + 1) for i in range(len(text))][::8]
            return {"input_ids": list(range(len(offsets))), "offset_mapping": offsets}

    with pytest.raises(TokenAlignmentError, match="fewer than 34 tokens"):
        phrase_tokens(qi.PromptInTemplate(Short(), 64), PROMPT, "dog")


def test_cli_models_lists_qwen_image():
    from typer.testing import CliRunner

    from l2s.cli import app

    r = CliRunner().invoke(app, ["models", "--json"])
    assert r.exit_code == 0, r.output
    row = {m["name"]: m for m in json.loads(r.stdout)}["qwen-image"]
    assert row["family"] == "qwen-image" and row["random_weights"]
    assert row["repo_id"] == "Qwen/Qwen-Image" and row["image_size"] == 1328
    assert row["defaults"]["steps"] == 50 and row["defaults"]["guidance"] == 4.0


def test_folder_loads_as_the_family_and_gets_the_presets_defaults(folder):
    from l2s.engine.loading import load_backbone
    from l2s.engine.registry import steer_defaults

    den = load_backbone(str(folder), device="cpu", image_size=32)
    assert isinstance(den, QwenImageDenoiser) and den.text_len == qi.MAX_SEQUENCE_LENGTH
    assert steer_defaults(str(folder)).guidance == 4.0
    images = sample(den, [PROMPT], steps=2, guidance=4.0,
                    generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 32, 32, 3) and torch.isfinite(images).all()
    # Without --image-size: QwenImagePipeline's default, 128 latent cells a side.
    assert load_backbone(str(folder), device="cpu").image_size == (512, 512)


def test_cli_steer_moves_the_latent_end_to_end_on_a_tiny_folder(tmp_path, folder):
    """`l2s steer` on a Qwen-Image folder: the steered steps run their iterations and the
    steered image differs from the plain one of the same seed."""
    from PIL import Image
    from typer.testing import CliRunner

    from l2s.cli import app

    runner = CliRunner()
    common = [PROMPT, "--model", str(folder), "--steps", "2", "--steer-until", "1",
              "--image-size", "32", "--seed", "0", "--json"]
    r = runner.invoke(app, ["steer", *common, "--method", "centroid", "--iterations", "2",
                            "--step-size", "50", "--loss-threshold", "0",
                            "--out", str(tmp_path / "steer")])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["steps"][0]["iterations"] == 2
    r = runner.invoke(app, ["steer", *common, "--method", "plain", "--out",
                            str(tmp_path / "plain")])
    assert r.exit_code == 0, r.output
    steered = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "steer").glob("*.png"))]
    plain = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "plain").glob("*.png"))]
    assert steered and plain and np.abs(steered[-1].astype(int) - plain[-1]).max() > 0


def test_cli_speed_runs_on_a_tiny_folder(tmp_path, folder):
    from typer.testing import CliRunner

    from l2s.cli import app

    out = tmp_path / "speed.json"
    r = CliRunner().invoke(app, ["--threads", "1", "speed", "--model", str(folder),
                                 "--image-size", "32", "--steps", "2", "--repeats", "1",
                                 "--units-only", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["units"]["ours_iteration"]["ms"] > 0 and rep["text_len"] == 512
    # --random-weights builds a preset's architecture: a folder is refused in one line that
    # names qwen-image among the presets that build (its real rows: scripts/gpu).
    r = CliRunner().invoke(app, ["speed", "--model", str(folder), "--random-weights",
                                 "--units-only"])
    assert r.exit_code == 2 and "qwen-image" in r.output and "Traceback" not in r.output


def test_random_weights_build_the_preset_path_on_the_device():
    """The preset's build path (meta networks materialised once, the local tokenizer) on a
    cut-down copy of its configs: bf16 for a GPU's fp16, the VAE in fp32, a generation."""
    from l2s.engine.registry import Preset, SteerDefaults

    small = {**QWEN_IMAGE,
             "transformer": {**QWEN_IMAGE["transformer"], "num_layers": 1, "in_channels": 16,
                             "out_channels": 4, "attention_head_dim": 16,
                             "num_attention_heads": 2, "joint_attention_dim": 16,
                             "axes_dims_rope": [8, 4, 4]},
             "vae": {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 2], "num_res_blocks": 1,
                     "temperal_downsample": [False], "latents_mean": [0.0] * 4,
                     "latents_std": [1.0] * 4},
             "text_encoder": {
                 "text_config": {**QWEN_IMAGE["text_encoder"]["text_config"], "hidden_size": 16,
                                 "intermediate_size": 16, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "num_key_value_heads": 2,
                                 "vocab_size": 1024,
                                 "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
                 "vision_config": {"depth": 1, "hidden_size": 16, "intermediate_size": 16,
                                   "num_heads": 2, "out_hidden_size": 16},
                 "vocab_size": 1024, "hidden_size": 16}}
    preset = Preset("q", "qwen-image", None, "", 32, SteerDefaults(steps=2, guidance=4.0),
                    configs=small)
    den = qi.build_random_qwen_image(preset, device=torch.device("cpu"), dtype=torch.float16)
    assert den.dtype == torch.bfloat16 and den.vae.dtype == torch.float32
    assert den.fingerprint.endswith("-random-0") and den.image_size == (32, 32)
    images = sample(den, [PROMPT], steps=2, guidance=4.0,
                    generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 32, 32, 3) and torch.isfinite(images).all()


def test_cli_train_on_a_folder_source_end_to_end(tmp_path, folder, monkeypatch):
    """`l2s train --data folder --model <tiny folder>`: inverts a few annotated images,
    trains, writes a classifier card (--inversion noise: a random VAE reconstructs no
    image, so DDIM inversion's PSNR filter would drop them all). The folder's default size
    is QwenImagePipeline's (128 latent cells a side); it is cut to 16 here so the CPU test
    stays fast."""
    from PIL import Image
    from typer.testing import CliRunner

    from l2s.cli import app

    monkeypatch.setattr(qi, "DEFAULT_LATENT_CELLS", 16)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    boxes = {"left of": ([0, 16, 24, 48], [40, 16, 64, 48]),
             "right of": ([40, 16, 64, 48], [0, 16, 24, 48]),
             "above": ([16, 0, 48, 24], [16, 40, 48, 64]),
             "below": ([16, 40, 48, 64], [16, 0, 48, 24])}
    for i in range(8):
        name = f"images/{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / name)
        rel = list(boxes)[i % 4]
        rows.append({"image": name, "subject": "dog", "object": "cat", "relation": rel,
                     "subject_box": boxes[rel][0], "object_box": boxes[rel][1]})
    (data / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "clf"
    r = CliRunner().invoke(app, ["--threads", "1", "train", "--data", "folder", "--folder",
                                 str(data), "--model", str(folder), "--inversion", "noise",
                                 "--cache-dir", str(tmp_path / "cache"), "--epochs", "2",
                                 "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    card = json.loads((out / "card.json").read_text())
    assert card["text_len"] == qi.MAX_SEQUENCE_LENGTH


def test_steering_reads_nothing_from_the_device_per_iteration(pipe):
    """The per-step sync test of test_steering on Qwen-Image: a steered step makes the same
    host reads and tensors from host data with 1 iteration as with 3. Fails if the adapter
    or its processor reads a length or the mask from the device, or builds the image-key
    mask or the text length from Python data, at every forward (each a GPU sync)."""
    from step_syncs import assert_step_syncs_do_not_grow

    assert_step_syncs_do_not_grow(tiny_denoiser(pipe), PROMPT)


def test_compiled_steering_forward_traces_without_a_graph_break(pipe, monkeypatch):
    """`--compile` on Qwen-Image: the maps forward (the recomputing TextKeyProbs included)
    traces in one graph and moves the latent as the eager forward does."""
    from torch._dynamo.utils import counters

    import l2s.engine.compiled as compiled
    from l2s.engine.sampling import seeded_latents
    from l2s.relations import parse
    from l2s.steering.loop import Steerer, SteerSettings
    from l2s.steering.losses import CentroidLoss

    den = tiny_denoiser(pipe)
    torch._dynamo.reset()
    monkeypatch.setitem(compiled._compiled, ("default", "cpu"), torch.compile(
        compiled._maps_forward, backend="eager", dynamic=False))
    x, moved = seeded_latents(den, [0]), {}
    for mode in ("off", "default"):
        s = SteerSettings(steps=3, guidance=1.0, steer_until=1, iterations=2, compile=mode,
                          threshold_start=-1.0, threshold_end=-1.0, truncate_forward=False)
        st = Steerer(den, [PROMPT], [parse(PROMPT)], CentroidLoss(margin=0.3), s)
        counters.clear()
        with st.recorder() as rec:
            moved[mode] = st.update(rec, x, den.timesteps(3)[0], 0) - x
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert moved["off"].abs().max() > 0
    torch.testing.assert_close(moved["default"], moved["off"], rtol=1e-4, atol=1e-6)
