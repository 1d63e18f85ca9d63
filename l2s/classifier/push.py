"""`l2s classifier push DIR REPO_ID`: publish a classifier folder as a hub model repo.

The repo holds the folder's ``card.json`` and weights unchanged (so ``--classifier REPO_ID``
loads exactly what was trained, its sha256 checked as for a local card), and the hub's own
files: ``config.json`` (the network's architecture and classes, as ``PyTorchModelHubMixin``
models keep theirs beside ``model.safetensors``) and a ``README.md`` model card whose YAML
front matter carries ``library_name``, ``tags``, ``base_model`` and ``license`` and whose body
states the base model and its fingerprint, the training data, the metrics, the leakage
diagnostic and the licence. Nothing is uploaded but those four files.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from l2s.classifier.hub import ClassifierHubError
from l2s.classifier.model import CARD_FILE, WEIGHTS_FILE, card_problem, load_classifier, read_card
from l2s.engine.hub import hf_offline, is_hub_id

TAGS = ("l2s", "learn-to-steer", "text-to-image", "diffusion", "spatial-relations",
        "relation-classifier", "cross-attention")
CONFIG_NAME = "config.json"
README_NAME = "README.md"


@dataclass
class PushResult:
    repo_id: str
    url: str  # the commit's URL on the hub
    files: list[str]  # what was uploaded

    def to_json(self) -> dict:
        return {"repo_id": self.repo_id, "url": self.url, "files": self.files}


def base_model_id(card: Mapping) -> str | None:
    """The hub id of the backbone a card was trained on: its preset's repo, or the hub id it
    was loaded from; None for a backbone with no hub repo (the toy, a local folder)."""
    from l2s.engine.registry import get_preset

    model = str((card.get("backbone") or {}).get("model") or "")
    preset = get_preset(model) if model else None
    if preset is not None:
        return preset.repo_id
    return model if is_hub_id(model) and not Path(model).expanduser().exists() else None


def _yaml_value(value) -> str:
    return json.dumps(value)  # a JSON string or list is a YAML flow scalar / sequence


def _scalar_metrics(metrics: Mapping) -> list[tuple[str, object]]:
    return [(k, v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]


def model_card(card: Mapping, repo_id: str, license: str | None = None) -> str:
    """The README.md of a classifier repo: hub front matter, then what the card records."""
    backbone = card.get("backbone") or {}
    base = base_model_id(card)
    licence = license or ("other" if card.get("licence") else None)
    front = [f"library_name: {_yaml_value('l2s')}", f"tags: {_yaml_value(list(TAGS))}"]
    if base:
        front.append(f"base_model: {_yaml_value(base)}")
    if licence:
        front.append(f"license: {_yaml_value(licence)}")
    model_name = backbone.get("model") or backbone.get("name")
    lines = ["---", *front, "---", "",
             f"# l2s relation classifier for {model_name}", "",
             "A [Learn-to-Steer](https://arxiv.org/abs/2509.02295) relation classifier made with "
             "l2s: it reads the spatial relation between two objects "
             "from the backbone's cross-attention maps, and its loss steers generation toward "
             "the relation a prompt asks for.", "",
             "```bash",
             f'l2s steer "a dog to the left of a cat" --model {model_name} --classifier {repo_id}',
             "```", "",
             "## Base model", "",
             f"- backbone: `{model_name}`" + (f" ([{base}](https://huggingface.co/{base}))"
                                              if base else ""),
             f"- fingerprint: `{backbone.get('fingerprint')}` (`l2s steer` refuses this "
             "classifier on a backbone whose weights or attention layers give another "
             "fingerprint)",
             f"- cross-attention layers read: {len(backbone.get('layers') or [])}",
             f"- classes: {', '.join(card.get('classes') or [])}",
             f"- trained timesteps: {', '.join(str(t) for t in card.get('timesteps') or [])}",
             ""]
    lines += ["## Training data", ""]
    data = card.get("data") or {}
    for name, splits in (data.get("entries") or {}).items():
        parts = ", ".join(f"{side} {sum(v.values()) if isinstance(v, Mapping) else v}"
                          for side, v in splits.items())
        lines.append(f"- `{name}`: {parts} images/entries")
    if data.get("samples"):
        lines.append("- samples (map pairs): " + ", ".join(
            f"{k} {v}" for k, v in data["samples"].items()))
    source = card.get("source") or {}
    if source.get("file"):
        lines.append(f"- converted with `l2s classifier import` from the published checkpoint "
                     f"`{source['file']}` (sha256 {str(source.get('sha256'))[:12]}...)")
    training = card.get("training") or {}
    if training:
        keys = ("epochs", "epochs_run", "batch_size", "lr", "split", "positive_only", "seed")
        lines.append("- training: " + ", ".join(f"{k} {training[k]}" for k in keys
                                               if k in training))
    if lines[-1] == "":
        lines.append("- not recorded in the card")
    lines.append("")
    metrics = card.get("metrics") or {}
    lines += ["## Metrics", ""]
    scalar = [(k, v) for k, v in _scalar_metrics(metrics) if "caption" not in k]
    if scalar:
        lines += ["| metric | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in scalar]]
    else:
        lines.append("Not recorded in the card.")
    lines.append("")
    leak = [(k, v) for k, v in _scalar_metrics(metrics) if "caption" in k]
    if card.get("leakage") or leak:
        lines += ["## Leakage diagnostic", "",
                  "Accuracy on samples whose caption names the true relation against samples "
                  "whose caption names another one: a classifier that reads the caption "
                  "instead of the maps scores well on the first and predicts the caption on "
                  "the second.", ""]
        if leak:
            lines += ["| metric | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in leak]]
        if card.get("leakage"):
            lines += ["", "```json", json.dumps(card["leakage"], indent=2), "```"]
        lines.append("")
    lines += ["## Licence", ""]
    if card.get("licence"):
        lines.append(str(card["licence"]))
    if license:
        lines.append(f"Published under `{license}`.")
    elif not card.get("licence"):
        lines.append("Not stated (`l2s classifier push --license ID` sets one).")
    lines += ["", "## Files", "",
              f"- `{CARD_FILE}`: the l2s card (architecture, backbone, classes, timesteps, "
              "data, metrics, weights sha256)",
              f"- `{card.get('weights', WEIGHTS_FILE)}`: the weights (safetensors)",
              f"- `{CONFIG_NAME}`: the architecture and classes", ""]
    return "\n".join(lines)


def hub_config(card: Mapping) -> dict:
    """config.json of a classifier repo: what builds the network and reads its logits."""
    return {"library_name": "l2s", "format": card.get("format"),
            "architecture": card.get("architecture"), "classes": card.get("classes"),
            "timesteps": card.get("timesteps"), "map_size": card.get("map_size"),
            "backbone": {k: (card.get("backbone") or {}).get(k)
                         for k in ("name", "model", "fingerprint")}}


def push_classifier(folder: str | Path, repo_id: str, *, private: bool = False,
                    license: str | None = None, commit_message: str | None = None
                    ) -> PushResult:
    """Upload the classifier in local ``folder`` to hub repo ``repo_id`` (created if missing)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    src = Path(folder).expanduser()
    if not src.exists():
        raise ClassifierHubError(f"l2s classifier push {folder}: no such local folder: pass the "
                                 "folder `l2s train` (or `l2s classifier import`) wrote")
    if not is_hub_id(repo_id):
        raise ClassifierHubError(f"l2s classifier push: REPO_ID {repo_id!r} is not a hub repo "
                                 "id: write it as user/name (or org/name)")
    card_path, card = read_card(src)
    load_classifier(card_path)  # the weights match the card (sha256, shapes) before upload
    problem = card_problem(card)
    if problem:
        raise ClassifierHubError(f"card {card_path} {problem}: fix the card before pushing")
    if card.get("source") and not license:
        raise ClassifierHubError(
            f"{card_path} was converted from the published checkpoint "
            f"{card['source'].get('file')} ({card.get('licence', 'the authors licence')}): "
            "l2s does not republish the authors' classifiers; pass --license ID only if you "
            "hold the right to redistribute it")
    if hf_offline():
        raise ClassifierHubError("l2s classifier push: HF_HUB_OFFLINE is set: unset it to "
                                 "upload")
    weights = str(card.get("weights", WEIGHTS_FILE))
    with tempfile.TemporaryDirectory(prefix="l2s-push-") as tmp:
        stage = Path(tmp)
        shutil.copyfile(card_path, stage / CARD_FILE)
        shutil.copyfile(card_path.parent / weights, stage / weights)
        (stage / CONFIG_NAME).write_text(json.dumps(hub_config(card), indent=2) + "\n")
        (stage / README_NAME).write_text(model_card(card, repo_id, license))
        files = sorted(p.name for p in stage.iterdir())
        api = HfApi()
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(folder_path=str(stage), repo_id=repo_id,
                                     repo_type="model",
                                     commit_message=commit_message
                                     or f"l2s classifier for {card['backbone'].get('name')}")
        except (HfHubHTTPError, OSError, ValueError) as e:
            raise ClassifierHubError(
                f"l2s classifier push: uploading to {repo_id} failed ({e}): log in with a "
                "write token (`hf auth login`) and check the repo id") from None
    return PushResult(repo_id=repo_id, url=str(getattr(info, "commit_url", info)), files=files)
