"""compbench-spatial runs leave each method's images where T2I-CompBench's own scripts read them
(l2s.bench.exports), checked by reading them back with those scripts' rules."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from l2s.bench.detection import ImageDetections
from l2s.bench.detectors import OWL_RULES
from l2s.bench.exports import ExportError, compbench_name, compbench_samples
from l2s.bench.store import read_records
from l2s.bench.suites import suite_prompts

# UniDet_eval/2D_spatial_eval.py's locality words, in its order.
COMPBENCH_LOCALITY = ("on side of", "next to", "near", "on the left of", "on the right of",
                      "on the bottom of", "on the top of", "on top of")


def compbench_reads(outpath: Path) -> list[dict]:
    """What T2I-CompBench's 2D spatial evaluation takes from ``--outpath``, by its rules
    (experts/obj_detection/generate_dataset.py, UniDet_eval/2D_spatial_eval.py): every entry of
    samples/, in the order of int(name.split("_")[1].split(".")[0]); the prompt is the name
    before the first "_", the question id the number after the last; its locality word is the
    first of its list the prompt contains."""
    names = os.listdir(outpath / "samples")
    names.sort(key=lambda x: int(x.split("_")[1].split(".")[0]))
    out = []
    for name in names:
        prompt = name.split("_")[0]
        out.append({"path": outpath / "samples" / name, "prompt": prompt,
                    "question_id": int(name.split("_")[-1].split(".")[0]),
                    "locality": next((w for w in COMPBENCH_LOCALITY if w in prompt), None)})
    return out


class _Nothing:
    """A detector that finds nothing (scores do not matter here)."""

    name, rules, open_vocabulary = "nothing", OWL_RULES, True

    def detect(self, image, names):
        return ImageDetections([], [])


def _run(tmp_path, monkeypatch, methods=("noise", "noise2"), prompts=3, num_images=2):
    from l2s import bench
    from l2s.bench import BenchConfig, run_bench

    def noise(ctx):
        def generate(prompts, seeds):
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
            return torch.stack([torch.rand(24, 32, 3, generator=g) for g in gens])
        return generate

    for m in methods:
        monkeypatch.setitem(bench.METHODS, m, noise)
    cfg = BenchConfig(suite="compbench-spatial", model="tiny", methods=methods, prompts=prompts,
                      num_images=num_images, out=str(tmp_path / "cb"))
    return run_bench(cfg, denoiser=object(), detector=_Nothing())


def test_compbench_script_reads_each_methods_images_as_l2s_made_them(tmp_path, monkeypatch):
    """Catches images T2I-CompBench's script cannot list (a name its sort key cannot parse, a
    stray file in samples/), images it would read under another prompt or question id, and
    methods pooled into one folder."""
    res = _run(tmp_path, monkeypatch)
    prompts = suite_prompts("compbench-spatial", 3, 0)
    assert set(res.exports) == {"noise", "noise2"}
    assert res.to_json()["exports"]["noise"] == str(tmp_path / "cb" / "noise" / "compbench")
    records = read_records(tmp_path / "cb")
    for method, folder in res.exports.items():
        read = compbench_reads(folder)
        assert [r["question_id"] for r in read] == list(range(6))  # 3 prompts x 2, in order
        mine = {(r["prompt_index"], r["image_index"]): r for r in records
                if r["method"] == method}
        for item in read:
            i, k = divmod(item["question_id"], 2)
            assert item["prompt"] == prompts[i].prompt  # the suite's own line, as CompBench's
            assert item["locality"] is not None
            made = np.asarray(Image.open(tmp_path / "cb" / mine[(i, k)]["filename"]))
            assert np.array_equal(np.asarray(Image.open(item["path"])), made)
    assert res.exports["noise"] != res.exports["noise2"]


def test_the_export_follows_the_images_on_resume(tmp_path, monkeypatch):
    """Catches an export that keeps a stale image after l2s replaced it (a damaged image made
    again), keeps a stray file their script would choke on, or misses images a resumed,
    larger run added."""
    res = _run(tmp_path, monkeypatch, methods=("noise",), prompts=2)
    folder = res.exports["noise"] / "samples"
    (folder / "notes.txt").write_text("x")
    first = sorted(folder.iterdir())[0]
    source = tmp_path / "cb" / "noise" / "00000" / "samples" / "0000.png"
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(source.with_suffix(".new.png"))
    os.replace(source.with_suffix(".new.png"), source)  # another file now, as atomic writes make
    res = _run(tmp_path, monkeypatch, methods=("noise",), prompts=3)
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 6 and "notes.txt" not in names
    assert np.array_equal(np.asarray(Image.open(folder / first.name)),
                          np.asarray(Image.open(source)))


def test_names_follow_compbench_numbering_and_refuse_what_it_cannot_read(tmp_path):
    """Catches a numbering other than CompBench's own generation script's (prompt by prompt
    from 0), and prompts its file-name rule would cut."""
    assert compbench_name("a dog on the left of a cat", 4, 3, 10) == \
        "a dog on the left of a cat_000043.png"
    with pytest.raises(ExportError, match="'_'"):
        compbench_name("a dog_1 on the left of a cat", 0, 0, 1)
    assert compbench_samples(tmp_path, [], 1) is None
