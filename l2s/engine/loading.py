"""Turn a --model value (preset, hub id or local folder) into a ready Denoiser.

Which family loads it comes from the registry: a preset names its family; a hub id or folder
goes to the family that claims its diffusers pipeline class (``model_index.json``), else to
the fallback family. Device, dtype and HF-cache helpers shared by every family live here,
and the loading of transformers models by hub id or folder (the benchmark detectors, CLIP).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import torch

from l2s.engine.backbone import BackboneError, Denoiser, resolve_sdpa_backends
from l2s.engine.registry import (
    LoadRequest,
    Preset,
    family_for_pipeline,
    get_family,
    presets,
)
from l2s.errors import one_line


def resolve_device(device: str | None = None) -> torch.device:
    """The requested device, else $L2S_DEVICE, else this process's GPU under a launcher
    (``rank_device``), else CUDA when present, else the CPU; a device this machine does not
    have is a BackboneError naming where the request came from."""
    where = "--device" if device else "L2S_DEVICE"
    device = device or os.environ.get("L2S_DEVICE")
    if not device:
        return rank_device() or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BackboneError(f"{where}={device!r} is not a device: use cpu, cuda, cuda:N or mps"
                            ) from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            build = (f"torch {torch.__version__} built with CUDA {torch.version.cuda}"
                     if torch.version.cuda else f"torch {torch.__version__} is a CPU build")
            raise BackboneError(f"{where}={device} but this machine has no usable CUDA GPU "
                                f"({build}): use {where}=cpu, or unset it to pick "
                                "automatically")
        if dev.index is not None and dev.index >= n:
            raise BackboneError(f"{where}={device} but there are only {n} CUDA device(s) "
                                f"(cuda:0..cuda:{n - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise BackboneError(f"{where}={device} but MPS is not available here: use cpu")
    return dev


def rank_device() -> torch.device | None:
    """cuda:LOCAL_RANK when a launcher (`accelerate launch`, torchrun) started this process on a
    CUDA machine, else None: one GPU per process, where every process would stack on cuda:0."""
    local = os.environ.get("LOCAL_RANK")
    if local is None or not torch.cuda.is_available():
        return None
    n = torch.cuda.device_count()
    if not local.isdigit() or int(local) >= n:
        raise BackboneError(f"LOCAL_RANK={local!r} names no GPU of this machine's {n} "
                            f"(cuda:0..cuda:{n - 1}): start at most {n} processes per machine, "
                            "or set L2S_DEVICE")
    return torch.device("cuda", int(local))


def allow_pickle() -> bool:
    """Whether pickled (.bin) weights may be loaded: only when the user says so
    (`l2s --allow-pickle ...` sets L2S_ALLOW_PICKLE=1)."""
    return os.environ.get("L2S_ALLOW_PICKLE", "") not in ("", "0")


def quiet_loading() -> None:
    """No "Loading weights" progress bars from transformers / diffusers on our stderr."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp16 on GPUs and fp32 on the CPU unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise BackboneError(f"unknown dtype {dtype!r}: use one of fp32, fp16, bf16")
    return names[dtype]


def hf_cache_dir() -> Path:
    """Where huggingface_hub looks for downloaded models (honours HF_HOME / HF_HUB_CACHE)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hf_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cached_file(repo: str, filename: str) -> str | None:
    """A file of a hub repo in the local HF cache, or None (nothing is downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo, filename)
    except Exception:  # not a valid repo id
        return None
    return hit if isinstance(hit, str) else None


def config_json(source: str, filename: str) -> dict | None:
    """A JSON file (``model_index.json``, ``transformer/config.json``) of a folder or of a hub
    repo in the HF cache, or None when absent or unreadable (nothing is downloaded)."""
    path = hub_file(source, filename)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pipeline_class(source: str) -> str | None:
    """The diffusers pipeline class a folder or cached hub repo declares, if any."""
    return (config_json(source, "model_index.json") or {}).get("_class_name")


def is_available_locally(model: str) -> bool:
    """Whether `model` can load with no network: shipped, a local folder, or in the HF cache."""
    preset = presets().get(model)
    if preset is not None and get_family(preset.family).available is not None:
        return get_family(preset.family).available(preset)
    repo = preset.repo_id if preset and preset.repo_id else model
    if Path(repo).expanduser().is_dir():
        return True
    return _cached_file(repo, "model_index.json") is not None


def _check_model_arg(model: str, preset: str | None = None) -> None:
    """Fail early, with the fix, on a --model that is neither a folder nor a hub id, and on a
    hub id that is not cached while the hub cannot be reached (instead of retrying for ~25 s).
    ``preset``: the preset whose hub id ``model`` is (only presets build with random weights)."""
    path = Path(model).expanduser()
    if path.is_file():
        raise BackboneError(f"--model {model} is a file: give a diffusers-layout folder (with "
                            f"unet/, text_encoder/, ...), a hub id or a preset "
                            f"({', '.join(presets())})")
    if path.exists():
        return
    if model.startswith((".", "/", "~")):
        raise BackboneError(f"no folder {model!r}: give a diffusers-layout folder, a hub id "
                            f"or a preset ({', '.join(presets())})")
    if model.count("/") != 1:
        raise BackboneError(f"unknown model {model!r}: use a preset ({', '.join(presets())}), "
                            "a hub id such as org/name, or a local diffusers folder")
    if not is_available_locally(model) and (hf_offline() or not hub_reachable()):
        why = ("HF_HUB_OFFLINE=1 is set" if hf_offline() else
               "the Hugging Face hub cannot be reached from here")
        raise BackboneError(f"{model} is not in the HF cache ({hf_cache_dir()}) and {why}: run "
                            f"`hf download {model}` on a connected machine and copy the cache "
                            "(or point HF_HOME at it), or pass --model PATH to a local "
                            "diffusers folder" + (
                                f"; to time its architecture without the weights: `l2s speed "
                                f"--model {preset} --random-weights`" if preset else ""))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def load_backbone(
    model: str = "toy",
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    random_weights: bool = False,
    image_size: int | None = None,
) -> Denoiser:
    """Load a backbone by preset name ("toy", "sd1.4", "sd2.1", ...), hub id or local folder."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    resolve_sdpa_backends(None)  # a bad $L2S_SDPA_BACKENDS is refused before loading
    quiet_loading()
    preset = presets().get(model)
    if preset is None and random_weights:
        random_weights_preset(None, presets().values())  # refuses, naming the presets
    if (preset is None or preset.repo_id) and not random_weights:
        _check_model_arg(preset.repo_id if preset else model, preset.name if preset else None)
    if preset is not None:
        family, source = get_family(preset.family), preset.repo_id or model
    else:
        family, source = family_for_pipeline(pipeline_class(model)), model
    return family.load(LoadRequest(model=model, preset=preset, source=source, device=dev,
                                   dtype=dt, image_size=image_size,
                                   random_weights=random_weights))


def random_weights_preset(preset: Preset | None, candidates: Iterable[Preset]) -> Preset:
    """The preset a ``--random-weights`` load builds (its ``configs`` hold the exact
    architecture); a hub id, a folder or a preset without one is refused, naming the presets
    of ``candidates`` that have one. Every family's loader and ``load_backbone`` ask here."""
    if preset is None or not preset.configs:
        raise BackboneError("--random-weights needs a preset with a built-in architecture: "
                            + ", ".join(p.name for p in candidates if p.configs))
    return preset


def hf_load_error(repo: str, local: Path | None, e: Exception) -> BackboneError:
    """The one-line error for a hub model that could not be loaded: where l2s looked, and how
    to get it (offline or online)."""
    where = local if local is not None else f"the HF cache ({hf_cache_dir()})"
    how = ("fix or replace the folder's files" if local is not None else
           "HF_HUB_OFFLINE=1 is set, so nothing was downloaded: unset it to download, or "
           f"copy a cache that has it (`hf download {repo}` on a connected machine)"
           if hf_offline() else
           f"download it first with `hf download {repo}` on a machine with internet access, "
           "or pass --model PATH to a local diffusers folder")
    return BackboneError(f"could not load {repo!r} from {where}: {how} "
                         f"({one_line(e, 200)})")


def _classifier_card(model: str) -> str | None:
    from l2s.classifier.model import default_classifier

    card = default_classifier(model)
    return str(card) if card else None


def describe_models() -> list[dict]:
    """One record per preset: what it is, its sampling and steering defaults, whether it loads
    offline, its default classifier."""
    from l2s.classifier.model import card_origin

    return [
        {
            "name": p.name,
            "family": p.family,
            "repo_id": p.repo_id,
            "description": p.description,
            "image_size": p.image_size,
            "defaults": asdict(p.defaults),  # steps, guidance, steering (SteerDefaults)
            "training": asdict(p.training),  # classifier lr and size (TrainDefaults)
            "available": is_available_locally(p.name),
            "random_weights": bool(p.configs),
            "classifier": card,
            "classifier_origin": card_origin(card) if card else None,
        }
        for p in presets().values()
        for card in [_classifier_card(p.name)]
    ]


# ------------------------------------------------ transformers models (detectors, CLIP colours)

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def hub_file(name: str, filename: str) -> Path | None:
    """`filename` of a local folder or of a hub repo already in the HF cache, else None."""
    local = Path(name).expanduser()
    path = local / filename if local.is_dir() else _cached_file(name, filename)
    return Path(path) if path is not None and Path(path).is_file() else None


def hf_model_available(name: str) -> bool:
    """Whether a transformers model loads with no network: its config and weights (safetensors,
    or pickles when allowed) are in a local folder or the HF cache."""
    weights = SAFE_WEIGHTS + (PICKLED_WEIGHTS if allow_pickle() else ())
    return hub_file(name, "config.json") is not None and any(
        hub_file(name, w) is not None for w in weights)


def model_config(name: str, option: str, error: type[Exception] = BackboneError) -> dict:
    """The config.json of a folder or hub id (`option` is the flag that named it, for the
    error), fetching it only when the hub can be reached; ``error`` says how to get it."""
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise error(f"{option} {name}: the folder has no config.json; give a folder "
                                "written by transformers' save_pretrained (config.json, weights "
                                "and processor files) or a hub id")
        return json.loads((local / "config.json").read_text())
    if local.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
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
                    error: type[Exception] = BackboneError, **overrides):
    """`load(name, **overrides)` (a from_pretrained) with one-line ``error``s; a model loads in
    fp32 (scores as the checkpoint's authors computed them) from safetensors unless pickles are
    allowed."""
    local = Path(name).expanduser()
    src = str(local) if local.is_dir() else name
    if model:
        overrides = {"use_safetensors": None if allow_pickle() else True, "dtype": torch.float32,
                     **overrides}
    try:
        return load(src, **overrides)
    except (OSError, ValueError) as e:
        pickled = [w for w in PICKLED_WEIGHTS if hub_file(name, w) is not None]
        if pickled and not allow_pickle():
            raise error(f"{option} {name} has pickled weights ({pickled[0]}) and no "
                                ".safetensors: l2s loads safetensors only, since a pickle can run "
                                "code when loaded; convert them, or, if you trust the source, "
                                "run `l2s --allow-pickle ...`") from e
        raise error(f"could not load {name} ({option}): {one_line(e)}") from e
