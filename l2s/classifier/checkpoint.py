"""Resumable `l2s train`: the whole training state after every epoch, in one safetensors file.

``<out>/train-checkpoint.safetensors`` holds the classifier's current and best weights, the
optimizer's moment tensors and the random streams (the batch-order / augmentation generator
and torch's global stream that dropout draws from); its header holds the epoch history, the
plateau scheduler, the optimizer's plain settings and what the run is (its resolved settings
and a digest of its data split), and a sha256 of the header and every tensor, so a damaged
file (a flipped bit in a weight, an edited header) is refused instead of resumed. It is
rewritten through ``atomic_write`` after every epoch, so a run cut at any moment resumes from
its last finished epoch and ends with the same weights as a run never interrupted. The job
deletes it once the card is written. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from l2s.classifier.data import TrainError
from l2s.inversion.cache import atomic_write

CHECKPOINT_NAME = "train-checkpoint.safetensors"
RESUME_FIX = "rerun with --fresh to start over (or choose another --out)"


@dataclass
class EpochState:
    """Where a run stands after its last finished epoch."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_loss: float = math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    seconds: float = 0.0  # training time spent before this process


def run_identity(settings: dict, parts: dict[str, torch.Tensor], n_samples: int) -> dict:
    """What must match for a checkpoint to continue this run: every resolved training setting
    (``TrainConfig.settings()``) but ``epochs`` (a run may be extended) and ``out``, and which
    samples fall on which side."""
    settings = {k: v for k, v in settings.items() if k not in ("epochs", "out")}
    digest = hashlib.sha256(str(n_samples).encode())
    for side in sorted(parts):
        digest.update(side.encode() + parts[side].to(torch.int64).numpy().tobytes())
    return {"settings": json.loads(json.dumps(settings)), "data": digest.hexdigest()[:16]}


def _rng_tensors(order: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    out = {"rng.order": order.get_state(), "rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(device)
    return out


def _digest(header: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the header text and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(header.encode())
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_epoch(path: Path, identity: dict, model: torch.nn.Module, opt: torch.optim.Optimizer,
               plateau, order: torch.Generator, state: EpochState) -> None:
    """Write the run's state after ``state.epoch`` to ``path``, atomically."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if state.best_state is not None:
        tensors.update({f"best.{k}": v for k, v in state.best_state.items()})
    opt_sd = opt.state_dict()
    plain: dict[str, dict] = {}
    for i, slots in opt_sd["state"].items():
        for k, v in slots.items():
            if torch.is_tensor(v):
                tensors[f"opt.{i}.{k}"] = v
            else:
                plain.setdefault(str(i), {})[k] = v
    tensors.update(_rng_tensors(order, next(model.parameters()).device))
    header = {"identity": identity, "epoch": state.epoch, "history": state.history,
              "best_loss": state.best_loss, "best_epoch": state.best_epoch,
              "seconds": state.seconds, "optimizer": {"plain": plain,
                                                      "param_groups": opt_sd["param_groups"]},
              "plateau": plateau.state_dict()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    text = json.dumps(header)
    atomic_write(Path(path), lambda tmp: save_file(
        tensors, tmp, metadata={"l2s_train": text, "l2s_sha256": _digest(text, tensors)}))


def _differences(saved: dict, now: dict) -> list[str]:
    a, b = saved["settings"], now["settings"]
    out = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
           if a.get(k) != b.get(k)]
    if saved["data"] != now["data"]:
        out.append("the cached data (entries were added or removed since)")
    return out


def load_epoch(path: Path, identity: dict, model: torch.nn.Module, opt: torch.optim.Optimizer,
               plateau, order: torch.Generator) -> EpochState | None:
    """Restore the run saved at ``path`` into the fresh objects; None when there is none.

    Refuses (TrainError naming the difference and the fix) a checkpoint of another run or one
    that cannot be read, rather than silently discarding its epochs.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            text = meta["l2s_train"]
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(text)
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as e:
        raise TrainError(f"the training checkpoint {path} cannot be read ({e}): "
                         f"{RESUME_FIX}") from None
    # Checkpoints written before the checksum existed have none; their parts are still
    # checked as they are restored.
    if "l2s_sha256" in meta and meta["l2s_sha256"] != _digest(text, tensors):
        raise TrainError(f"the training checkpoint {path} is damaged (its sha256 does not match "
                         f"its contents: the file changed after it was written): {RESUME_FIX}")
    try:
        return _restore(path, header, tensors, identity, model, opt, plateau, order)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as e:
        raise TrainError(f"the training checkpoint {path} is damaged ({type(e).__name__}: "
                         f"{e}): {RESUME_FIX}") from None


def _restore(path: Path, header: dict, tensors: dict[str, torch.Tensor], identity: dict,
             model: torch.nn.Module, opt: torch.optim.Optimizer, plateau,
             order: torch.Generator) -> EpochState:
    diff = _differences(header["identity"], identity)
    if diff:
        raise TrainError(f"{path} holds an interrupted run with other settings "
                         f"({'; '.join(diff)}): rerun with its settings to resume it, or "
                         f"{RESUME_FIX}")

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    device = next(model.parameters()).device
    model.load_state_dict(part("model."), strict=True)
    slots: dict[int, dict] = {}
    for k, v in part("opt.").items():
        i, name = k.split(".", 1)
        slots.setdefault(int(i), {})[name] = v
    for i, values in header["optimizer"]["plain"].items():
        slots.setdefault(int(i), {}).update(values)
    opt.load_state_dict({"state": slots, "param_groups": header["optimizer"]["param_groups"]})
    plateau.load_state_dict(header["plateau"])
    order.set_state(tensors["rng.order"])
    torch.set_rng_state(tensors["rng.torch"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    best = part("best.")
    return EpochState(epoch=int(header["epoch"]), history=list(header["history"]),
                      best_loss=float(header["best_loss"]), best_epoch=int(header["best_epoch"]),
                      best_state={k: v.to(device) for k, v in best.items()} or None,
                      seconds=float(header["seconds"]))
