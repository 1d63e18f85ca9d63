"""`l2s steer` before a classifier exists: plain generation, report, clean errors."""

import json

import pytest
from typer.testing import CliRunner

from l2s.cli import app
from l2s.engine import loading
from l2s.engine.tiny import tiny_sd
from l2s.steer import PromptError, SteerConfig, check_prompt, steer

runner = CliRunner()


@pytest.fixture
def tiny(monkeypatch):
    den = tiny_sd("v_prediction")
    monkeypatch.setattr(loading, "load_backbone", lambda *a, **k: den)
    return den


def test_library_writes_images_and_report(tmp_path, tiny):
    res = steer(SteerConfig("a dog left of a cat", num_images=2, steps=2, out=str(tmp_path)),
                denoiser=tiny)
    assert res.images.shape == (2, 32, 32, 3)
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["triplets"] == [{"subject": "dog", "relation": "left of", "object": "cat",
                                "steerable": True}]
    assert rep["seeds"] == [0, 1] and "without steering" in rep["notice"]
    assert all(p.exists() for p in res.paths)


def test_closed_vocabulary_names_known_objects(tiny):
    from l2s.relations import parse

    tiny.known_objects = ("circle", "square")
    try:
        with pytest.raises(PromptError, match="known objects are circle, square.*sd2.1"):
            check_prompt(tiny, parse("a dog left of a square"))
    finally:
        tiny.known_objects = None


def test_cli_json_and_show_tokens(tmp_path, tiny):
    r = runner.invoke(app, ["steer", "a teddy bear above a cup", "--steps", "2", "--out",
                            str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["triplets"][0]["object"] == "cup"
    r = runner.invoke(app, ["steer", "a teddy bear above a cup", "--steps", "2", "--out",
                            str(tmp_path), "--show-tokens"])
    assert r.exit_code == 0 and "[2, 3]" in r.output


def test_cli_user_errors_are_one_line(tmp_path):
    r = runner.invoke(app, ["steer", "a dog left of a cat", "--model", "nosuch", "--out",
                            str(tmp_path)])
    assert r.exit_code == 2
    assert "unknown model 'nosuch'" in r.output and "Traceback" not in r.output
