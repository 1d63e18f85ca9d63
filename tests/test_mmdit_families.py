"""The Flux and SD3 families on tiny random components: diffusers parity, flow schedule,
inversion, capture through the recorder, loading from a diffusers folder."""

import pytest
import torch

from l2s.engine.backbone import Conditioning
from l2s.engine.hooks import AttentionRecorder
from l2s.engine.sampling import sample
from l2s.families.flux import FluxDenoiser
from l2s.families.mmdit import pipeline_sigmas
from l2s.families.mmdit_configs import FLUX_DEV, FLUX_SCHNELL, SD35_MEDIUM
from l2s.families.mmdit_tiny import (
    TINY_T5_TOKENS,
    save_tiny,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
)
from l2s.families.sd3 import SD3Denoiser
from l2s.inversion.loop import ddim_invert, reconstruct

PROMPT = "a dog to the left of a cat"


# Built once per module: the machine running CI is small, and the tests only read them.
@pytest.fixture(scope="module")
def flux_pipe():
    return tiny_flux_pipeline()


@pytest.fixture(scope="module")
def sd3_pipe():
    return tiny_sd3_pipeline()


def flux_denoiser(pipe, size=32):
    return FluxDenoiser(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                        pipe.text_encoder_2, pipe.tokenizer_2, dict(pipe.scheduler.config),
                        name="tiny-flux", image_size=size, max_sequence_length=TINY_T5_TOKENS)


def sd3_denoiser(pipe, size=32):
    return SD3Denoiser(pipe.transformer, pipe.vae,
                       [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3],
                       [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3],
                       dict(pipe.scheduler.config), name="tiny-sd3", image_size=size,
                       max_sequence_length=TINY_T5_TOKENS)


@pytest.mark.parametrize("dev", [False, True], ids=["schnell-like", "dev-like"])
def test_flux_generation_reproduces_diffusers_flux_pipeline(dev, flux_pipe):
    pipe = tiny_flux_pipeline(guidance_embeds=True) if dev else flux_pipe
    den = flux_denoiser(pipe)
    assert den.guidance_mode == ("embedded" if dev else "none")
    ours = sample(den, [PROMPT], steps=2, guidance=3.5,
                  generator=torch.Generator().manual_seed(0))
    ref = pipe(PROMPT, height=32, width=32, num_inference_steps=2, guidance_scale=3.5,
               max_sequence_length=TINY_T5_TOKENS, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(ours, ref.permute(0, 2, 3, 1), rtol=1e-4, atol=1e-5)


def test_sd3_generation_reproduces_diffusers_sd3_pipeline_with_cfg(sd3_pipe):
    pipe = sd3_pipe
    den = sd3_denoiser(pipe)
    ours = sample(den, [PROMPT], steps=2, guidance=5.0,
                  generator=torch.Generator().manual_seed(0))
    ref = pipe(PROMPT, height=32, width=32, num_inference_steps=2, guidance_scale=5.0,
               max_sequence_length=TINY_T5_TOKENS, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(ours, ref.permute(0, 2, 3, 1), rtol=1e-4, atol=1e-5)


def test_pipeline_sigmas_shift_as_each_model_is_configured():
    schnell = pipeline_sigmas(FLUX_SCHNELL["scheduler"], 4, 256, flux=True)
    assert schnell == pytest.approx([1.0, 0.75, 0.5, 0.25])  # shift 1, no dynamic shifting
    dev_small = pipeline_sigmas(FLUX_DEV["scheduler"], 50, 256, flux=True)
    dev_big = pipeline_sigmas(FLUX_DEV["scheduler"], 50, 4096, flux=True)
    assert dev_small[0] == pytest.approx(1.0) and len(dev_small) == 50
    # mu grows with the image token count: more of the schedule at high noise.
    assert all(b > a for a, b in zip(dev_small[1:], dev_big[1:], strict=True))
    s = 1 - 10 / 50  # mu = base_shift 0.5 at 256 tokens: exp(mu) s / (exp(mu) s + 1 - s)
    e = torch.tensor(0.5).exp().item()
    assert dev_small[10] == pytest.approx(e * s / (e * s + 1 - s), rel=1e-5)
    sd3 = pipeline_sigmas(SD35_MEDIUM["scheduler"], 28, 4096, flux=False)
    assert sd3[0] == pytest.approx(1.0) and sd3[-1] < 0.05  # shift 3 on 1 -> sigma_min


def test_flux_latents_pack_2x2_patches_as_the_pipeline_and_round_trip(flux_pipe):
    from diffusers import FluxPipeline

    den = flux_denoiser(flux_pipe)
    z = torch.randn(2, 1, 32, 32)
    packed = den._our_latents(z)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(z, 2, 1, 32, 32))
    torch.testing.assert_close(den._vae_latents(packed), z)
    assert den.latent_shape == packed.shape[1:] == (256, 4)


class _LinearFlow(FluxDenoiser):
    """The tiny Flux with its network replaced by an analytic velocity field
    v(x, t) = A(t) x + b, so Euler steps and their inversion have exact answers."""

    def model_output(self, latents, t, cond, guidance):
        s = float(t) / 1000
        return (0.3 + 0.2 * s) * latents + 0.1 * cond["states"].mean()


def test_flow_inversion_round_trip_on_an_analytic_velocity_field_is_exact(flux_pipe):
    den = _LinearFlow(*[getattr(flux_pipe, c) for c in (
        "transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")],
        {"shift": 3.0}, name="analytic", image_size=16, max_sequence_length=TINY_T5_TOKENS)
    cond = den.encode_prompt([PROMPT])
    x0 = torch.randn(1, *den.latent_shape, generator=torch.Generator().manual_seed(3))
    traj = ddim_invert(den, x0, cond, steps=8, fixed_point=30)
    assert traj.shape == (8, 1, *den.latent_shape)
    back = reconstruct(den, traj[0], cond, steps=8)
    torch.testing.assert_close(back, x0, rtol=0, atol=1e-5)
    # Without refinement the explicit backward Euler is not the forward step's inverse.
    rough = reconstruct(den, ddim_invert(den, x0, cond, steps=8)[0], cond, steps=8)
    assert (rough - x0).abs().max() > 1e-3


def test_flow_noising_follows_the_rectified_flow_path(flux_pipe):
    den = flux_denoiser(flux_pipe)
    x0, noise = torch.randn(1, *den.latent_shape), torch.randn(1, *den.latent_shape)
    t = den.timesteps(4)[1]  # sigma 0.75
    torch.testing.assert_close(den.add_noise(x0, noise, t), 0.25 * x0 + 0.75 * noise)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_recorder_maps_of_object_tokens_and_gradient_to_the_latent(kind, flux_pipe, sd3_pipe):
    pipe = flux_pipe if kind == "flux" else sd3_pipe
    den = flux_denoiser(pipe) if kind == "flux" else sd3_denoiser(pipe)
    from l2s.engine.tokens import pair_tokens

    dog, cat = pair_tokens(den.tokenizer, PROMPT, "dog", "cat")
    cond = den.encode_prompt([PROMPT])
    assert isinstance(cond, Conditioning)
    layers = den.cross_attention_layers()
    x = den.prepare_latents(1, torch.Generator().manual_seed(0)).requires_grad_(True)
    t = den.timesteps(4)[0]
    with torch.enable_grad(), AttentionRecorder(den, layers, [list(dog.indices),
                                                              list(cat.indices)],
                                                keep_grad=True) as rec:
        den.predict(x, t, cond)
        maps = rec.stacked()
        heads = sum(la.heads for la in layers)
        assert maps.shape == (1, 2, heads, 16, 16)
        torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(1, 2, heads))
        (grad,) = torch.autograd.grad(maps[:, 0, :, :8].sum(), x)
    assert grad.abs().sum() > 0
    # The originals come back after the recorder.
    assert all(type(p).__name__ in ("FluxAttnProcessor", "JointAttnProcessor2_0")
               for p in den.transformer.attn_processors.values())


def test_flux_double_layer_set_records_only_double_stream_blocks(flux_pipe):
    den = flux_denoiser(flux_pipe)
    den.layers = "double"
    assert [la.name for la in den.cross_attention_layers()] == ["transformer_blocks.0.attn"]


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_family_loads_a_diffusers_folder(tmp_path, kind):
    from l2s.engine.loading import load_backbone

    folder = save_tiny(tmp_path / kind, kind)
    den = load_backbone(str(folder), device="cpu", image_size=32)
    assert isinstance(den, FluxDenoiser if kind == "flux" else SD3Denoiser)
    images = sample(den, [PROMPT], steps=2, guidance=2.0,
                    generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 32, 32, 3) and torch.isfinite(images).all()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmdit")
    return {k: save_tiny(root / k, k) for k in ("flux", "sd3")}


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_cli_steer_and_invert_run_end_to_end_on_a_tiny_folder(tmp_path, folders, kind):
    import json

    from typer.testing import CliRunner

    from l2s.cli import app

    runner = CliRunner()
    model = str(folders[kind])
    r = runner.invoke(app, ["steer", PROMPT, "--model", model, "--method", "centroid",
                            "--steps", "2", "--steer-until", "1", "--iterations", "2",
                            "--out", str(tmp_path / "steer"), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["steps"][0]["iterations"] == 2 and (tmp_path / "steer").is_dir()
    r = runner.invoke(app, ["invert", "--data", "shapes", "--model", model, "--cache-dir",
                            str(tmp_path / "cache"), "--limit", "1", "--per-relation", "1,1,1",
                            "--steps", "4", "--timesteps", "1,3", "--min-psnr", "0", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["written"] >= 1


def test_cli_models_lists_the_mmdit_presets():
    import json

    from typer.testing import CliRunner

    from l2s.cli import app

    r = CliRunner().invoke(app, ["models", "--json"])
    assert r.exit_code == 0, r.output
    rows = {m["name"]: m for m in json.loads(r.stdout)}
    for name, family in (("flux-schnell", "flux"), ("flux-dev", "flux"),
                         ("sd3.5-medium", "sd3")):
        assert rows[name]["family"] == family and rows[name]["random_weights"]


def _shrunk(configs: dict, transformer: dict, **text) -> dict:
    """A preset's configs with every network cut to test size (same keys and code path)."""
    small_clip = {"hidden_size": 32, "intermediate_size": 37, "projection_dim": 32,
                  "num_hidden_layers": 2, "num_attention_heads": 4}
    small_t5 = {"d_model": 32, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4}
    out = {**configs, "transformer": transformer, "max_sequence_length": 32,
           "vae": {**configs["vae"], "block_out_channels": [8], "norm_num_groups": 4,
                   "down_block_types": ["DownEncoderBlock2D"],
                   "up_block_types": ["UpDecoderBlock2D"], "layers_per_block": 1,
                   "sample_size": 32}}
    for key in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if key in configs:
            small = small_t5 if "d_model" in configs[key] else small_clip
            out[key] = {**configs[key], **small, **text.get(key, {})}
    return out


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_random_weights_build_the_preset_path_once_on_the_device(kind):
    from l2s.engine.registry import Preset, SteerDefaults
    from l2s.families.flux import build_random_flux
    from l2s.families.sd3 import build_random_sd3

    if kind == "flux":
        cfg = _shrunk(FLUX_DEV, {**FLUX_DEV["transformer"], "num_layers": 1,
                                 "num_single_layers": 1, "attention_head_dim": 16,
                                 "num_attention_heads": 2, "joint_attention_dim": 32,
                                 "pooled_projection_dim": 32, "axes_dims_rope": [4, 4, 8],
                                 "in_channels": 64})
        preset = Preset("f", "flux", None, "", 32, SteerDefaults(steps=2, guidance=3.5),
                        configs=cfg)
        den = build_random_flux(preset,
                                device=torch.device("cpu"), dtype=torch.float16)
        assert den.guidance_mode == "embedded" and den.text_len == 32
    else:
        cfg = _shrunk(SD35_MEDIUM, {**SD35_MEDIUM["transformer"], "num_layers": 2,
                                    "attention_head_dim": 8, "num_attention_heads": 4,
                                    "caption_projection_dim": 32, "joint_attention_dim": 32,
                                    "pooled_projection_dim": 64, "sample_size": 16,
                                    "pos_embed_max_size": 16, "dual_attention_layers": [0]})
        preset = Preset("s", "sd3", None, "", 32, SteerDefaults(steps=2, guidance=4.5),
                        configs=cfg)
        den = build_random_sd3(preset,
                               device=torch.device("cpu"), dtype=torch.float16)
    # fp16 asked (a GPU's default) -> bf16, which these models need; the VAE stays fp32.
    assert den.dtype == torch.bfloat16 and den.vae.dtype == torch.float32
    assert den.fingerprint.endswith("-random-0")
    images = sample(den, [PROMPT], steps=2, guidance=2.0,
                    generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 32, 32, 3) and torch.isfinite(images).all()


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_reference_processors_materialise_full_attention_with_the_same_output(
        kind, flux_pipe, sd3_pipe):
    den = flux_denoiser(flux_pipe) if kind == "flux" else sd3_denoiser(sd3_pipe)
    model = den.attention_model
    x = den.prepare_latents(1, torch.Generator().manual_seed(0))
    cond, t = den.encode_prompt([PROMPT]), den.timesteps(4)[1]
    fast = den.predict(x, t, cond)
    originals = dict(model.attn_processors)
    refs = den.reference_processors()
    assert refs.keys() == originals.keys()
    assert {p.mode for p in refs.values()} == {"explicit"}
    model.set_attn_processor(refs)
    try:
        torch.testing.assert_close(den.predict(x, t, cond), fast, rtol=1e-4, atol=1e-5)
        # The recorder wraps them and keeps the explicit path.
        layer = den.cross_attention_layers()[0]
        proc = den.capture_processor(layer, model.attn_processors[f"{layer.name}.processor"],
                                     lambda la, p: None)
        assert proc.mode == "explicit"
    finally:
        model.set_attn_processor(originals)


def test_a_presets_hub_id_gets_its_generation_defaults():
    from l2s.engine.registry import generation_defaults

    assert generation_defaults("flux-schnell") == (4, 0.0)
    assert generation_defaults("black-forest-labs/FLUX.1-dev") == (50, 3.5)
    assert generation_defaults("stabilityai/stable-diffusion-3.5-medium") == (40, 4.5)
    assert generation_defaults("someone/unknown-model") == (50, 7.5)


def test_a_flux_folder_gets_the_defaults_of_the_flux_it_is_like(tmp_path, folders):
    """A folder (or hub id) no preset names: flux-dev's defaults when its transformer takes
    a guidance input, else flux-schnell's; not SD's guidance 7.5. Other families keep SD's."""
    import json

    from l2s.engine.registry import generation_defaults, steer_defaults

    for name, embeds, want in (("dev", True, (50, 3.5)), ("schnell", False, (4, 0.0))):
        (tmp_path / name / "transformer").mkdir(parents=True)
        (tmp_path / name / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
        (tmp_path / name / "transformer" / "config.json").write_text(
            json.dumps({"guidance_embeds": embeds}))
        assert generation_defaults(str(tmp_path / name)) == want
    assert steer_defaults(str(tmp_path / "schnell")).steer_until == 1
    assert generation_defaults(str(folders["flux"])) == (4, 0.0)  # a saved tiny pipeline
    assert generation_defaults(str(folders["sd3"])) == (50, 7.5)


def test_flux_schnell_steers_step_zero_only():
    """The paper: schnell steers step 0 of 4 (half of 4 steps would steer two)."""
    from l2s.engine.registry import get_preset

    assert get_preset("flux-schnell").defaults.steer_until == 1
    assert get_preset("flux-dev").defaults.steer_until == 0.5


def test_a_folder_draws_at_its_look_alike_presets_token_grid(tmp_path):
    """A Flux folder no preset names draws at its look-alike preset's token grid (schnell 16,
    dev 32 a side: the maps the published classifiers read) at its own pixels per token, not
    at its VAE's sample size (1024 px for a FLUX.1 copy: 64x64 maps); --image-size wins."""
    from l2s.engine.loading import load_backbone
    from l2s.engine.registry import presets
    from l2s.families.flux import token_grid

    assert [token_grid(presets()[n]) for n in ("flux-schnell", "flux-dev")] == [16, 32]
    dev = save_tiny(tmp_path / "dev", "flux", guidance_embeds=True)  # VAE sample size 32
    den = load_backbone(str(dev), device="cpu")
    assert den.image_size == (64, 64) and den.grid == (32, 32)  # 2 px a token
    schnell = save_tiny(tmp_path / "schnell", "flux", image_size=64)
    assert load_backbone(str(schnell), device="cpu").grid == (16, 16)
    assert load_backbone(str(dev), device="cpu", image_size=48).image_size == (48, 48)
    # And the look-alike's T5 length, where the tokenizer allows it (a FLUX.1 copy's: 512).
    for folder, want in ((schnell, 256), (dev, 512)):
        tok = folder / "tokenizer_2" / "tokenizer_config.json"
        tok.write_text(tok.read_text().replace('"model_max_length": 32', '"model_max_length": 512'))
        assert load_backbone(str(folder), device="cpu").text_len == want


def test_steer_image_size_and_text_length(tmp_path, folders):
    """`l2s steer --image-size` sets the size; the report says the size and the T5 length
    used (the folder's own without a classifier card saying otherwise)."""
    import json

    from typer.testing import CliRunner

    from l2s.cli import app

    r = CliRunner().invoke(app, ["steer", PROMPT, "--model", str(folders["flux"]), "--method",
                                 "centroid", "--steps", "1", "--steer-until", "1",
                                 "--iterations", "1", "--image-size", "48", "--out",
                                 str(tmp_path / "s"), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["image_size"] == [48, 48] and rep["text_len"] == TINY_T5_TOKENS


def test_text_length_follows_a_card_only_where_the_backbone_can(flux_pipe):
    from l2s.engine.backbone import BackboneError
    from l2s.engine.loading import load_backbone
    from l2s.steering.job import SteerError, use_card_text_len

    den = flux_denoiser(flux_pipe)
    use_card_text_len(den, {"text_len": 100}, "card.json")
    assert den.text_len == 100 and den.encode_prompt([PROMPT])["states"].shape[1] == 100
    use_card_text_len(den, {}, "card.json")  # an older card: the length stays
    assert den.text_len == 100
    with pytest.raises(BackboneError, match="at most 512"):
        den.set_text_len(513)
    den.set_text_len(TINY_T5_TOKENS)  # the module's pipeline is shared: put it back
    with pytest.raises(SteerError, match="over 512 text tokens.*fixed by its text encoder"):
        use_card_text_len(load_backbone("toy-mmdit"), {"text_len": 512}, "card.json")


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_compiled_steering_forward_traces_without_a_graph_break(family, flux_pipe, sd3_pipe,
                                                                monkeypatch):
    """``--compile`` on an MMDiT: dynamo traces the steering forward (maps only) in one graph
    and the update is the eager one. Fails if ``model_output`` reads the timestep's value
    (``float(t)`` of the tensor the compiled path passes breaks the graph at every forward).
    Dynamo's "eager" backend: the tracing is checked, not Inductor (test_compiled does that)."""
    from torch._dynamo.utils import counters

    import l2s.engine.compiled as compiled
    from l2s.engine.sampling import seeded_latents
    from l2s.relations import parse
    from l2s.steering.loop import Steerer, SteerSettings
    from l2s.steering.losses import CentroidLoss

    den = flux_denoiser(flux_pipe) if family == "flux" else sd3_denoiser(sd3_pipe)
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


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_mmdit_steering_reads_nothing_from_the_device_per_iteration(family, flux_pipe,
                                                                     sd3_pipe):
    """The per-step sync test of test_steering, on Flux and SD3: a steered step makes the same
    host reads and tensors from host data with 1 iteration as with 3, none of them
    ``.item()``-style reads, and the next step no tensor from host data. Fails if an adapter
    reads the timestep or guidance from a tensor, or builds position ids / guidance / the
    timestep from Python data, at every forward (each a GPU sync)."""
    from step_syncs import assert_step_syncs_do_not_grow

    den = flux_denoiser(flux_pipe) if family == "flux" else sd3_denoiser(sd3_pipe)
    assert_step_syncs_do_not_grow(den, PROMPT)
