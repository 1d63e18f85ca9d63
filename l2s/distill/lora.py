"""LoRA adapters of a backbone's denoising network: attach (peft), save and read in diffusers'
format, and apply to a ``Denoiser`` merged into its weights (no extra cost per step).

A LoRA folder holds ``pytorch_lora_weights.safetensors`` written by the diffusers pipeline class
of the network (``StableDiffusionPipeline.save_lora_weights`` for a UNet, FluxPipeline and
StableDiffusion3Pipeline for their transformers), so ``pipeline.load_lora_weights(folder)``
reads it, and ``card.json``: the base model's fingerprint, the recipe, the data and the
measured numbers. The toys ship theirs (``--lora toy``: the model's own, ``shipped_lora``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from l2s.engine.backbone import Denoiser
from l2s.engine.loading import quiet_transformers
from l2s.errors import L2SError

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA weight name
CARD_FILE = "card.json"
ADAPTER = "l2s-distill"  # the adapter name while a LoRA is attached
# Where the shipped LoRAs live, by preset (l2s/loras/<preset>/).
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "loras"
# The projections a LoRA adapts by default: every attention layer's q/k/v/out (self- and
# cross-attention), as diffusers' own LoRA training scripts do.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoRAError(L2SError, ValueError):
    """A LoRA folder that cannot be read or does not fit the backbone; says what to do."""


@dataclass(frozen=True)
class LoRASpec:
    """The adapter's shape: rank, scale numerator and the modules it adapts."""

    rank: int = 8
    alpha: float = 8.0  # the update is scaled by alpha / rank
    targets: tuple[str, ...] = DEFAULT_TARGETS


def _pipeline_class(net: nn.Module):
    """The diffusers pipeline class whose LoRA loader reads ``net``'s adapters, and the key
    prefix of that network in its LoRA files ("unet" or "transformer")."""
    import diffusers

    name = type(net).__name__
    table = {"UNet2DConditionModel": "StableDiffusionPipeline",
             "FluxTransformer2DModel": "FluxPipeline",
             "SD3Transformer2DModel": "StableDiffusion3Pipeline"}
    if name not in table:
        raise LoRAError(f"LoRA: no diffusers LoRA loader for a {name} network (supported: "
                        f"{', '.join(table)})")
    with quiet_transformers():  # the pipeline module's image processors warn without torchvision
        cls = getattr(diffusers, table[name])
    return cls, "unet" if name == "UNet2DConditionModel" else "transformer"


def network_attribute(denoiser: Denoiser) -> str:
    """The attribute of ``denoiser`` holding the network a LoRA adapts (its attention model:
    ``unet`` or ``transformer``)."""
    net = denoiser.attention_model
    for name in ("unet", "transformer"):
        if getattr(denoiser, name, None) is net:
            return name
    raise LoRAError(f"LoRA: {denoiser.name}'s network is not a unet or transformer attribute")


def check_spec(net: nn.Module, spec: LoRASpec) -> None:
    """Refuse targets ``net`` lacks and a rank wider than the layers it adapts, before any
    work (were: found after every image of the data phase was generated; a rank of 10^20 a
    torch traceback)."""
    targets = list(spec.targets)
    names = [n for n, _ in net.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise LoRAError(f"LoRA targets {', '.join(missing)} name no module of "
                        f"{type(net).__name__}: choose among its module names")
    widths = [min(m.in_features, m.out_features) for n, m in net.named_modules()
              if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t)
                                                  for t in targets)]
    if widths and spec.rank > min(widths):
        raise LoRAError(f"--rank {spec.rank} is wider than the layers it adapts (the narrowest "
                        f"is {min(widths)}): pass --rank {min(widths)} or less")


def attach(net: nn.Module, spec: LoRASpec, seed: int = 0) -> list[nn.Parameter]:
    """Add a fresh trainable LoRA (peft) to ``net``; the base weights stay frozen. Returns the
    LoRA parameters. lora_B starts at zero, so the adapted network starts as the base."""
    from peft import LoraConfig

    targets = list(spec.targets)
    check_spec(net, spec)
    torch.manual_seed(seed)
    net.requires_grad_(False)
    net.add_adapter(LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=targets,
                               init_lora_weights="gaussian"), adapter_name=ADAPTER)
    params = [p for n, p in net.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def lora_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The attached LoRA's tensors under peft's names (module path + lora_A/lora_B.weight)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone().contiguous()
            for k, v in get_peft_model_state_dict(net, adapter_name=ADAPTER).items()}


def set_lora_state(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load tensors written by ``lora_state`` into the attached LoRA (a resumed checkpoint)."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(net, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise LoRAError(f"LoRA checkpoint has tensors this adapter lacks: {unexpected[:3]}")


def save_lora(folder: str | Path, net: nn.Module, spec: LoRASpec, card: dict) -> Path:
    """Write the attached LoRA of ``net`` into ``folder`` in diffusers' format, and its card."""
    import os
    import tempfile

    from l2s.inversion.cache import atomic_write_text, file_mode, temp_prefix, writing

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cls, prefix = _pipeline_class(net)
    metadata = {"r": spec.rank, "lora_alpha": spec.alpha,
                "target_modules": sorted(spec.targets)}
    # written beside, then renamed into place with the umask's mode: a killed run never leaves
    # half a weights file, and others can read it (diffusers writes it owner-only)
    with writing(folder / WEIGHTS_FILE), \
            tempfile.TemporaryDirectory(dir=folder, prefix=temp_prefix()) as tmp:
        cls.save_lora_weights(tmp, **{f"{prefix}_lora_layers": lora_state(net),
                                      f"{prefix}_lora_adapter_metadata": metadata})
        os.chmod(Path(tmp) / WEIGHTS_FILE, file_mode())
        os.replace(Path(tmp) / WEIGHTS_FILE, folder / WEIGHTS_FILE)
    atomic_write_text(folder / CARD_FILE, json.dumps(card, indent=2, sort_keys=True) + "\n")
    return folder


def read_card(folder: str | Path) -> dict:
    """A LoRA folder's card ({} when it has none: a LoRA trained elsewhere)."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LoRAError(f"--lora: {path} is not a readable card ({e}); rebuild the LoRA with "
                        "`l2s distill`") from e


def shipped_lora(model: str) -> Path | None:
    """The LoRA shipped for preset ``model`` (l2s/loras/<model>/), None when none ships."""
    folder = SHIPPED_DIR / model
    return folder if (folder / WEIGHTS_FILE).is_file() else None


def resolve_lora(lora: str | None, model: str) -> Path:
    """``--lora`` as a folder: a path, or a preset name (``toy``) / None for the model's shipped
    LoRA. A missing one is a one-line error naming the fix."""
    if lora is None or (lora == model and not Path(lora).is_dir()):
        found = shipped_lora(model)
        if found is None:
            raise LoRAError(f"--lora: no LoRA ships with --model {model}; give --lora DIR (a "
                            "folder written by `l2s distill`)")
        return found
    if not Path(lora).is_dir() and shipped_lora(lora) is not None:
        return shipped_lora(lora)
    folder = Path(lora)
    if not (folder / WEIGHTS_FILE).is_file():
        what = "does not exist" if not folder.exists() else f"has no {WEIGHTS_FILE}"
        raise LoRAError(f"--lora {lora}: {what}; give a folder written by `l2s distill` (or "
                        f"`--lora {model}` for the model's shipped LoRA, where one ships)")
    return folder


def check_base(folder: Path, denoiser: Denoiser) -> None:
    """Refuse a LoRA whose card names another base model than ``denoiser``."""
    base = read_card(folder).get("base_fingerprint")
    if base is not None and base != denoiser.fingerprint:
        raise LoRAError(f"--lora {folder}: distilled on another base model (fingerprint "
                        f"{base[:12]}, this model {denoiser.fingerprint[:12]}); use a LoRA "
                        "distilled on this --model")


def merge_lora(net: nn.Module, folder: str | Path) -> nn.Module:
    """Load the LoRA in ``folder`` into ``net`` and merge it into the base weights (peft's
    merge, through diffusers' ``fuse_lora``), leaving plain modules: the adapted network costs
    exactly what the base costs."""
    cls, prefix = _pipeline_class(net)
    try:
        state = cls.lora_state_dict(str(folder), weight_name=WEIGHTS_FILE)
        state = state[0] if isinstance(state, tuple) else state
        net.load_lora_adapter(state, prefix=prefix, adapter_name=ADAPTER)
    except LoRAError:
        raise
    except Exception as e:  # safetensors, peft and key errors share no base class
        raise LoRAError(f"--lora {folder}: cannot be loaded into this {type(net).__name__} "
                        f"({str(e).splitlines()[0][:200]}); give a LoRA distilled on this "
                        "--model") from e
    net.fuse_lora(lora_scale=1.0, adapter_names=[ADAPTER])
    net.unload_lora()
    return net


def with_lora(denoiser: Denoiser, lora: str | Path, copy_network: bool = True) -> Denoiser:
    """``denoiser`` with the LoRA in folder ``lora`` merged into its network. With
    ``copy_network`` the original is left untouched (a shallow copy of the adapter over a copy
    of the network: the text encoder and VAE are shared); else it is changed in place."""
    folder = Path(lora)
    check_base(folder, denoiser)
    attr = network_attribute(denoiser)
    net = getattr(denoiser, attr)
    if copy_network:
        out = copy.copy(denoiser)
        net = copy.deepcopy(net)
    else:
        out = denoiser
    merge_lora(net, folder)
    net.requires_grad_(False)
    setattr(out, attr, net)
    out.lora = str(folder)
    return out
