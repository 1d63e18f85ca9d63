"""Backbone loading: local diffusers folders, offline errors, preset architectures."""

import pytest
import torch

from l2s.engine.backbone import BackboneError
from l2s.engine.loading import load_backbone
from l2s.engine.registry import presets
from l2s.families.tiny import save_tiny_sd
from l2s.families.unet import unet_cross_attention_layers


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_local_folder_in_diffusers_layout_loads_with_from_pretrained(tmp_path, prediction_type):
    folder = save_tiny_sd(tmp_path / "tiny", prediction_type=prediction_type)
    den = load_backbone(str(folder), device="cpu")
    assert den.prediction_type == prediction_type
    assert den.scheduler.config.steps_offset == 1 and not den.scheduler.config.clip_sample
    assert den.image_size == (32, 32) and len(den.cross_attention_layers()) == 4
    # Same weights -> same fingerprint; it keys caches and classifier cards.
    assert load_backbone(str(folder), device="cpu").fingerprint == den.fingerprint


def test_missing_hub_model_offline_says_where_it_looked_and_how_to_get_it():
    with pytest.raises(BackboneError) as e:
        load_backbone("sd2.1", device="cpu")
    msg = str(e.value)
    assert "stabilityai/stable-diffusion-2-1" in msg and "HF cache" in msg
    assert "HF_HUB_OFFLINE" in msg


def test_bad_model_values_get_one_line_errors(tmp_path):
    with pytest.raises(BackboneError, match="unknown model 'sd9'"):  # (sdxl is a preset now)
        load_backbone("sd9", device="cpu")
    with pytest.raises(BackboneError, match="no folder"):
        load_backbone("./nowhere", device="cpu")
    (tmp_path / "unet").mkdir()
    with pytest.raises(BackboneError, match="missing text_encoder/, tokenizer/"):
        load_backbone(str(tmp_path), device="cpu")
    with pytest.raises(BackboneError, match="random-weights"):
        load_backbone("toy", random_weights=True)


@pytest.mark.parametrize(("preset", "size", "heads", "levels"), [
    ("sd1.4", 512, 128, {64, 32, 16, 8}),
    ("sd2.1", 768, 195, {96, 48, 24, 12}),
])
def test_preset_architectures_have_the_published_attention_layout(preset, size, heads, levels):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # the real architecture, without allocating 3 GB
        unet = UNet2DConditionModel(**presets()[preset].configs["unet"])
    latent = size // 8
    layers = unet_cross_attention_layers(unet, (latent, latent))
    assert len(layers) == 16
    assert sum(la.heads for la in layers) == heads
    # SD's coarsest level (8x8 at 512 px) has no cross-attention in the down path but the
    # mid block runs there; the levels are derived from the size, not assumed.
    assert {la.resolution[0] for la in layers} == levels - {latent // 8} | {latent // 8}
    assert presets()[preset].configs["scheduler"]["prediction_type"] == (
        "v_prediction" if preset == "sd2.1" else "epsilon")


def test_fingerprint_ignores_library_version_and_load_dtype_but_not_weights():
    from l2s.engine.backbone import config_fingerprint
    from l2s.families.tiny import tiny_sd_components

    unet, vae, te, _, _ = tiny_sd_components()
    fp = config_fingerprint(unet, te, vae)
    # Another transformers version (it stamps its version and dtype into the config) and an
    # fp16 UNet (what a GPU loads) name the same model: the toy classifier must match there.
    te.config.transformers_version = "0.0.1"
    te.config.dtype = "float16"
    assert config_fingerprint(unet.half(), te, vae) == fp
    with torch.no_grad():
        next(unet.parameters()).flatten()[0] += 1.0
    assert config_fingerprint(unet, te, vae) != fp


def test_device_comes_from_the_argument_then_l2s_device(monkeypatch):
    from l2s.engine.loading import resolve_device

    monkeypatch.setenv("L2S_DEVICE", "cpu")
    assert resolve_device() == torch.device("cpu")
    monkeypatch.setenv("L2S_DEVICE", "nonsense")
    assert resolve_device("cpu") == torch.device("cpu")  # an explicit device wins
    monkeypatch.delenv("L2S_DEVICE")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected


def test_an_exception_with_an_empty_message_still_gives_a_one_line_error(tmp_path, monkeypatch):
    import pickle

    import l2s.classifier.importer as ci
    from l2s.bench.detectors import DetectorError
    from l2s.bench.hf_detectors import from_pretrained
    from l2s.engine.loading import hf_load_error
    from l2s.errors import one_line

    assert one_line(OSError()) == "OSError"
    assert one_line(ValueError("first\nsecond"), limit=3) == "ValueError: fir"
    assert str(hf_load_error("org/model", tmp_path, OSError())).endswith("(OSError)")

    def empty(*args, **kwargs):
        raise OSError()

    with pytest.raises(DetectorError, match=r": OSError$"):
        from_pretrained(empty, str(tmp_path), "--detector", error=DetectorError)
    ckpt = tmp_path / "c.pth"
    ckpt.write_bytes(b"x")
    monkeypatch.setattr(ci.torch, "load", empty)
    with pytest.raises(ci.ImportRefused, match=r"\(OSError\): download it again"):
        ci.read_checkpoint(ckpt)

    def unpickling(*args, **kwargs):
        raise pickle.UnpicklingError()

    monkeypatch.setattr(ci.torch, "load", unpickling)
    with pytest.raises(ci.ImportRefused, match="is not a PyTorch checkpoint"):
        ci.read_checkpoint(ckpt)


PROMPT = "a dog to the left of a cat"


def _pickled_folder(root, kind: str):
    """A tiny Flux or SD3 pipeline saved as pickles (``safe_serialization=False``): every
    network is a .bin file, no .safetensors anywhere (transformers 5 writes safetensors
    regardless: its text encoders are pickled here by hand)."""
    from safetensors.torch import load_file

    from l2s.families.mmdit_tiny import tiny_flux_pipeline, tiny_sd3_pipeline

    folder = root / kind
    {"flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline}[kind]().save_pretrained(
        folder, safe_serialization=False)
    for st in folder.rglob("model.safetensors"):
        torch.save(load_file(st), st.parent / "pytorch_model.bin")
        st.unlink()
    assert not list(folder.rglob("*.safetensors")) and list(folder.rglob("*.bin"))
    return folder


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_pickled_flux_and_sd3_folders_need_allow_pickle(tmp_path, monkeypatch, kind):
    """Was: the Flux and SD3 loaders called from_pretrained without use_safetensors, so a
    folder of pickles (which can run code when loaded) loaded without --allow-pickle."""
    from l2s.families.flux import FluxDenoiser
    from l2s.families.sd3 import SD3Denoiser

    folder = _pickled_folder(tmp_path, kind)
    monkeypatch.delenv("L2S_ALLOW_PICKLE", raising=False)
    with pytest.raises(BackboneError, match="has pickled weights") as e:
        load_backbone(str(folder), device="cpu")
    assert "--allow-pickle" in str(e.value) and "\n" not in str(e.value)
    assert str(folder) in str(e.value)
    monkeypatch.setenv("L2S_ALLOW_PICKLE", "1")
    den = load_backbone(str(folder), device="cpu", image_size=32)
    assert isinstance(den, FluxDenoiser if kind == "flux" else SD3Denoiser)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_cli_refuses_pickled_flux_and_sd3_folders_unless_allow_pickle(tmp_path, monkeypatch,
                                                                      kind):
    """The same through `l2s steer`: one line naming --allow-pickle, exit 2, no traceback; with
    `l2s --allow-pickle` the folder loads and generates."""
    from typer.testing import CliRunner

    from l2s.cli import app

    folder = _pickled_folder(tmp_path, kind)
    monkeypatch.setenv("L2S_ALLOW_PICKLE", "0")  # restored after the test (the CLI sets it)
    args = ["steer", PROMPT, "--model", str(folder), "--method", "plain", "--steps", "1",
            "--image-size", "32", "--out", str(tmp_path / "out")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "--allow-pickle" in lines[0] and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["--allow-pickle", *args])
    assert r.exit_code == 0, r.output
    assert list((tmp_path / "out").rglob("*.png"))


def _folder_of_pipeline(tmp_path, pipeline_class: str):
    """A tiny SD folder (loadable by the SD family) whose model_index.json names
    ``pipeline_class``."""
    import json

    folder = save_tiny_sd(tmp_path / "tiny")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    return folder


def test_a_folder_of_an_unsupported_pipeline_is_refused_naming_the_supported_ones(tmp_path):
    """Was: an SDXL folder (before the sdxl family) was taken for SD (the fallback family)
    and died deep inside diffusers (TypeError: argument of type 'NoneType' is not iterable);
    here the SD-shaped folder would even have loaded, as the wrong model. PixArt stands for
    any class no family claims."""
    import re

    from l2s.engine.registry import supported_pipelines

    folder = _folder_of_pipeline(tmp_path, "PixArtAlphaPipeline")
    assert "StableDiffusionXLPipeline" in supported_pipelines()
    with pytest.raises(BackboneError, match="PixArtAlphaPipeline, which no l2s backbone "
                                            "family loads; supported pipelines: "
                                            + re.escape(", ".join(supported_pipelines()))):
        load_backbone(str(folder), device="cpu")
    # the one the SD family claims loads
    _folder_of_pipeline(tmp_path, "StableDiffusionPipeline")
    assert load_backbone(str(folder), device="cpu").image_size == (32, 32)


def test_cli_refuses_an_unsupported_pipeline_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from l2s.cli import app

    folder = _folder_of_pipeline(tmp_path, "PixArtAlphaPipeline")
    r = CliRunner().invoke(app, ["steer", PROMPT, "--model", str(folder), "--method", "plain",
                                 "--steps", "1", "--out", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "supported pipelines: " in lines[0]
    assert "StableDiffusionPipeline" in lines[0]


def _imports(path) -> set[str]:
    """Every l2s module a file imports, at module level or inside a function."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith("l2s.")}


def test_engine_imports_nothing_above_it_and_loading_has_no_import_circle():
    """Was: engine/loading.py imported l2s.classifier (describe_models) and held the
    detectors' transformers helpers; loading <-> registry and bench.detectors <->
    bench.hf_detectors imported each other (lazy imports included)."""
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[1] / "l2s"
    for f in sorted((pkg / "engine").glob("*.py")):
        above = {m for m in _imports(f)
                 if not m.startswith(("l2s.engine", "l2s.errors", "l2s.relations"))}
        assert not above, f"engine/{f.name} imports {sorted(above)}"
    pairs = [("engine/loading.py", "l2s.engine.registry", "engine/registry.py",
              "l2s.engine.loading"),
             ("bench/detectors.py", "l2s.bench.hf_detectors", "bench/hf_detectors.py",
              "l2s.bench.detectors")]
    for a, a_name, b, b_name in pairs:
        assert not (b_name in _imports(pkg / b) and a_name in _imports(pkg / a)), (a, b)


def test_an_unknown_dtype_names_the_option_and_the_spellings_help_gives():
    """Catches the dtype refusal naming neither --dtype nor the float16 / bfloat16 / float32
    spellings that --help offers."""
    import torch

    from l2s.engine.backbone import BackboneError
    from l2s.engine.loading import resolve_dtype

    with pytest.raises(BackboneError, match=r"--dtype 'half'.*float32, float16 or bfloat16"):
        resolve_dtype("half", torch.device("cpu"))
    assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
