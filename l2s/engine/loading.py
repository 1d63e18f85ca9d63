"""Turn a --model value (preset, hub id or local folder) into a ready Denoiser."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from l2s.engine.backbone import BackboneError, Denoiser
from l2s.engine.presets import PRESETS, Preset
from l2s.engine.tokenizers import build_clip_tokenizer
from l2s.engine.unet import UNetDenoiser

SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

# Words the locally built tokenizer of --random-weights spells as single tokens: enough for
# benchmark prompts; anything else falls back to characters (random weights read nothing).
_RANDOM_WEIGHTS_WORDS = (
    "a an the of to on in at and photo left right above below top bottom next near side "
    "over under beneath dog cat person car bird teddy bear"
).split()


def resolve_device(device: str | None = None) -> torch.device:
    """The requested device, else $L2S_DEVICE, else CUDA when present, else the CPU; a device
    this machine does not have is a BackboneError naming where the request came from."""
    where = "--device" if device else "L2S_DEVICE"
    device = device or os.environ.get("L2S_DEVICE")
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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


def is_available_locally(model: str) -> bool:
    """Whether `model` can load with no network: shipped, a local folder, or in the HF cache."""
    preset = PRESETS.get(model)
    if preset is not None and preset.family == "toy":
        from l2s.toy.model import DEFAULT_WEIGHTS_DIR

        return (DEFAULT_WEIGHTS_DIR / "unet").is_dir()
    repo = preset.repo_id if preset else model
    if Path(repo).expanduser().is_dir():
        return True
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo, "model_index.json")
    except Exception:  # not a valid repo id
        return False
    return isinstance(hit, str)


def load_backbone(
    model: str = "toy",
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    random_weights: bool = False,
    image_size: int | None = None,
) -> Denoiser:
    """Load a backbone by preset name ("toy", "sd1.4", "sd2.1"), hub id or local folder."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    quiet_loading()
    preset = PRESETS.get(model)
    if preset is not None and preset.family == "toy":
        if random_weights:
            raise BackboneError("--random-weights applies to the SD presets; the toy model "
                                "ships its trained weights")
        from l2s.toy.model import DEFAULT_WEIGHTS_DIR, load_toy_components

        try:
            unet, text_encoder, tokenizer, scheduler = load_toy_components(DEFAULT_WEIGHTS_DIR)
        except OSError as e:  # missing or corrupt weights: the message names the rebuild
            raise BackboneError(str(e)) from e
        from l2s.toy.scenes import CATEGORY_NAMES

        unet = unet.to(dev) if dt == unet.dtype else unet.to(dev, dt)
        return UNetDenoiser(unet, text_encoder.to(dev), tokenizer, scheduler,
                            name="toy", image_size=image_size, known_objects=CATEGORY_NAMES)
    if random_weights:
        if preset is None or not preset.configs:
            raise BackboneError(f"--random-weights needs a preset with a built-in architecture: "
                                f"{', '.join(n for n, p in PRESETS.items() if p.configs)}")
        return build_random_sd(preset, device=dev, dtype=dt, image_size=image_size)
    repo = preset.repo_id if preset is not None else model
    return load_sd(repo, name=model, device=dev, dtype=dt, image_size=image_size)


def _check_model_arg(model: str) -> None:
    """Fail early, with the fix, on a --model that is neither a folder nor a hub id, and on a
    hub id that is not cached while the hub cannot be reached (instead of retrying for ~25 s)."""
    path = Path(model).expanduser()
    if path.is_file():
        raise BackboneError(f"--model {model} is a file: give a diffusers-layout folder (with "
                            f"unet/, text_encoder/, ...), a hub id or a preset "
                            f"({', '.join(PRESETS)})")
    if path.exists():
        return
    if model.startswith((".", "/", "~")):
        raise BackboneError(f"no folder {model!r}: give a diffusers-layout folder, a hub id "
                            f"or a preset ({', '.join(PRESETS)})")
    if model.count("/") != 1:
        raise BackboneError(f"unknown model {model!r}: use a preset ({', '.join(PRESETS)}), "
                            "a hub id such as org/name, or a local diffusers folder")
    if not is_available_locally(model) and (hf_offline() or not hub_reachable()):
        why = ("HF_HUB_OFFLINE=1 is set" if hf_offline() else
               "the Hugging Face hub cannot be reached from here")
        raise BackboneError(f"{model} is not in the HF cache ({hf_cache_dir()}) and {why}: run "
                            f"`hf download {model}` on a connected machine and copy the cache "
                            "(or point HF_HOME at it), pass --model PATH to a local diffusers "
                            "folder, or use --random-weights for speed work")


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


def load_sd(repo: str, *, name: str, device: torch.device, dtype: torch.dtype,
            image_size: int | None = None) -> UNetDenoiser:
    """Load a Stable Diffusion 1.x/2.x folder or hub repo (diffusers layout) with from_pretrained.

    Downloads go through the HF cache; with HF_HUB_OFFLINE=1 only cached files are used.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    _check_model_arg(repo)
    # Safetensors only, unless the user allowed pickles: a .bin file can run code when loaded.
    safe = {"use_safetensors": None if allow_pickle() else True}
    local = Path(repo).expanduser()
    src = str(local) if local.is_dir() else repo
    # A local folder without vae/ is a pixel-space model (as the toy is saved).
    pixel_space = local.is_dir() and not (local / "vae").exists()
    if local.is_dir():
        missing = [c for c in SD_COMPONENTS if not (local / c).is_dir()
                   and not (c == "vae" and pixel_space)]
        if missing:
            raise BackboneError(f"{local} is not a diffusers Stable Diffusion folder: missing "
                                f"{', '.join(m + '/' for m in missing)} "
                                f"(expected {', '.join(SD_COMPONENTS)})")
    try:
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dtype,
                                                    **safe)
        # The VAE stays fp32 beside an fp16 UNet: SD VAEs overflow to inf/NaN in fp16 decoding.
        vae = None if pixel_space else AutoencoderKL.from_pretrained(
            src, subfolder="vae", torch_dtype=torch.float32, **safe)
        text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder",
                                                     torch_dtype=dtype, **safe)
        tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer")
        scheduler = DDIMScheduler.from_pretrained(src, subfolder="scheduler")
    except (OSError, ValueError) as e:
        pickles = sorted(p.relative_to(local).as_posix() for p in local.glob("*/*.bin")) \
            if local.is_dir() else []
        if pickles and not allow_pickle():
            raise BackboneError(f"{local} has pickled weights ({', '.join(pickles[:3])}) and no "
                                ".safetensors: l2s loads safetensors only, since a pickle can "
                                "run code when loaded. Convert them to safetensors, or, if you "
                                "trust the files, run `l2s --allow-pickle ...`") from e
        where = local if local.is_dir() else f"the HF cache ({hf_cache_dir()})"
        how = ("fix or replace the folder's files" if local.is_dir() else
               "HF_HUB_OFFLINE=1 is set, so nothing was downloaded: unset it to download, or "
               f"copy a cache that has it (`hf download {repo}` on a connected machine)"
               if hf_offline() else
               f"download it first with `hf download {repo}` on a machine with internet access, "
               "or pass --model PATH to a local diffusers folder")
        raise BackboneError(f"could not load {repo!r} from {where}: {how} "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    return UNetDenoiser(unet.to(device), text_encoder.to(device), tokenizer, scheduler,
                        vae.to(device) if vae is not None else None, name=name,
                        image_size=image_size)


def build_random_sd(preset: Preset, *, device: torch.device, dtype: torch.dtype,
                    image_size: int | None = None, seed: int = 0) -> UNetDenoiser:
    """The exact architecture of an SD preset with random weights and a local tokenizer."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = preset.configs
    tokenizer = build_clip_tokenizer(_RANDOM_WEIGHTS_WORDS,
                                     vocab_size=cfg["text_encoder"]["vocab_size"])
    torch.manual_seed(seed)
    text_cfg = CLIPTextConfig(**{**cfg["text_encoder"], "eos_token_id": tokenizer.eos_token_id,
                                 "bos_token_id": tokenizer.bos_token_id,
                                 "pad_token_id": tokenizer.pad_token_id})
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg["unet"]).to(dtype)
        vae = AutoencoderKL(**cfg["vae"])
        text_encoder = CLIPTextModel(text_cfg).to(dtype)
    scheduler = DDIMScheduler(**cfg["scheduler"])
    return UNetDenoiser(unet, text_encoder, tokenizer, scheduler, vae,
                        name=f"{preset.name} (random weights)",
                        image_size=image_size or preset.image_size,
                        fingerprint=f"{preset.name}-random-{seed}")


def _classifier_card(model: str) -> str | None:
    from l2s.classifier import default_classifier

    card = default_classifier(model)
    return str(card) if card else None


def describe_models() -> list[dict]:
    """One record per preset: what it is, whether it loads offline, its default classifier."""
    return [
        {
            "name": p.name,
            "family": p.family,
            "repo_id": p.repo_id,
            "description": p.description,
            "image_size": p.image_size,
            "available": is_available_locally(p.name),
            "random_weights": bool(p.configs),
            "classifier": _classifier_card(p.name),
        }
        for p in PRESETS.values()
    ]
