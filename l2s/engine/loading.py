"""Turn a --model value (preset, hub id or local folder) into a ready Denoiser, under one
weight-loading policy that every family loads through.

Which family loads a model comes from the registry: a preset names its family; a hub id or
folder goes to the family that claims the diffusers pipeline class its ``model_index.json``
names (``l2s.engine.registry.family_for_source``). The policy: weights load from safetensors
only unless the user allows pickles (``l2s --allow-pickle``), since a pickle can run code when
loaded (``load_components``, ``pickle_refusal``); a folder is checked for every component
before anything loads (``check_folder``); ``--random-weights`` builds a preset's exact
architecture, every network materialised once on the device, with tokenizers built from one
word list (``random_weights_preset``, ``random_tokenizers``, ``build_random``). Device and
dtype choices shared by every family live here too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path

import torch

from l2s.engine.backbone import BackboneError, Denoiser, resolve_sdpa_backends
from l2s.engine.hub import (
    cached_file,
    config_json,
    hf_cache_dir,
    hf_offline,
    hub_file,
    hub_reachable,
    is_hub_id,
)
from l2s.engine.registry import (
    LoadRequest,
    Preset,
    family_for_source,
    get_family,
    presets,
)
from l2s.errors import one_line

__all__ = ["allow_pickle", "build_random", "check_folder", "clip_text_config", "config_json",
           "describe_presets", "hf_cache_dir", "hf_load_error", "hf_offline", "hub_file",
           "hub_reachable", "is_available_locally", "load_architecture", "load_backbone",
           "load_components", "pickle_refusal", "pickled_files", "quiet_loading",
           "RANDOM_WEIGHTS_WORDS", "random_tokenizers", "random_weights_preset", "rank_device",
           "resolve_device", "resolve_dtype", "weights_policy"]


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
    except (RuntimeError, TypeError):
        dev = None
    # torch knows more device types (meta, xpu, ...) than l2s runs on: `--device meta` was a
    # NotImplementedError traceback while loading
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
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


def quiet_loading() -> None:
    """No "Loading weights" progress bars from transformers / diffusers on our stderr."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings off while a diffusers pipeline module is imported for one of its
    functions: the import pulls in the pipeline's image processors, and without torchvision
    transformers warns on stderr about processors l2s never uses."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp16 on GPUs and fp32 on the CPU unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise BackboneError(f"--dtype {dtype!r} is not a dtype: use float32, float16 or "
                            "bfloat16 (or fp32, fp16, bf16)")
    return names[dtype]


def is_available_locally(model: str) -> bool:
    """Whether `model` can load with no network: shipped, a local folder, or in the HF cache."""
    preset = presets().get(model)
    if preset is not None and get_family(preset.family).available is not None:
        return get_family(preset.family).available(preset)
    repo = preset.repo_id if preset and preset.repo_id else model
    if Path(repo).expanduser().is_dir():
        return True
    return cached_file(repo, "model_index.json") is not None


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
    if not is_hub_id(model):
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


def load_backbone(
    model: str = "toy",
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    random_weights: bool = False,
    image_size: int | None = None,
) -> Denoiser:
    """Load a backbone by preset name ("toy", "sd1.4", "sd2.1", ...), hub id or local folder."""
    if not isinstance(model, str | os.PathLike) or not str(model).strip():
        raise BackboneError(f"--model must be a preset name, hub id or folder, got {model!r}")
    model = os.fspath(model)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    resolve_sdpa_backends(None)  # a bad $L2S_SDPA_BACKENDS is refused before loading
    quiet_loading()
    preset = presets().get(model)
    if random_weights:  # presets with a built-in architecture only; the rest are refused here
        random_weights_preset(preset, presets().values())
    elif preset is None or preset.repo_id:
        _check_model_arg(preset.repo_id if preset else model, preset.name if preset else None)
    if preset is not None:
        family, source = get_family(preset.family), preset.repo_id or model
    else:
        family, source = family_for_source(model), model
    return family.load(LoadRequest(model=model, preset=preset, source=source, device=dev,
                                   dtype=dt, image_size=image_size,
                                   random_weights=random_weights))


def load_architecture(model: str, *, dtype: str | torch.dtype = "fp32",
                      image_size: int | None = None) -> Denoiser:
    """A preset's exact architecture on the meta device: its layer list, heads, text length
    and parameter shapes, with no weights allocated, read or downloaded (what `l2s classifier
    import` and `l2s speed`'s memory estimate need). Refused, naming the presets that have
    one, for a hub id, a folder or a preset without a built-in architecture."""
    preset = random_weights_preset(presets().get(model), presets().values())
    quiet_loading()
    den = get_family(preset.family).load(LoadRequest(
        model=model, preset=preset, source=preset.repo_id or model,
        device=torch.device("meta"), dtype=resolve_dtype(dtype, torch.device("cpu")),
        image_size=image_size, random_weights=True))
    den.name = preset.name
    return den


# ------------------------------------------------------------------------ the loading policy

def allow_pickle() -> bool:
    """Whether pickled (.bin) weights may be loaded: only when the user says so
    (`l2s --allow-pickle ...` sets L2S_ALLOW_PICKLE=1)."""
    return os.environ.get("L2S_ALLOW_PICKLE", "") not in ("", "0")


def weights_policy() -> dict:
    """The keyword arguments every network's ``from_pretrained`` gets: safetensors only,
    unless the user allowed pickles (a .bin file can run code when loaded)."""
    return {"use_safetensors": None if allow_pickle() else True}


# The names diffusers and transformers give pickled weights (single files and shard indexes).
PICKLED_WEIGHTS = ("diffusion_pytorch_model.bin", "pytorch_model.bin",
                   "diffusion_pytorch_model.bin.index.json", "pytorch_model.bin.index.json")


def pickled_files(source: str, components: Iterable[str] = ("",)) -> list[str]:
    """The pickled weight files of a folder (top level and one level down), or those of a hub
    repo's ``components`` ("" for its top level) in the HF cache."""
    local = Path(source).expanduser()
    if local.is_dir():
        return sorted(p.relative_to(local).as_posix()
                      for p in [*local.glob("*.bin"), *local.glob("*/*.bin")])
    names = [f"{c}/{w}" if c else w for c in components for w in PICKLED_WEIGHTS]
    return [n for n in names if cached_file(source, n) is not None]


def pickle_refusal(what: str, pickles: list[str]) -> str:
    """The one message for weights l2s will not unpickle without ``--allow-pickle``."""
    return (f"{what} has pickled weights ({', '.join(pickles[:3])}) and no .safetensors: l2s "
            "loads safetensors only, since a pickle can run code when loaded. Convert them to "
            "safetensors, or, if you trust the files, run `l2s --allow-pickle ...`")


def check_folder(folder: Path, components: Iterable[str], kind: str) -> None:
    """Refuse, naming what is missing, a folder that is not a diffusers ``kind`` pipeline."""
    components = tuple(components)
    missing = [c for c in components if not (folder / c).is_dir()]
    if missing:
        raise BackboneError(f"{folder} is not a diffusers {kind} folder: missing "
                            f"{', '.join(m + '/' for m in missing)} "
                            f"(expected {', '.join(components)})")


def load_components(source: str, kind: str,
                    parts: Mapping[str, tuple[Callable[..., object], dict]]) -> dict:
    """The one way a family loads a folder or hub repo: ``{subfolder: (cls, kwargs)}`` ->
    ``{subfolder: cls.from_pretrained(source, subfolder=..., **kwargs)}``.

    A folder must hold every subfolder (``check_folder``); networks (``torch.nn.Module``
    classes) load under ``weights_policy``; pickled weights without ``--allow-pickle`` and
    any other failure become one-line BackboneErrors naming the fix.
    """
    local = Path(source).expanduser()
    src = str(local) if local.is_dir() else source
    networks = {sub for sub, (cls, _) in parts.items()
                if isinstance(cls, type) and issubclass(cls, torch.nn.Module)}
    if local.is_dir():
        check_folder(local, parts, kind)
        # refused before diffusers logs its own "no file named ...safetensors" error
        pickles = [] if allow_pickle() else [
            p for sub in sorted(networks) if not list((local / sub).glob("*.safetensors"))
            for p in pickled_files(str(local)) if p.startswith(f"{sub}/")]
        if pickles:
            raise BackboneError(pickle_refusal(str(local), pickles))
    out = {}
    try:
        for sub, (cls, kwargs) in parts.items():
            out[sub] = cls.from_pretrained(
                src, subfolder=sub, **{**(weights_policy() if sub in networks else {}), **kwargs})
    except (OSError, ValueError) as e:
        pickles = [] if allow_pickle() else pickled_files(source, parts)
        if pickles:
            raise BackboneError(pickle_refusal(str(local) if local.is_dir() else source,
                                               pickles)) from e
        raise hf_load_error(source, local if local.is_dir() else None, e) from e
    return out


# ------------------------------------------------------------------------ random weights

# Words the random-weights tokenizers spell as single tokens: enough for benchmark prompts;
# anything else falls back to characters (random weights read nothing).
RANDOM_WEIGHTS_WORDS = (
    "a an the of to on in at and photo left right above below top bottom next near side "
    "over under beneath dog cat person car bird teddy bear"
).split()


def random_weights_preset(preset: Preset | None, candidates: Iterable[Preset]) -> Preset:
    """The preset a ``--random-weights`` load builds (its ``configs`` hold the exact
    architecture); a hub id, a folder or a preset without one (the shipped toys) is refused,
    naming the presets of ``candidates`` that have one. ``load_backbone`` and every family's
    loader ask here."""
    if preset is None or not preset.configs:
        what = (f"the {preset.name} preset ships its trained weights" if preset is not None
                else "a hub id or folder has no built-in architecture")
        raise BackboneError(f"--random-weights builds a preset's exact architecture and {what}: "
                            "use one of " + ", ".join(p.name for p in candidates if p.configs))
    return preset


def random_tokenizers(configs: Mapping) -> tuple:
    """(CLIP tokenizer, T5 tokenizer or None) of a random-weights build, spelling
    ``RANDOM_WEIGHTS_WORDS`` as single tokens; the T5 one only when the preset's configs name
    a ``max_sequence_length``."""
    from l2s.engine.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    clip = build_clip_tokenizer(RANDOM_WEIGHTS_WORDS,
                                vocab_size=configs["text_encoder"]["vocab_size"])
    t5 = (build_t5_tokenizer(RANDOM_WEIGHTS_WORDS,
                             model_max_length=configs["max_sequence_length"])
          if "max_sequence_length" in configs else None)
    return clip, t5


def clip_text_config(config: Mapping, tokenizer):
    """A CLIPTextConfig from a preset's text-encoder config, with ``tokenizer``'s special ids."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{**config, "eos_token_id": tokenizer.eos_token_id,
                             "bos_token_id": tokenizer.bos_token_id,
                             "pad_token_id": tokenizer.pad_token_id})


def build_random(factories: Mapping[str, Callable[[], torch.nn.Module]], device: torch.device,
                 dtype: torch.dtype, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Every network of a random-weights architecture, built on the meta device and
    materialised once, in its dtype, on the device (``l2s.engine.materialise``): "vae" in
    fp32 (as every family loads its VAE), the others in ``dtype``. On the meta device itself
    (``load_architecture``) nothing is materialised: the networks keep meta parameters."""
    from l2s.engine.materialise import materialise

    if device.type == "meta":
        from accelerate import init_empty_weights

        def on_meta(make, dt):
            with init_empty_weights(include_buffers=False):
                # nn.Module.to, not diffusers' override: that one warns about casting
                return torch.nn.Module.to(make(), dt).requires_grad_(False).eval()

        return {name: on_meta(make, torch.float32 if name == "vae" else dtype)
                for name, make in factories.items()}

    return {name: materialise(make, device, torch.float32 if name == "vae" else dtype,
                              seed=seed)
            for name, make in factories.items()}


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


def describe_presets() -> list[dict]:
    """One record per preset: what it is, its sampling and steering defaults, whether it loads
    offline, whether it builds with random weights."""
    return [
        {
            "name": p.name,
            "family": p.family,
            "repo_id": p.repo_id,
            "description": p.description,
            "image_size": p.image_size,
            "defaults": asdict(p.defaults),  # steps, guidance, steering (SteerDefaults)
            "training": asdict(p.training),  # classifier lr and size (TrainDefaults)
            "inversion": asdict(p.inversion),  # fixed-point refinements (InvertDefaults)
            "available": is_available_locally(p.name),
            "random_weights": bool(p.configs),
        }
        for p in presets().values()
    ]
