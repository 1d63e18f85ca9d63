"""The shapes benchmark: prompts, scoring, summaries and resuming, with oracle methods."""

import json

import numpy as np
import pytest
import torch

from l2s import bench
from l2s.bench import BenchConfig, BenchError, run_bench, shapes_prompts
from l2s.relations import RELATIONS, geneval_relations
from l2s.toy.scenes import layout_scene

# Boxes for "A REL B" on a 32 px canvas: A's box first.
_LAYOUT = {"left of": ((2, 12, 12, 22), (20, 12, 30, 22)),
           "right of": ((20, 12, 30, 22), (2, 12, 12, 22)),
           "above": ((12, 2, 22, 12), (12, 20, 22, 30)),
           "below": ((12, 20, 22, 30), (12, 2, 22, 12))}
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _oracle(flip=False):
    calls = []

    def method(prompts, triplets, seeds):
        calls.append(list(seeds))
        imgs = []
        for t in triplets:
            a, b = _LAYOUT[_OPPOSITE[t.relation] if flip else t.relation]
            imgs.append(layout_scene([(t.subject, a), (t.object, b)], 32).image)
        return torch.from_numpy(np.stack(imgs)).float() / 255

    return (lambda denoiser, cfg: method), calls


def test_layouts_mean_what_they_say():
    for rel, (a, b) in _LAYOUT.items():
        assert rel in geneval_relations(a, b)


def test_prompts_are_seeded_and_prefix_stable():
    a, b = shapes_prompts(30, seed=1), shapes_prompts(10, seed=1)
    assert [p.prompt for p in a[:10]] == [p.prompt for p in b]
    assert [p.prompt for p in shapes_prompts(10, seed=2)] != [p.prompt for p in b]
    assert {p.triplet.relation for p in a} == set(RELATIONS)
    assert all(p.triplet.subject != p.triplet.object for p in a)


@pytest.mark.parametrize(("flip", "accuracy"), [(False, 1.0), (True, 0.0)])
def test_oracle_layouts_score_as_expected(monkeypatch, tmp_path, flip, accuracy):
    method, _ = _oracle(flip)
    monkeypatch.setitem(bench.METHODS, "oracle", method)
    res = run_bench(BenchConfig(methods=("oracle",), prompts=12, images=2, out=str(tmp_path)),
                    denoiser=object())
    m = res.to_json()["methods"]["oracle"]
    assert m == {"n_images": 24, "both_present": 1.0, "position_accuracy": accuracy,
                 "fused": 0.0}
    assert (tmp_path / "contact_oracle.png").exists()
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 24


def test_interrupted_run_resumes_without_recomputing(monkeypatch, tmp_path):
    method, calls = _oracle()
    monkeypatch.setitem(bench.METHODS, "oracle", method)
    cfg = BenchConfig(methods=("oracle",), prompts=4, images=1, batch_size=2, out=str(tmp_path))
    run_bench(cfg, denoiser=object())
    assert sum(map(len, calls)) == 4
    # Simulate a run cut mid-write: a truncated last line is ignored and redone.
    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    calls.clear()
    res = run_bench(BenchConfig(methods=("oracle",), prompts=6, images=1, batch_size=2,
                                out=str(tmp_path)), denoiser=object())
    assert sum(map(len, calls)) == 3  # the cut image plus prompts 4 and 5
    assert res.methods["oracle"]["n_images"] == 6
    seeds = [json.loads(x)["seed"] for x in path.read_text().splitlines()]
    assert len(seeds) == len(set(seeds)) == 6


def test_resume_with_other_settings_is_refused(monkeypatch, tmp_path):
    method, _ = _oracle()
    monkeypatch.setitem(bench.METHODS, "oracle", method)
    run_bench(BenchConfig(methods=("oracle",), prompts=2, out=str(tmp_path)), denoiser=object())
    with pytest.raises(BenchError, match="other settings"):
        run_bench(BenchConfig(methods=("oracle",), prompts=2, seed=5, out=str(tmp_path)),
                  denoiser=object())


def test_unknown_suite_and_method(tmp_path):
    with pytest.raises(BenchError, match="unknown suite"):
        run_bench(BenchConfig(suite="coco", out=str(tmp_path)), denoiser=object())
    with pytest.raises(BenchError, match="available methods are plain, l2s, centroid"):
        run_bench(BenchConfig(methods=("magic",), out=str(tmp_path)), denoiser=object())
