"""transformers detectors behind l2s.bench.detectors.Detector, loaded from a hub id or a folder.

- Mask2Former (model_type mask2former; default facebook/mask2former-swin-small-coco-instance):
  COCO instance segmentation, the architecture GenEval uses. Every instance transformers'
  post-processing returns is kept (threshold 0: the scorer applies GenEval's thresholds), with
  its score as that post-processing computes it (class probability x mean mask probability, as
  mmdet does), its binary mask (for the colour step) and its box taken from the mask the way
  mmdet's `mask2bbox` does. Labels are COCO names as GenEval spells them. Images are read at
  GenEval's test scale (MASK2FORMER_TEST_SIZE).
- OWLv2 / OWL-ViT (model_type owlv2, owlvit; default google/owlv2-base-patch16-ensemble): open
  vocabulary, queried with the prompt's object names; every box comes back (threshold 0) in
  pixels of the original image, clipped to it; no masks (colour then reads the box crop).

Models load with `from_pretrained` through the HF cache (HF_HUB_OFFLINE honoured), under the
loading policy of every l2s model (`l2s.engine.loading`: safetensors only unless
`l2s --allow-pickle`). `model_config` / `from_pretrained` / `hf_model_available` load any
transformers model by hub id or folder (GenEval's CLIP colour model too).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from l2s.bench.detection import OWL_RULES, DetectorError, ImageDetections
from l2s.bench.geneval import GENEVAL_RULES, Detection
from l2s.engine.hub import hf_cache_dir, hf_offline, hub_file, hub_reachable, is_hub_id
from l2s.engine.loading import (
    allow_pickle,
    pickle_refusal,
    pickled_files,
    quiet_loading,
    resolve_device,
    weights_policy,
)
from l2s.errors import one_line

# COCO names in detectron2's / transformers' id2label that GenEval's object_names.txt renames
# (GenEval's own list is mmdet's COCO order with these three changed).
COCO_TO_GENEVAL = {"mouse": "computer mouse", "remote": "tv remote",
                   "keyboard": "computer keyboard"}
# Mask2Former reads images at GenEval's test scale (mmdet's Mask2Former configs: shorter side
# 800, longer at most 1333, aspect kept; detectron2's COCO evaluation of Meta's release too), not
# at the 384 x 384 of the hub's processor config.
MASK2FORMER_TEST_SIZE = {"shortest_edge": 800, "longest_edge": 1333}


def geneval_label(name: str) -> str:
    """A detector's class name in GenEval's vocabulary ("mouse" -> "computer mouse", "TV" ->
    "tv"); names GenEval does not rename pass through, lower-cased."""
    name = " ".join(name.lower().split())
    return COCO_TO_GENEVAL.get(name, name)


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool instance masks -> (N, 4) float32 boxes x0, y0, x1, y1 in pixels: first
    column/row of the mask and one past its last (mmdet's mask2bbox, whose boxes GenEval's
    Mask2Former scores come with); an empty mask gets (0, 0, 0, 0)."""
    boxes = np.zeros((len(masks), 4), np.float32)
    cols, rows = masks.any(axis=1), masks.any(axis=2)  # (N, W), (N, H)
    for i, (c, r) in enumerate(zip(cols, rows, strict=True)):
        xs, ys = np.flatnonzero(c), np.flatnonzero(r)
        if len(xs) and len(ys):
            boxes[i] = xs[0], ys[0], xs[-1] + 1, ys[-1] + 1
    return boxes


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """(N, 4) x0, y0, x1, y1 boxes clipped to a width x height image."""
    out = boxes.astype(np.float32, copy=True)
    out[:, 0::2] = out[:, 0::2].clip(0, width)
    out[:, 1::2] = out[:, 1::2].clip(0, height)
    return out


# ------------------------------------ transformers models by hub id or folder (+ CLIP colours)

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def hf_model_available(name: str) -> bool:
    """Whether a transformers model loads with no network: its config and weights (safetensors,
    or pickles when allowed) are in a local folder or the HF cache."""
    weights = SAFE_WEIGHTS + (PICKLED_WEIGHTS if allow_pickle() else ())
    return hub_file(name, "config.json") is not None and any(
        hub_file(name, w) is not None for w in weights)


def model_config(name: str, option: str, error: type[Exception] = DetectorError) -> dict:
    """The config.json of a folder or hub id (`option` is the flag that named it, for the
    error), fetching it only when the hub can be reached; ``error`` says how to get it."""
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise error(f"{option} {name}: the folder has no config.json; give a folder "
                                "written by transformers' save_pretrained (config.json, weights "
                                "and processor files) or a hub id")
        return json.loads((local / "config.json").read_text())
    if local.exists() or not is_hub_id(name):
        raise error(f"{option} {name}: no such folder, and not a hub id (org/name)")
    path = hub_file(name, "config.json")
    if path is None:
        if hf_offline() or not hub_reachable():
            why = ("HF_HUB_OFFLINE=1 is set" if hf_offline() else
                   "the Hugging Face hub cannot be reached from here")
            raise error(
                f"{name} is not in the HF cache ({hf_cache_dir()}) and {why}: run `hf download "
                f"{name}` (older huggingface_hub: `huggingface-cli download {name}`) on a "
                "machine with internet access and copy the cache (or point HF_HOME at it), or "
                f"pass {option} PATH to a folder holding the model")
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(name, "config.json"))
        except Exception as e:  # not found, gated, network: one line, not a traceback
            raise error(f"{option} {name}: could not fetch its config.json from the hub "
                                f"({one_line(e)})") from e
    return json.loads(path.read_text())


def from_pretrained(load: Callable[..., object], name: str, option: str, model: bool = True,
                    error: type[Exception] = DetectorError, **overrides):
    """`load(name, **overrides)` (a from_pretrained) with one-line ``error``s; a model loads in
    fp32 (scores as the checkpoint's authors computed them) from safetensors unless pickles are
    allowed."""
    local = Path(name).expanduser()
    src = str(local) if local.is_dir() else name
    if model:
        overrides = {**weights_policy(), "dtype": torch.float32, **overrides}
    try:
        return load(src, **overrides)
    except (OSError, ValueError) as e:
        pickled = [] if allow_pickle() else pickled_files(name)
        if pickled:
            raise error(pickle_refusal(f"{option} {name}", pickled)) from e
        raise error(f"could not load {name} ({option}): {one_line(e)}") from e


def load_hf_detector(name: str, device: str | None = None):
    """A Mask2Former or OWLv2/OWL-ViT Detector from a hub id or folder, by its config's
    model_type."""
    kind = model_config(name, "--detector", DetectorError).get("model_type")
    if kind not in _ADAPTERS:
        raise DetectorError(f"--detector {name}: model_type {kind!r} is not a detector l2s can "
                            "drive; use a Mask2Former instance-segmentation model (e.g. "
                            "mask2former) or an OWLv2 / OWL-ViT model (e.g. owlv2)")
    quiet_loading()
    return _ADAPTERS[kind](name, resolve_device(device))


# --------------------------------------------------------------------------------- adapters

class Mask2FormerDetector:
    """COCO instance segmentation: every instance, box from its mask, GenEval's labels."""

    rules = GENEVAL_RULES
    open_vocabulary = False

    def __init__(self, name: str, model, processor, device: torch.device):
        self.name, self.model, self.processor, self.device = name, model, processor, device
        self.labels = {int(i): geneval_label(n) for i, n in model.config.id2label.items()}

    @classmethod
    def load(cls, name: str, device: torch.device) -> Mask2FormerDetector:
        # Its (training) loss imports scipy even at inference: a dependency (pyproject.toml).
        from transformers import AutoImageProcessor
        from transformers import Mask2FormerForUniversalSegmentation as Model

        model = from_pretrained(Model.from_pretrained, name, "--detector", error=DetectorError)
        processor = from_pretrained(AutoImageProcessor.from_pretrained, name, "--detector",
                                    model=False, error=DetectorError,
                                    size=dict(MASK2FORMER_TEST_SIZE))
        return cls(name, model.to(device).eval(), processor, device)

    @torch.inference_mode()
    def detect(self, image: np.ndarray, names: Sequence[str]) -> ImageDetections:
        from PIL import Image

        h, w = image.shape[:2]
        inputs = self.processor(images=Image.fromarray(image), return_tensors="pt")
        out = self.model(pixel_values=inputs["pixel_values"].to(self.device))
        res = self.processor.post_process_instance_segmentation(
            out, threshold=0.0, target_sizes=[(h, w)], return_binary_maps=True)[0]
        info = res["segments_info"]
        if not info:
            return ImageDetections([], [])
        masks = res["segmentation"].bool().cpu().numpy()  # (N, H, W)
        dets = [Detection(self.labels.get(s["label_id"], str(s["label_id"])),
                          tuple(float(v) for v in box), float(s["score"]))
                for s, box in zip(info, boxes_from_masks(masks), strict=True)]
        return ImageDetections(dets, list(masks))


class OwlDetector:
    """OWLv2 / OWL-ViT queried with the prompt's object names: every box, no masks."""

    rules = OWL_RULES
    open_vocabulary = True

    def __init__(self, name: str, model, processor, device: torch.device):
        self.name, self.model, self.processor, self.device = name, model, processor, device

    @classmethod
    def load(cls, name: str, device: torch.device) -> OwlDetector:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        model = from_pretrained(AutoModelForZeroShotObjectDetection.from_pretrained, name,
                                "--detector", error=DetectorError)
        processor = from_pretrained(AutoProcessor.from_pretrained, name, "--detector",
                                    model=False, error=DetectorError)
        return cls(name, model.to(device).eval(), processor, device)

    @torch.inference_mode()
    def detect(self, image: np.ndarray, names: Sequence[str]) -> ImageDetections:
        from PIL import Image

        names = list(names)
        if not names:
            return ImageDetections([], [])
        h, w = image.shape[:2]
        inputs = self.processor(text=[names], images=Image.fromarray(image), return_tensors="pt")
        out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        # OWLv2 pads the image to a square at the bottom/right: its post-processing scales the
        # relative boxes by max(h, w) (OWL-ViT's by w and h); boxes in the padding are clipped.
        res = self.processor.post_process_grounded_object_detection(
            out, threshold=0.0, target_sizes=[(h, w)])[0]
        boxes = clip_boxes(res["boxes"].float().cpu().numpy(), w, h)
        dets = [Detection(names[int(label)], tuple(float(v) for v in box), float(score))
                for label, box, score in zip(res["labels"].tolist(), boxes,
                                             res["scores"].float().tolist(), strict=True)]
        return ImageDetections(dets, [None] * len(dets))


_ADAPTERS: dict[str, Callable[[str, torch.device], object]] = {
    "mask2former": Mask2FormerDetector.load,
    "owlv2": OwlDetector.load,
    "owlvit": OwlDetector.load,
}

__all__ = ["COCO_TO_GENEVAL", "MASK2FORMER_TEST_SIZE", "Mask2FormerDetector", "OwlDetector",
           "boxes_from_masks", "clip_boxes", "geneval_label", "load_hf_detector"]
