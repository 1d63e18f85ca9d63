"""The `l2s steer` job and CLI on tiny offline components: report format, errors, outputs."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from l2s.cli import app
from l2s.engine import loading
from l2s.families.tiny import tiny_sd
from l2s.steering.job import PromptError, SteerConfig, SteerError, check_prompt, steer, unique_dir
from l2s.steering.options import SteerOptions

runner = CliRunner()
STEP_KEYS = {"step", "t", "iterations", "image_updates", "loss_before", "loss_after", "p_target",
             "forward_ms", "backward_ms", "update_ms"}


@pytest.fixture
def tiny(monkeypatch):
    den = tiny_sd("v_prediction")
    monkeypatch.setattr(loading, "load_backbone", lambda *a, **k: den)
    return den


def _cfg(tmp_path, **kw):
    base = {"prompt": "a dog left of a cat", "method": "centroid", "out": str(tmp_path / "o"),
            "options": SteerOptions(steps=4, steer_from=0, steer_until=2, iterations=2,
                                    step_size=100.0)}
    return SteerConfig(**{**base, **kw})


def test_report_format_and_files(tmp_path, tiny):
    res = steer(_cfg(tmp_path, num_images=2, compare_plain=True), denoiser=tiny)
    assert res.pixels.shape == (2, 32, 32, 3)
    # result.images are PIL images, as a diffusers pipeline's (were numpy arrays), and hold
    # the pixels written to the PNGs
    from PIL import Image

    assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in res.images)
    assert [np.asarray(im).tolist() for im in res.images] == \
        [np.asarray(Image.open(p)).tolist() for p in res.paths]
    rep = json.loads((res.out / "report.json").read_text())
    assert rep["triplets"] == [{"subject": "dog", "relation": "left of", "object": "cat",
                                "steerable": True}]
    assert rep["seeds"] == [0, 1] and rep["method"] == "centroid"
    assert [s["step"] for s in rep["steps"]] == [0, 1]
    assert all(set(s) == STEP_KEYS for s in rep["steps"])
    assert 1000 > rep["steps"][0]["t"] > rep["steps"][1]["t"] > 0  # the DDIM timesteps
    assert rep["total_s"] > 0 and rep["plain_s"] > 0
    assert rep["overhead"] == pytest.approx(rep["total_s"] / rep["plain_s"], rel=1e-2)
    assert rep["peak_memory_mb"] > 0 and rep["skipped_updates"] == 0
    assert all(p.exists() for p in res.paths)


def test_save_attention_writes_a_figure_per_image(tmp_path, tiny):
    from PIL import Image

    res = steer(_cfg(tmp_path, num_images=2, save_attention=True), denoiser=tiny)
    figs = res.report["attention_figures"]
    assert len(figs) == 2
    w, h = Image.open(figs[0]).size
    assert w > 4 * 100 and h > 2 * 100  # four overlay columns, two steered steps + curves


def test_used_output_folder_gets_a_new_numbered_one(tmp_path, tiny):
    first = steer(_cfg(tmp_path), denoiser=tiny).out
    second = steer(_cfg(tmp_path), denoiser=tiny).out
    assert first != second and second.name == "o-1"
    assert (first / "report.json").exists() and (second / "report.json").exists()
    assert unique_dir(tmp_path / "fresh") == tmp_path / "fresh"


def test_no_relation_is_plain_and_says_so(tmp_path, tiny):
    rep = steer(_cfg(tmp_path, prompt="a dog and a cat"), denoiser=tiny).report
    assert rep["method"] == "plain" and rep["steps"] == [] and "plain" in rep["notice"]


def test_l2s_without_a_classifier_says_how_to_train_one(tmp_path, tiny):
    with pytest.raises(SteerError, match="l2s invert --model toy.*l2s train --model toy"):
        steer(_cfg(tmp_path, method="l2s"), denoiser=tiny)


def test_closed_vocabulary_names_known_objects(tiny, monkeypatch):
    from l2s.engine.registry import World
    from l2s.relations import parse

    monkeypatch.setattr(tiny, "world", World("two", ("circle", "square"), lambda im, ts: []),
                        raising=False)
    with pytest.raises(PromptError, match="known objects are circle, square.*sd2.1"):
        check_prompt(tiny, parse("a dog left of a square"))


def test_cli_json_timing_table_and_show_tokens(tmp_path, tiny):
    base = ["steer", "a teddy bear above a cup", "--method", "centroid", "--steps", "3",
            "--steer-until", "1", "--steer-from", "0", "--iterations", "2",
            "--out", str(tmp_path / "c")]
    r = runner.invoke(app, base + ["--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["triplets"][0]["object"] == "cup"
    r = runner.invoke(app, base + ["--show-tokens", "--compare-plain"])
    assert r.exit_code == 0, r.output
    assert "[2, 3]" in r.output and "overhead" in r.output
    # a compact summary by default, the per-step table with --table
    assert "steered 1 of 3 steps" in r.output and "steering, centroid" not in r.output
    # --compare-plain: each image, plain and steered, judged by the loss
    assert "plain: relation achieved (the centroid loss: its loss at the last" in r.output
    assert "compare.png" in r.output
    r = runner.invoke(app, base + ["--table"])
    assert r.exit_code == 0 and "steering, centroid" in r.output and "steered 3 of" not in r.output
    assert "relation achieved? share of images whose attention centroids" in r.output


def test_cli_user_errors_are_one_line(tmp_path):
    r = runner.invoke(app, ["steer", "a dog left of a cat", "--model", "nosuch", "--out",
                            str(tmp_path)])
    assert r.exit_code == 2
    assert "unknown model 'nosuch'" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["steer", "a dog left of a cat", "--optimizer", "lbfgs"])
    assert r.exit_code == 2 and "sgd, adam" in r.output


# What each model steered with before its defaults moved into one SteerDefaults per preset:
# (steps, guidance, steer_from, steer_until, iterations, step_size, optimizer, threshold
# start, end). A default changed by accident (a typo in a preset, a field read from the
# wrong place) changes images and every benchmark number; this catches it.
_RESOLVED = {
    "toy": (20, 3.0, 1, 5, 16, 0.02, "normalized", 0.105, 0.105),
    "toy-mmdit": (20, 1.0, 0, 5, 16, 0.04, "normalized", 0.22, 0.22),  # flow-inverted classifier
    "sd1.4": (50, 7.5, 0, 0.5, 16, 7.5, "sgd", 1e-5, 7e-5),
    "sd2.1": (50, 7.5, 0, 0.5, 16, 5.0, "sgd", 1e-5, 7e-5),
    "sd2.1-base": (50, 7.5, 0, 0.5, 16, 5.0, "sgd", 1e-5, 7e-5),
    "sdxl": (50, 5.0, 0, 0.5, 16, 5.0, "sgd", 1e-5, 7e-5),  # new: SD2.x's steering values
    "flux-schnell": (4, 0.0, 0, 1, 16, 5.0, "sgd", 1e-5, 7e-5),
    "black-forest-labs/FLUX.1-schnell": (4, 0.0, 0, 1, 16, 5.0, "sgd", 1e-5, 7e-5),
    "flux-dev": (50, 3.5, 0, 0.5, 16, 5.0, "sgd", 1e-5, 7e-5),
    "sd3.5-medium": (40, 4.5, 0, 0.5, 16, 5.0, "sgd", 1e-5, 7e-5),
    "flux2-klein": (4, 1.0, 0, 1, 16, 5.0, "sgd", 1e-5, 7e-5),  # not yet tuned (as schnell)
    "flux2-dev": (50, 4.0, 0, 0.5, 16, 5.0, "sgd", 1e-5, 7e-5),  # not yet tuned (as flux-dev)
    "qwen-image": (50, 4.0, 0, 0.5, 16, 5.0, "sgd", 1e-5, 7e-5),  # not yet tuned
    "someone/unknown-model": (50, 7.5, 0, 0.5, 16, 5.0, "sgd", 1e-5, 7e-5),
}


@pytest.mark.parametrize("model", list(_RESOLVED))
def test_each_models_steering_defaults_resolve_as_before(model):
    s = SteerOptions().resolve(model)
    assert (s.steps, s.guidance, s.steer_from, s.steer_until, s.iterations, s.step_size,
            s.optimizer, s.threshold_start, s.threshold_end) == _RESOLVED[model]
    # A value given wins over the model's default, 0 and 0.0 included.
    given = SteerOptions(steps=3, guidance=0.0, steer_from=0, iterations=0,
                         loss_threshold=0.0).resolve(model)
    assert (given.steps, given.guidance, given.steer_from, given.iterations,
            given.threshold_start) == (3, 0.0, 0, 0, 0.0)


def test_every_preset_is_pinned_above():
    from l2s.engine.registry import presets

    assert set(presets()) <= set(_RESOLVED)


def test_verify_with_save_attention_writes_the_steered_images_figures(tmp_path, tiny,
                                                                      monkeypatch):
    # Was: --verify dropped --save-attention (no figure, nothing said).
    monkeypatch.setattr("l2s.steering.verify.detector_check",
                        lambda den, trip: lambda imgs: [True, False])
    res = steer(_cfg(tmp_path, num_images=2, verify=True, save_attention=True), denoiser=tiny)
    assert res.report["verify"]["passed_plain"] == [True, False]
    assert [p.rsplit("/", 1)[1] for p in res.report["attention_figures"]] == [
        "attention_0001.png"]
