"""Data sources: GQA filters and sampling, annotated folders, toy shapes, generate-and-verify."""

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import l2s.inversion.sources as sources
import l2s.toy.sources as toy_sources
from l2s.inversion.sources import (
    SOURCES,
    Sample,
    SourceError,
    SourceOptions,
    SourceReport,
    is_hypernym_pair,
    is_plural,
    iter_samples,
)
from l2s.relations import RELATIONS, geneval_relations, parse
from l2s.toy.scenes import CATEGORY_NAMES, layout_scene
from l2s.toy.world import WORLD


def _run(source, options, denoiser=None):
    report = SourceReport()
    return list(iter_samples(source, options, report, denoiser)), report


def _holds(s: Sample) -> bool:
    return s.relation in geneval_relations(s.subject_box, s.object_box)


# ---------------------------------------------------------------------------------------------
# Name rules


def test_plural_rule():
    for word in ("dog", "glass", "bus", "dress", "grass", "lens", "tennis racket", "cactus"):
        assert not is_plural(word), word
    for word in ("dogs", "trees", "jeans", "tennis rackets", "People's cars"):
        assert is_plural(word), word


def test_hypernym_table():
    assert is_hypernym_pair("dog", "animal") and is_hypernym_pair("animal", "dog")
    assert is_hypernym_pair("duck", "animal")  # transitive through bird
    assert is_hypernym_pair("woman", "person")
    assert is_hypernym_pair("coffee table", "table")  # head noun of an unlisted compound
    assert is_hypernym_pair("baby elephant", "animal")
    assert not is_hypernym_pair("dog", "cat")  # siblings
    assert not is_hypernym_pair("hot dog", "dog")  # a listed compound is itself
    assert not is_hypernym_pair("teddy bear", "animal")
    assert not is_hypernym_pair("dog", "dog")  # same name is another filter


# ---------------------------------------------------------------------------------------------
# GQA


def _obj(name, box, *relations):
    x1, y1, x2, y2 = box
    return {
        "name": name, "x": x1, "y": y1, "w": x2 - x1, "h": y2 - y1, "attributes": [],
        "relations": [{"name": r, "object": o} for r, o in relations],
    }


LEFT, RIGHT = (5, 40, 25, 60), (70, 40, 90, 60)
TOP, BOTTOM = (40, 2, 60, 18), (40, 75, 60, 95)


def _good_graph(i: int) -> dict:
    """Two pairs GQA states both ways, plus a non-directional relation. Even images keep
    "dog left of cat" and "lamp above table"; odd ones, whose ids run the other way,
    "cat right of dog" and "table below lamp"."""
    if i % 2 == 0:
        objects = {
            "1": _obj("dog", LEFT, ("to the left of", "2")),
            "2": _obj("cat", RIGHT, ("to the right of", "1")),
            "3": _obj("lamp", TOP, ("above", "4"), ("near", "4")),
            "4": _obj("table", BOTTOM, ("below", "3")),
        }
    else:
        objects = {
            "1": _obj("cat", RIGHT, ("to the right of", "2")),
            "2": _obj("dog", LEFT, ("on the left of", "1")),
            "3": _obj("table", BOTTOM, ("below", "4"), ("near", "4")),
            "4": _obj("lamp", TOP, ("above", "3")),
        }
    return {"width": 100, "height": 100, "objects": objects}


# One image per filter: image id -> (the drop its one statement must cause, objects).
FILTER_GRAPHS = {
    "901": ("plural name", {
        "1": _obj("trees", LEFT, ("to the left of", "2")), "2": _obj("car", RIGHT)}),
    "902": ("several instances", {  # two chairs
        "1": _obj("chair", LEFT, ("to the left of", "3")), "2": _obj("chair", TOP),
        "3": _obj("bench", RIGHT)}),
    "903": ("hypernym pair", {
        "1": _obj("horse", LEFT, ("to the left of", "2")), "2": _obj("animal", RIGHT)}),
    "904": ("same name", {
        "1": _obj("bird", LEFT, ("to the left of", "2")), "2": _obj("bird", RIGHT)}),
    "905": ("relation disagrees with boxes", {  # stated left, drawn right
        "1": _obj("man", RIGHT, ("to the left of", "2")), "2": _obj("boat", LEFT)}),
    "906": ("non-directional relation", {
        "1": _obj("man", LEFT, ("holding", "2")), "2": _obj("kite", RIGHT)}),
    "907": ("non-directional relation", {  # GQA's support relation is not kept
        "1": _obj("hat", TOP, ("on top of", "2")), "2": _obj("bed", BOTTOM)}),
    "908": ("dangling relation", {"1": _obj("man", LEFT, ("to the left of", "77"))}),
    "909": ("empty box", {
        "1": _obj("cup", (5, 40, 5, 60), ("to the left of", "2")), "2": _obj("plate", RIGHT)}),
}


def _write_gqa(root, train_ids, val_ids, extra=None, missing_images=()):
    (root / "images").mkdir(parents=True)
    for name, ids in (("train", train_ids), ("val", val_ids)):
        graphs = {str(i): _good_graph(i) for i in ids}
        if name == "train" and extra:
            graphs.update(extra)
        (root / f"{name}_sceneGraphs.json").write_text(json.dumps(graphs))
        for image_id in graphs:
            if image_id not in missing_images:
                Image.new("RGB", (100, 100), (90, 90, 90)).save(root / "images" / f"{image_id}.jpg")
    return root


def _filter_graphs():
    return {
        image_id: {"width": 100, "height": 100, "objects": objects}
        for image_id, (_, objects) in FILTER_GRAPHS.items()
    }


def test_gqa_filters_each_counted(tmp_path):
    root = _write_gqa(tmp_path / "gqa", [1000, 1001], [2000], extra=_filter_graphs(),
                      missing_images=("1001",))
    samples, report = _run("gqa", SourceOptions(gqa_root=str(root), per_relation=(5, 5, 5)))
    expected = Counter(reason for reason, _ in FILTER_GRAPHS.values())
    expected["non-directional relation"] += 3  # one "near" in each good image
    expected["repeated pair"] += 6  # the mirrored statements of the three good images
    expected["image file missing"] += 2  # both pairs of image 1001
    assert dict(report.dropped) == dict(expected)
    # Image 1000 gives dog-left-of-cat and lamp-above-table, to train or val; image 2000 the same
    # to test. Nothing from the filter images survives.
    got = {(s.source_id, s.subject, s.relation, s.object, s.split) for s in samples}
    split_1000 = {s.split for s in samples if s.source_id.startswith("gqa:1000:")}
    assert len(split_1000) == 1  # both pairs of one image share its split
    (split,) = split_1000
    assert got == {
        ("gqa:1000:1-2", "dog", "left of", "cat", split),
        ("gqa:1000:3-4", "lamp", "above", "table", split),
        ("gqa:2000:1-2", "dog", "left of", "cat", "test"),
        ("gqa:2000:3-4", "lamp", "above", "table", "test"),
    }
    for s in samples:
        assert s.source == "gqa" and _holds(s)
        assert s.image_path.endswith(f"images/{s.source_id.split(':')[1]}.jpg")
        assert s.load_image().shape == (100, 100, 3)
    assert report.to_dict()["kept_total"] == 4
    assert report.short[f"{split}/left of"] == 4 and report.short["test/right of"] == 5


def test_gqa_balanced_deterministic_and_split_by_image(tmp_path):
    root = _write_gqa(tmp_path / "gqa", range(1000, 1040), range(2000, 2008))
    options = SourceOptions(gqa_root=str(root), per_relation=(3, 1, 1), seed=0)
    samples, report = _run("gqa", options)
    assert report.kept == Counter({f"{sp}/{r}": n for sp, n in zip(("train", "val", "test"),
                                                                   (3, 1, 1), strict=True)
                                   for r in RELATIONS})
    assert not report.short
    assert all(_holds(s) for s in samples)
    ids = [s.source_id for s in samples]
    assert len(set(ids)) == len(ids)
    images = {sp: {s.image_path for s in samples if s.split == sp} for sp in ("train", "val")}
    assert not images["train"] & images["val"]
    assert all(s.source_id.startswith("gqa:20") == (s.split == "test") for s in samples)
    again, _ = _run("gqa", options)
    assert [s.source_id for s in again] == ids
    assert again == samples  # dataclass equality ignores only image_array
    other, _ = _run("gqa", SourceOptions(gqa_root=str(root), per_relation=(3, 1, 1), seed=1))
    assert [s.source_id for s in other] != ids


def test_gqa_default_counts_are_the_papers():
    assert sources.per_relation("gqa", SourceOptions()) == (800, 200, 100)
    assert sources.per_relation("gqa", SourceOptions(per_relation=[1, 2, 3])) == (1, 2, 3)


def test_gqa_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(SourceError, match="needs --gqa-root"):
        iter_samples("gqa", SourceOptions(), SourceReport())
    root = tmp_path / "gqa"
    root.mkdir()
    (root / "val_sceneGraphs.json").write_text("{}")
    with pytest.raises(SourceError) as err:
        iter_samples("gqa", SourceOptions(gqa_root=str(root)), SourceReport())
    text = str(err.value)
    assert f"train_sceneGraphs.json not found in {root}" in text
    assert "https://cs.stanford.edu/people/dorarad/gqa/download.html" in text
    assert "--gqa-root" in text
    (root / "train_sceneGraphs.json").write_text("{}")
    with pytest.raises(SourceError, match="images/"):
        iter_samples("gqa", SourceOptions(gqa_root=str(root)), SourceReport())
    (root / "images").mkdir()
    (root / "train_sceneGraphs.json").write_text("{not json")
    with pytest.raises(SourceError, match="train_sceneGraphs.json"):
        list(iter_samples("gqa", SourceOptions(gqa_root=str(root)), SourceReport()))


# ---------------------------------------------------------------------------------------------
# Folder


def _write_folder(folder, lines, images=("a.png", "b.png")):
    folder.mkdir(parents=True, exist_ok=True)
    for name in images:
        Image.new("RGB", (120, 80), (10, 200, 30)).save(folder / name)
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    (folder / "annotations.jsonl").write_text(text + "\n")
    return folder


L_BOX, R_BOX = [0, 20, 30, 50], [80, 20, 110, 50]
T_BOX, B_BOX = [40, 0, 60, 20], [40, 55, 60, 75]


def test_folder_lines_phrasings_and_drops(tmp_path):
    lines = [
        {"image": "a.png", "subject": "Dog", "object": "cat", "relation": "left of",
         "subject_box": L_BOX, "object_box": R_BOX, "split": "train"},
        {"image": "a.png", "subject": "cat", "object": "dog", "relation": "on the right of",
         "subject_box": R_BOX, "object_box": L_BOX, "split": "val"},
        "",
        {"image": "b.png", "subject": "cup", "object": "plate", "relation": "under",
         "subject_box": B_BOX, "object_box": T_BOX, "split": "test"},
        {"image": "b.png", "subject": "lamp", "object": "desk",  # relation read from boxes
         "subject_box": T_BOX, "object_box": B_BOX},
        {"image": "b.png", "subject": "man", "object": "boat", "relation": "to the left of",
         "subject_box": R_BOX, "object_box": L_BOX},  # disagrees
        {"image": "b.png", "subject": "man", "object": "boat", "relation": "next to",
         "subject_box": L_BOX, "object_box": R_BOX},  # not steerable
    ]
    folder = _write_folder(tmp_path / "data", lines)
    samples, report = _run("folder", SourceOptions(folder=str(folder)))
    got = [(s.source_id, s.subject, s.relation, s.object) for s in samples]
    assert got == [
        ("folder:1:a.png", "dog", "left of", "cat"),
        ("folder:2:a.png", "cat", "right of", "dog"),
        ("folder:4:b.png", "cup", "below", "plate"),
        ("folder:5:b.png", "lamp", "above", "desk"),
    ]
    assert [s.split for s in samples[:3]] == ["train", "val", "test"]
    assert samples[3].split in ("train", "val", "test")
    assert report.dropped == Counter(
        {"relation disagrees with boxes": 1, "non-directional relation": 1}
    )
    assert sum(report.kept.values()) == 4
    assert all(_holds(s) for s in samples)
    image = samples[0].load_image()
    assert image.shape == (80, 120, 3) and image.dtype == np.uint8
    assert samples[0].subject_box == tuple(float(v) for v in L_BOX)


def test_folder_seeded_split_is_by_image_and_caps_apply(tmp_path):
    lines = []
    for i in range(40):
        lines += [
            {"image": f"img{i}.jpg", "subject": "dog", "object": "cat", "relation": "left of",
             "subject_box": L_BOX, "object_box": R_BOX},
            {"image": f"img{i}.jpg", "subject": "cat", "object": "dog", "relation": "right of",
             "subject_box": R_BOX, "object_box": L_BOX},
        ]
    folder = _write_folder(tmp_path / "data", lines, images=())
    samples, _ = _run("folder", SourceOptions(folder=str(folder)))
    split_of = {}
    for s in samples:
        assert split_of.setdefault(s.image_path, s.split) == s.split
    assert set(split_of.values()) == {"train", "val", "test"}
    capped, report = _run("folder", SourceOptions(folder=str(folder), per_relation=(2, 1, 0)))
    assert report.kept == Counter({"train/left of": 2, "train/right of": 2,
                                   "val/left of": 1, "val/right of": 1})
    again, _ = _run("folder", SourceOptions(folder=str(folder), per_relation=(2, 1, 0)))
    assert [s.source_id for s in again] == [s.source_id for s in capped]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "line 2: not valid JSON"),
        ('["a list"]', "line 2: expected a JSON object"),
        ('{"image": "a.png", "subject": "dog", "object": "cat", "object_box": [0, 0, 1, 1]}',
         "line 2: missing subject_box"),
        ('{"image": "a.png", "subject": "dog", "object": "cat", "subject_box": [0, 0, 1],'
         ' "object_box": [0, 0, 1, 1]}', "line 2: subject_box must be"),
        ('{"image": "a.png", "subject": "dog", "object": "cat", "subject_box": [5, 0, 1, 1],'
         ' "object_box": [0, 0, 1, 1]}', "line 2: subject_box must be"),
        ('{"image": "a.png", "subject": "dog", "object": "cat", "relation": "inside of",'
         ' "subject_box": [0, 0, 1, 1], "object_box": [5, 0, 6, 1]}', "'inside of'"),
        ('{"image": "a.png", "subject": "dog", "object": "cat", "split": "dev",'
         ' "subject_box": [0, 0, 1, 1], "object_box": [5, 0, 6, 1]}', "line 2: split"),
    ],
)
def test_folder_bad_line_names_its_number(tmp_path, bad, message):
    good = {"image": "a.png", "subject": "dog", "object": "cat",
            "subject_box": L_BOX, "object_box": R_BOX}
    folder = _write_folder(tmp_path / "data", [good, bad])
    with pytest.raises(SourceError, match=message) as err:
        iter_samples("folder", SourceOptions(folder=str(folder)), SourceReport())
    assert "annotations.jsonl" in str(err.value)


def test_folder_missing_and_unreadable(tmp_path):
    with pytest.raises(SourceError, match="needs --folder"):
        iter_samples("folder", SourceOptions(), SourceReport())
    (tmp_path / "file").write_text("x")  # was: "annotations.jsonl not found in" a file
    for name in ("nosuch", "file"):
        with pytest.raises(SourceError, match=f"--folder .*{name} is not a folder"):
            iter_samples("folder", SourceOptions(folder=str(tmp_path / name)), SourceReport())
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="annotations.jsonl not found in"):
        iter_samples("folder", SourceOptions(folder=str(tmp_path / "empty")), SourceReport())
    lines = [{"image": name, "subject": "dog", "object": "cat",
              "subject_box": L_BOX, "object_box": R_BOX} for name in ("broken.jpg", "gone.jpg")]
    folder = _write_folder(tmp_path / "data", lines, images=())
    (folder / "broken.jpg").write_bytes(b"not an image")
    broken, gone = _run("folder", SourceOptions(folder=str(folder)))[0]
    for s in (broken, gone):
        with pytest.raises(SourceError, match=f"cannot read image .*{s.image_path.split('/')[-1]}"):
            s.load_image()


def test_folder_sources_that_lie_are_refused_or_read_right(tmp_path):
    """Catches a FIFO named as an image (invert blocked forever), a 16-bit PNG clipped to white
    instead of scaled, boxes negative or outside the image taken as labels, subject == object
    recorded silently, and objects a closed-vocabulary model cannot tokenize cached anyway."""
    good = {"image": "a.png", "subject": "dog", "object": "cat",
            "subject_box": L_BOX, "object_box": R_BOX}
    folder = _write_folder(tmp_path / "data", [
        good, {**good, "image": "pipe.png"}, {**good, "image": "deep.png"},
        {**good, "object_box": [80, 20, 1e300, 50]}])
    os.mkfifo(folder / "pipe.png")
    deep = np.full((80, 120), 32896, np.uint16)  # 16-bit grey at 50.2%
    Image.fromarray(deep).save(folder / "deep.png")
    ok, pipe, grey, outside = _run("folder", SourceOptions(folder=str(folder)))[0]
    assert ok.load_image().shape == (80, 120, 3)
    with pytest.raises(SourceError, match="not a regular file"):
        pipe.load_image()  # at once: the FIFO is never opened
    assert (grey.load_image() == 128).all()
    with pytest.raises(SourceError, match=r"object_box .* lies outside its image .*120x80"):
        outside.load_image()
    for bad, message in (({**good, "subject_box": [-5, 20, 30, 50]}, "0 <= x1 <= x2"),
                         ({**good, "object": "Dog"}, "subject and object are both 'dog'")):
        folder = _write_folder(tmp_path / "bad", [bad], images=())
        with pytest.raises(SourceError, match=message):
            iter_samples("folder", SourceOptions(folder=str(folder)), SourceReport())

    class Toy:
        known_objects = ("dog", "cat")

    folder = _write_folder(tmp_path / "toy", [good, {**good, "object": "teddy bear"}],
                           images=())
    samples, report = _run("folder", SourceOptions(folder=str(folder)), Toy())
    assert [s.object for s in samples] == ["cat"]
    assert report.dropped == Counter({"object the model does not know": 1})


# ---------------------------------------------------------------------------------------------
# Toy shapes


def test_shapes_balanced_deterministic_and_true():
    options = SourceOptions(per_relation=(6, 2, 1), seed=3)
    samples, report = _run("shapes", options)
    assert report.kept == Counter({f"{sp}/{r}": n for sp, n in (("train", 6), ("val", 2),
                                                                ("test", 1)) for r in RELATIONS})
    for s in samples:
        assert s.source == "shapes" and s.image_path is None
        assert s.subject in CATEGORY_NAMES and s.object in CATEGORY_NAMES
        assert s.subject != s.object and _holds(s)
        image = s.load_image()
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    again, _ = _run("shapes", options)
    assert again == samples
    assert all(np.array_equal(a.image_array, b.image_array)
               for a, b in zip(again, samples, strict=True))
    assert len({s.source_id for s in samples}) == len(samples)
    bigger, _ = _run("shapes", SourceOptions(per_relation=(1, 0, 0), shapes_size=64))
    assert bigger[0].load_image().shape == (64, 64, 3)


def test_shapes_defaults():
    assert sources.per_relation("shapes", SourceOptions()) == (400, 50, 50)
    with pytest.raises(SourceError, match="shapes_size"):
        iter_samples("shapes", SourceOptions(shapes_size=8), SourceReport())


# ---------------------------------------------------------------------------------------------
# Generated and verified


class FakeToy:
    """What the generated source touches of a toy Denoiser."""

    name = "toy"
    world = WORLD

    def prepare_latents(self, batch, generator):
        return torch.rand(batch, 1, 1, 1, generator=generator)  # (B, C, h, w)


_PLACE = {  # subject box, object box in a 32 px scene
    "left of": ((2, 12, 11, 21), (20, 12, 29, 21)),
    "right of": ((20, 12, 29, 21), (2, 12, 11, 21)),
    "above": ((12, 2, 21, 11), (12, 20, 21, 29)),
    "below": ((12, 20, 21, 29), (12, 2, 21, 11)),
}


@pytest.fixture
def fake_sample(monkeypatch):
    """Renders each prompt: its noise decides right layout, swapped layout or a lost object."""
    log = []  # (outcome, image) per generated image

    def fake(denoiser, prompts, *, steps, guidance, latents=None, generator=None, callback=None):
        assert isinstance(denoiser, FakeToy) and (steps, guidance) == (20, 3.0)
        images = []
        for prompt, u in zip(prompts, latents.flatten().tolist(), strict=True):
            (t,) = parse(prompt)
            box_s, box_o = _PLACE[t.relation]
            if u < 0.2:
                outcome, specs = "lost", [(t.subject, box_s)]
            elif u < 0.5:
                outcome, specs = "swapped", [(t.subject, box_o), (t.object, box_s)]
            else:
                outcome, specs = "right", [(t.subject, box_s), (t.object, box_o)]
            image = layout_scene(specs, 32).image
            log.append((outcome, image))
            images.append(torch.from_numpy(image).float() / 255)
        return torch.stack(images)  # (B, H, W, 3) in [0, 1]

    monkeypatch.setattr(toy_sources, "sample", fake)
    return log


def test_generated_keeps_only_verified(fake_sample):
    options = SourceOptions(per_relation=(3, 1, 1), generated_batch=8)
    samples, report = _run("generated", options, FakeToy())
    outcomes = Counter(outcome for outcome, _ in fake_sample)
    assert report.dropped == Counter({"object not detected": outcomes["lost"],
                                      "relation not verified": outcomes["swapped"]})
    assert outcomes["lost"] and outcomes["swapped"]
    assert report.kept == Counter({f"{sp}/{r}": n for sp, n in (("train", 3), ("val", 1),
                                                                ("test", 1)) for r in RELATIONS})
    right = [image for outcome, image in fake_sample if outcome == "right"]
    for s in samples:
        assert s.source == "generated" and _holds(s)
        assert s.subject_box == tuple(float(v) for v in _PLACE[s.relation][0])
        assert any(np.array_equal(s.load_image(), image) for image in right)
        assert s.source_id.startswith("generated:0:")
    # Candidate i is one prompt and one noise whatever the batch size.
    fake_sample.clear()
    again, _ = _run("generated", SourceOptions(per_relation=(3, 1, 1), generated_batch=3),
                    FakeToy())
    assert [s.source_id for s in again] == [s.source_id for s in samples]


def test_generated_budget_runs_out(fake_sample):
    samples, report = _run("generated", SourceOptions(per_relation=(3, 1, 1),
                                                      generated_candidates=2), FakeToy())
    assert len(fake_sample) == 8  # 2 candidates for each of the 4 relations
    assert sum(report.short.values()) == 20 - len(samples)
    assert sum(report.dropped.values()) + len(samples) == 8


def test_generated_needs_toy_denoiser():
    # the option is --data (was: "--source shapes", an option l2s does not have)
    with pytest.raises(SourceError, match="needs a model.*or use --data shapes"):
        iter_samples("generated", SourceOptions(), SourceReport())

    class OpenVocabulary(FakeToy):
        world = None

    with pytest.raises(SourceError, match="needs a detector; only the toy model has one.*"
                                          "--data gqa / --data folder"):
        iter_samples("generated", SourceOptions(), SourceReport(), OpenVocabulary())


# ---------------------------------------------------------------------------------------------
# Plumbing


def test_unknown_source_and_options():
    assert SOURCES == ("gqa", "folder", "shapes", "generated")
    with pytest.raises(SourceError, match="unknown data source 'coco'"):
        iter_samples("coco", SourceOptions(), SourceReport())
    with pytest.raises(SourceError, match="per_relation"):
        SourceOptions(per_relation=(1, 2))
    with pytest.raises(ValueError, match="relation"):
        Sample("shapes", "x", "a", "b", "near", (0, 0, 1, 1), (2, 0, 3, 1), "train",
               image_array=np.zeros((4, 4, 3), np.uint8))
    report = SourceReport()
    report.dropped["plural name"] += 2
    assert report.to_dict() == {"kept": {}, "kept_total": 0, "dropped": {"plural name": 2},
                                "short": {}}


@pytest.mark.parametrize("value, ok", [("40", True), (" 12.5 ", True), ("forty", False),
                                       ("nan", False), (None, False), (True, False),
                                       ([1], False)])
def test_gqa_numbers_given_as_strings(tmp_path, value, ok):
    """Catches a scene graph with a string where a number belongs: a ValueError traceback.
    Numeric strings are read as numbers; anything else is refused naming the file, image,
    object and field."""
    graph = _good_graph(1000)
    graph["objects"]["2"]["w"] = value
    root = tmp_path / "gqa"
    _write_gqa(root, [1000], [], extra={"1000": graph})
    options = SourceOptions(gqa_root=str(root), per_relation=(5, 0, 0))
    if ok:
        samples, _ = _run("gqa", options)
        assert ("gqa:1000:1-2", "dog", "cat") in {(s.source_id, s.subject, s.object)
                                                  for s in samples}
        return
    with pytest.raises(SourceError) as e:
        _run("gqa", options)
    msg = str(e.value)
    assert "train_sceneGraphs.json: image 1000 object 2 field 'w' is" in msg
    assert "not a number" in msg and "\n" not in msg


@pytest.mark.parametrize("graph", [[1, 2], {"objects": [1]}, {"objects": {"1": "dog"}},
                                   {"objects": {"1": {"name": 3}}},
                                   {"objects": {"1": {"name": "dog", "relations": [1]}}},
                                   {"width": "wide", "objects": {}}])
def test_gqa_graphs_of_another_shape_are_refused_in_one_line(tmp_path, graph):
    """Catches AttributeError/TypeError tracebacks from a scene graph of another shape."""
    root = tmp_path / "gqa"
    _write_gqa(root, [1000], [], extra={"1001": graph})
    with pytest.raises(SourceError, match=r"train_sceneGraphs.json: image 1001 "):
        _run("gqa", SourceOptions(gqa_root=str(root), per_relation=(5, 0, 0)))
