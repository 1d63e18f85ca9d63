"""The transformers detectors (Mask2Former, OWLv2) and CLIP colours on tiny random models saved to
folders and loaded back through l2s's loaders; the pure helpers (boxes from masks, labels, crops,
zero-shot weights) against hand computations."""

import json
import string

import numpy as np
import pytest
import torch

from l2s.bench.colors import GREY, ClipColors, color_crop, color_texts, color_weights
from l2s.bench.detectors import (
    DetectorError,
    ImageDetections,
    describe_detectors,
    detector_available,
    load_detector,
)
from l2s.bench.geneval import COLORS, GENEVAL_RULES, Detection
from l2s.bench.hf_detectors import (
    Mask2FormerDetector,
    OwlDetector,
    boxes_from_masks,
    clip_boxes,
    geneval_label,
)
from l2s.bench.suites import geneval_names

# id2label of Meta's COCO instance checkpoints as transformers ships them (detectron2's names).
COCO_ID2LABEL = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"]
IMAGE = np.random.RandomState(0).randint(0, 256, (48, 64, 3), dtype=np.uint8)  # not square


def _tokenizer(max_length: int):
    """A character-level CLIP tokenizer; id 0 is a plain token, as in CLIP's real vocabulary
    (OWL's heads treat a query whose first id is 0 as padding)."""
    from transformers import CLIPTokenizer

    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}
    for c in string.ascii_lowercase + "-":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _text_config(tok, positions: int) -> dict:
    return dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=positions, bos_token_id=1,
                eos_token_id=2, pad_token_id=2)


def _vision_config(size: int, patch: int) -> dict:
    return dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                image_size=size, patch_size=patch)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Folders of tiny random Mask2Former, OWLv2 and CLIP models with their processors."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPProcessor,
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessorPil,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessorPil,
        Owlv2Processor,
        SwinConfig,
    )

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    labels = ["person", "mouse", "dining table", "tv"]
    swin = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                      image_size=64, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=swin, hidden_dim=32, mask_feature_size=32,
                            feature_size=32, encoder_feedforward_dim=32, dim_feedforward=32,
                            encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                            num_queries=6, id2label=dict(enumerate(labels)),
                            label2id={n: i for i, n in enumerate(labels)})
    Mask2FormerForUniversalSegmentation(cfg).save_pretrained(root / "m2f")
    Mask2FormerImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 128}
                                 ).save_pretrained(root / "m2f")

    tok = _tokenizer(16)
    cfg = Owlv2Config(text_config=_text_config(tok, 16), vision_config=_vision_config(64, 16),
                      projection_dim=16)
    Owlv2ForObjectDetection(cfg).save_pretrained(root / "owl")
    Owlv2Processor(image_processor=Owlv2ImageProcessorPil(size={"height": 64, "width": 64}),
                   tokenizer=tok).save_pretrained(root / "owl")

    tok = _tokenizer(77)
    cfg = CLIPConfig(text_config=_text_config(tok, 77), vision_config=_vision_config(32, 8),
                     projection_dim=8)
    CLIPModel(cfg).save_pretrained(root / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                        crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(root / "clip")
    return root


# ------------------------------------------------------------------------------ pure helpers

def test_boxes_from_masks_match_a_hand_computation():
    """Catches boxes with an inclusive end (x1 = last pixel: mmdet's mask2bbox, whose boxes
    GenEval scored, ends one past it), swapped axes, or garbage for an empty mask."""
    masks = np.zeros((3, 10, 20), bool)
    masks[0, 2:5, 3:9] = True  # rows 2-4, columns 3-8
    masks[1, 7, 15] = True  # one pixel
    masks[1, 0, 0] = True  # ... and another: the box spans both
    np.testing.assert_array_equal(boxes_from_masks(masks),
                                  [[3, 2, 9, 5], [0, 0, 16, 8], [0, 0, 0, 0]])


def test_coco_labels_map_onto_genevals_vocabulary():
    """Catches a COCO name GenEval spells differently ("mouse" vs "computer mouse") never
    matching a prompt's class, so that object would always count as missing."""
    assert {geneval_label(n) for n in COCO_ID2LABEL} == set(geneval_names())
    assert geneval_label("TV") == "tv" and geneval_label("remote") == "tv remote"


def test_clip_boxes_keeps_boxes_inside_the_image():
    """Catches OWLv2 boxes reaching into its square padding (below a wide image) being kept."""
    out = clip_boxes(np.array([[-3.0, 5, 70, 60], [1, 2, 3, 4]]), width=64, height=48)
    np.testing.assert_array_equal(out, [[0, 5, 64, 48], [1, 2, 3, 4]])


def test_color_crop_composites_the_mask_over_grey_and_crops_the_box():
    """Catches a crop that keeps the background (GenEval greys it out: a red wall behind a
    white car must not make it red), a wrong grey, and a crop of the wrong rows/columns."""
    image = np.zeros((6, 8, 3), np.uint8)
    image[...] = (200, 10, 10)
    mask = np.zeros((6, 8), bool)
    mask[2:4, 3:5] = True
    crop = color_crop(image, (2.4, 1.6, 6.0, 5.0), mask)  # corners round to (2, 2, 6, 5)
    assert crop.shape == (3, 4, 3)
    assert (crop[0:2, 1:3] == (200, 10, 10)).all()  # the masked object keeps its pixels
    assert (crop[2, :] == GREY).all() and (crop[:, 0] == GREY).all() and GREY == (153,) * 3
    assert (color_crop(image, (2, 2, 6, 5)) == (200, 10, 10)).all()  # no mask: the image
    assert color_crop(image, (7.9, 5.9, 7.9, 5.9)).shape == (1, 1, 3)  # never empty


def test_color_prompts_and_zero_shot_weights_follow_geneval():
    """Catches other templates or colours than GenEval's, and averaging raw embeddings (a long
    embedding would dominate its colour's mean) instead of normalised ones."""
    texts = color_texts("dog")
    assert len(texts) == 30 and texts[:3] == ["a photo of a red dog", "a photo of a red-colored "
                                              "dog", "a photo of a red object"]
    assert texts[-1] == "a photo of a white object"
    feats = torch.zeros(30, 2)
    feats[:, 0] = 1.0  # every template points along x ...
    feats[0] = torch.tensor([0.0, 100.0])  # ... but one of red's is long and along y
    w = color_weights(feats)
    assert w.shape == (10, 2) and torch.allclose(w.norm(dim=-1), torch.ones(10))
    assert w[0, 0] > w[0, 1]  # red: two of three unit votes along x (raw mean points at y)


# ------------------------------------------------------------------ detectors on tiny models

def test_mask2former_folder_loads_and_returns_raw_instances(tiny, one_thread):
    """Catches a broken load by path, masks of the wrong size, boxes not taken from the masks,
    labels left in COCO spelling, thresholding inside the detector (the scorer thresholds), and
    images read at the folder's processor size instead of GenEval's test scale."""
    det = load_detector(str(tiny / "m2f"))
    assert isinstance(det, Mask2FormerDetector) and det.rules == GENEVAL_RULES
    assert (det.processor.size.shortest_edge, det.processor.size.longest_edge) == (800, 1333)
    found = det.detect(IMAGE, ["mouse"])
    assert isinstance(found, ImageDetections) and len(found.detections) == 6  # every query
    assert {d.label for d in found.detections} <= {"person", "computer mouse", "dining table",
                                                   "tv"}
    for d, m in zip(found.detections, found.masks, strict=True):
        assert isinstance(d, Detection) and d.color is None and 0 <= d.score <= 1
        assert m.shape == (48, 64) and m.dtype == bool and m.any()
        assert d.box == tuple(boxes_from_masks(m[None])[0])
        assert 0 <= d.box[0] < d.box[2] <= 64 and 0 <= d.box[1] < d.box[3] <= 48
        assert found.mask_of(d) is m
    assert min(d.score for d in found.detections) < GENEVAL_RULES.threshold


def test_owlv2_boxes_are_in_original_image_pixels(tiny, one_thread):
    """Catches OWLv2's padded-square boxes scaled by (width, height) as OWL-ViT's are (on a
    non-square image every y would shrink), labels not mapped back to the queried names, and
    boxes outside the image."""
    from transformers import AutoProcessor, Owlv2ForObjectDetection
    from transformers.image_transforms import center_to_corners_format

    det = load_detector(str(tiny / "owl"))
    assert isinstance(det, OwlDetector) and det.open_vocabulary
    found = det.detect(IMAGE, ["dog", "cat"])
    assert len(found.detections) == 16 and found.masks == [None] * 16  # (64 / 16) ** 2 boxes
    assert {d.label for d in found.detections} <= {"dog", "cat"}
    # by hand: relative (cx, cy, w, h) on the 64 x 64 padded square, times max(48, 64)
    model = Owlv2ForObjectDetection.from_pretrained(tiny / "owl")
    proc = AutoProcessor.from_pretrained(tiny / "owl")
    with torch.no_grad():
        out = model(**proc(text=[["dog", "cat"]], images=IMAGE, return_tensors="pt"))
    expected = clip_boxes(center_to_corners_format(out.pred_boxes[0]).numpy() * 64, 64, 48)
    got = np.array([d.box for d in found.detections])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert det.detect(IMAGE, []).detections == []


def test_clip_colors_from_a_folder_name_one_of_genevals_colours(tiny, one_thread):
    """Catches a classifier that cannot load by path, returns something outside GenEval's ten
    colours, or ignores the mask (the grey composite changes what CLIP sees)."""
    colors = ClipColors.load(str(tiny / "clip"))
    dets = [Detection("dog", (4, 4, 40, 30), 0.9), Detection("dog", (0, 0, 64, 48), 0.8)]
    mask = np.zeros((48, 64), bool)
    mask[10:20, 10:20] = True
    names = colors(IMAGE, dets, [mask, None])
    assert len(names) == 2 and set(names) <= set(COLORS)
    assert colors(IMAGE, [], []) == []
    seen = []
    colors.processor = _Spy(colors.processor, seen)
    colors(IMAGE, dets[:1], [mask])
    crop = np.asarray(seen[0])
    assert crop.shape == (26, 36, 3) and (crop[0, 0] == GREY).all()  # grey outside the mask


class _Spy:
    """Records the images a processor is given."""

    def __init__(self, inner, seen):
        self.inner, self.seen = inner, seen

    def __call__(self, images=None, **kw):
        if images is not None:
            self.seen.extend(images)
        return self.inner(images=images, **kw)


# ---------------------------------------------------------------------- errors and doctor

def test_missing_models_say_how_to_get_them():
    """Catches a hub model missing offline failing with a traceback or a long retry instead of
    naming the download command and the --detector / --color-model PATH way round it."""
    with pytest.raises(DetectorError, match=r"hf download facebook/mask2former.*--detector PATH"):
        load_detector("mask2former")
    with pytest.raises(DetectorError, match=r"hf download openai/clip.*--color-model PATH"):
        ClipColors.load()
    with pytest.raises(DetectorError, match="no such folder"):
        load_detector("./nowhere")
    assert not detector_available("owlv2") and detector_available("toy")


def test_a_detector_that_cannot_load_stops_the_run_before_it_pins_its_folder(tmp_path):
    """Catches a run that writes config.json (or generates) before its detector loads: rerunning
    with --detector PATH into the same --out would then be refused as other settings."""
    from l2s.bench import BenchConfig, run_bench

    cfg = BenchConfig(suite="geneval-position", model="tiny", prompts=1, num_images=1,
                      out=str(tmp_path / "run"))
    with pytest.raises(DetectorError, match="hf download"):
        run_bench(cfg, denoiser=object())
    assert not (tmp_path / "run" / "config.json").exists()


def test_folders_of_other_models_are_refused(tiny, tmp_path):
    """Catches a CLIP (or any non-detector) folder being driven as a detector, a detector as the
    colour model, and a folder without config.json."""
    with pytest.raises(DetectorError, match="model_type 'clip' is not a detector"):
        load_detector(str(tiny / "clip"))
    with pytest.raises(DetectorError, match="not CLIP"):
        ClipColors.load(str(tiny / "owl"))
    with pytest.raises(DetectorError, match="no config.json"):
        load_detector(str(tmp_path))


def test_pickled_detector_and_colour_model_need_allow_pickle(tiny, tmp_path, monkeypatch):
    """The detectors and the colour model load under the one loading policy: a folder whose
    weights are only a pickle is refused, naming --allow-pickle, and loads with it."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "clip"
    shutil.copytree(tiny / "clip", folder)
    st = folder / "model.safetensors"
    torch.save(load_file(st), folder / "pytorch_model.bin")
    st.unlink()
    monkeypatch.delenv("L2S_ALLOW_PICKLE", raising=False)
    with pytest.raises(DetectorError, match=r"--color-model .* has pickled weights "
                                            r"\(pytorch_model.bin\).*--allow-pickle"):
        ClipColors.load(str(folder))
    assert not detector_available(str(folder))  # doctor does not offer what will not load
    monkeypatch.setenv("L2S_ALLOW_PICKLE", "1")
    assert detector_available(str(folder))
    assert ClipColors.load(str(folder)).name == str(folder)


def test_availability_reads_folders_and_the_cache(tiny):
    """Catches doctor reporting a usable folder as missing (or any folder as usable)."""
    assert detector_available(str(tiny / "m2f")) and detector_available(str(tiny / "clip"))
    rep = describe_detectors()
    assert set(rep) == {"toy", "mask2former", "owlv2", "clip-colors"}
    assert rep["toy"]["available"] and not rep["mask2former"]["available"]


# ------------------------------------------------------------------ scoring and whole runs

class _Fixed:
    """A detector that finds the same detections (and masks) in every image."""

    name, rules, open_vocabulary = "fixed", GENEVAL_RULES, False

    def __init__(self, detections, masks):
        self.found = ImageDetections(detections, masks)

    def detect(self, image, names):
        return self.found


def _color_prompt():
    from l2s.bench import suite_prompts

    return next(p for p in suite_prompts("geneval", None, 0) if p.tag == "colors")


def test_given_colours_skip_clip_and_missing_ones_go_through_it(tiny, one_thread):
    """Catches CLIP being run (or demanded) for detections that already carry a colour, and a
    colour prompt scored without classifying the colour it asks for."""
    from l2s.bench.scoring import score_image

    prompt = _color_prompt()
    want = prompt.metadata["include"][0]
    box = (4.0, 4.0, 40.0, 30.0)
    given = _Fixed([Detection(want["class"], box, 0.95, color=want["color"])], [None])
    rec = score_image(prompt, IMAGE, given, colors=None)  # no classifier needed
    assert rec["correct"] and rec["reason"] == ""
    calls = []

    def spy(image, dets, masks):
        calls.append(len(dets))
        return ClipColors.load(str(tiny / "clip"))(image, dets, masks)

    rec = score_image(prompt, IMAGE, _Fixed([Detection(want["class"], box, 0.95)], [None]), spy)
    assert calls == [1]
    assert rec["correct"] == (f"{want['color']} {want['class']}>=1" not in rec["reason"])


def test_real_model_suites_run_end_to_end_on_tiny_folders(tiny, tmp_path, monkeypatch,
                                                          one_thread):
    """Catches the --detector / --color-model folders not reaching the run, a compbench or
    GenEval record missing its fields, a CompBench run not saying its detector replaces UniDet,
    and a detector that finds nothing (random weights here) passing without the DETECTOR HEALTH
    warning."""
    from l2s import bench
    from l2s.bench import BenchConfig, run_bench

    def noise(ctx):
        return lambda prompts, seeds: torch.rand(len(prompts), 48, 64, 3,
                                                  generator=torch.Generator().manual_seed(0))

    monkeypatch.setitem(bench.METHODS, "noise", noise)
    warnings = {}
    for suite, folder in (("geneval-position", "m2f"), ("compbench-spatial", "owl")):
        cfg = BenchConfig(suite=suite, model="tiny", methods=("noise",), prompts=2, num_images=1,
                          detector=str(tiny / folder), color_model=str(tiny / "clip"),
                          out=str(tmp_path / suite))
        res = run_bench(cfg, denoiser=object())
        assert res.detector == str(tiny / folder) and res.complete
        records = [json.loads(line) for line in (tmp_path / suite / "results.jsonl").open()]
        assert len(records) == 2 and {"correct", "reason", "details", "n_detections"} <= set(
            records[0])
        warnings[suite] = res.warnings
        assert any("UniDet is replaced" in n for n in res.notes) == (suite == "compbench-spatial")
    # the random Mask2Former's scores sit under GenEval's 0.3: nothing is kept in any image
    assert any("DETECTOR HEALTH" in w for w in warnings["geneval-position"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_detectors_and_colours_on_cuda_match_the_cpu(tiny, monkeypatch):
    """Catches inputs or outputs left on the wrong device, and CUDA numerics that change what
    the scorer sees (labels, boxes, scores, colour weights). TF32 is off: the tiny random models
    have many near-zero mask logits that TF32 rounding would flip."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        _compare_devices(tiny)
    finally:
        torch.set_float32_matmul_precision(precision)


def _compare_devices(tiny):
    for folder in ("m2f", "owl"):
        cpu, gpu = (load_detector(str(tiny / folder), d).detect(IMAGE, ["dog", "mouse"])
                    for d in ("cpu", "cuda"))
        assert len(gpu.detections) == len(cpu.detections)
        for g in gpu.detections:  # the order of equal-score instances may differ
            assert any(c.label == g.label and abs(c.score - g.score) < 1e-3
                       and np.allclose(c.box, g.box, atol=1.0) for c in cpu.detections), g
    gpu = ClipColors.load(str(tiny / "clip"), "cuda")
    dets = [Detection("dog", (4, 4, 40, 30), 0.9), Detection("dog", (0, 0, 64, 48), 0.8)]
    assert set(gpu(IMAGE, dets, [None, None])) <= set(COLORS)
    torch.testing.assert_close(gpu.weights("dog").cpu(),
                               ClipColors.load(str(tiny / "clip"), "cpu").weights("dog"),
                               atol=1e-4, rtol=1e-3)
