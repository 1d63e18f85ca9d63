"""GenEval's colour step: CLIP zero-shot colour of each object, on its masked crop over grey.

As GenEval's evaluation/evaluate_images.py does it (commit af4902f; CLIP ViT-L/14, OpenAI
weights): the object's pixels composited over a #999 grey canvas through its instance mask (the
plain image when the detector gives no mask), cropped to its box; the crop is classified among
GenEval's 10 colours, each colour's text embedding being the mean of its 3 templates' normalised
embeddings, renormalised (clip_benchmark's zero-shot classifier); the most similar colour wins.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from l2s.bench.detectors import COLOR_MODEL
from l2s.bench.geneval import COLOR_TEMPLATES, COLORS, Detection

GREY = (0x99, 0x99, 0x99)  # GenEval's default background (its bgcolor option, "#999")


def color_crop(image: np.ndarray, box: Sequence[float], mask: np.ndarray | None = None,
               background: tuple[int, int, int] = GREY) -> np.ndarray:
    """What CLIP sees of one object: (H, W, 3) uint8 image -> (h, w, 3) crop. With a (H, W)
    bool mask, pixels outside it become `background`; the crop is the box with its corners
    rounded (as PIL's crop rounds them), kept inside the image and at least one pixel."""
    if mask is not None:
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")
        image = np.where(mask[..., None], image, np.asarray(background, np.uint8))
    h, w = image.shape[:2]
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
    x1, y1 = min(max(x1, x0 + 1), w), min(max(y1, y0 + 1), h)
    return np.ascontiguousarray(image[y0:y1, x0:x1])


def color_texts(classname: str) -> list[str]:
    """GenEval's colour prompts for one class: len(COLORS) x len(COLOR_TEMPLATES), colour-major."""
    return [t.format(c=c, o=classname) for c in COLORS for t in COLOR_TEMPLATES]


def color_weights(text_features: torch.Tensor) -> torch.Tensor:
    """(len(COLORS) * len(COLOR_TEMPLATES), D) text embeddings, colour-major -> (len(COLORS), D):
    per colour the mean of the normalised template embeddings, renormalised."""
    f = torch.nn.functional.normalize(text_features.float(), dim=-1)
    f = f.view(len(COLORS), len(COLOR_TEMPLATES), -1).mean(dim=1)
    return torch.nn.functional.normalize(f, dim=-1)


def _pooled(out) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output with pooler_output (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipColors:
    """A ColorClassifier (l2s.bench.scoring): (image, detections, masks) -> a colour each."""

    def __init__(self, model, processor, device: torch.device, name: str = COLOR_MODEL):
        self.model, self.processor, self.device, self.name = model, processor, device, name
        self._weights: dict[str, torch.Tensor] = {}  # class name -> (len(COLORS), D)

    @classmethod
    def load(cls, name: str = COLOR_MODEL, device: str | None = None) -> ClipColors:
        """CLIP from a hub id (HF cache, HF_HUB_OFFLINE honoured) or a folder."""
        from transformers import AutoProcessor, CLIPModel

        from l2s.bench.detection import DetectorError
        from l2s.bench.hf_detectors import from_pretrained, model_config
        from l2s.engine.loading import quiet_loading, resolve_device

        kind = model_config(name, "--color-model", DetectorError).get("model_type")
        if kind != "clip":
            raise DetectorError(f"--color-model {name}: model_type {kind!r} is not CLIP; GenEval "
                                f"classifies colours with CLIP ({COLOR_MODEL})")
        quiet_loading()
        dev = resolve_device(device)
        model = from_pretrained(CLIPModel.from_pretrained, name, "--color-model",
                                error=DetectorError)
        processor = from_pretrained(AutoProcessor.from_pretrained, name, "--color-model",
                                    model=False, error=DetectorError)
        return cls(model.to(dev).eval(), processor, dev, name)

    @torch.inference_mode()
    def weights(self, classname: str) -> torch.Tensor:
        """(len(COLORS), D) zero-shot weights for one class name, computed once."""
        if classname not in self._weights:
            texts = self.processor(text=color_texts(classname), padding=True,
                                   return_tensors="pt")
            feats = _pooled(self.model.get_text_features(
                input_ids=texts["input_ids"].to(self.device),
                attention_mask=texts["attention_mask"].to(self.device)))
            self._weights[classname] = color_weights(feats)
        return self._weights[classname]

    @torch.inference_mode()
    def __call__(self, image: np.ndarray, detections: Sequence[Detection],
                 masks: Sequence[np.ndarray | None]) -> list[str]:
        if not detections:
            return []
        from PIL import Image

        crops = [Image.fromarray(color_crop(image, d.box, m))
                 for d, m in zip(detections, masks, strict=True)]
        pixels = self.processor(images=crops, return_tensors="pt")["pixel_values"]
        feats = _pooled(self.model.get_image_features(pixel_values=pixels.to(self.device)))
        feats = torch.nn.functional.normalize(feats.float(), dim=-1)  # (N, D)
        return [COLORS[int((f @ self.weights(d.label).T).argmax())]
                for f, d in zip(feats, detections, strict=True)]


__all__ = ["GREY", "ClipColors", "color_crop", "color_texts", "color_weights"]
