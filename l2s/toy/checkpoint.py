"""Resumable toy training checkpoints: weights, EMA weights, optimizer, step and random states.

A checkpoint is a folder written whole into a temporary sibling and swapped in, so a run cut at
any moment leaves either the previous checkpoint or the new one. Weights are safetensors, keyed
"<component>.<parameter>" ("unet." or "transformer.", and "text_encoder.").
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from l2s.errors import L2SError

REQUIRED = ("model.safetensors", "ema.safetensors", "rng.safetensors", "optimizer.pt",
            "state.json")


class CheckpointError(L2SError, ValueError):
    """A checkpoint the run cannot continue from; the message says what to do."""


def state_tensors(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """All parameters and buffers of named modules as "<name>.<key>" CPU tensors."""
    out = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


def load_state_tensors(modules: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor]
                       ) -> None:
    for name, module in modules.items():
        prefix = name + "."
        part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(part, strict=True)


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a freshly written folder into place, never leaving `final` half-written."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def write_dir(final: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` into a fresh sibling folder, then swap it in (``replace_dir``): the
    folder-sized ``l2s.inversion.cache.atomic_write``, for checkpoints and model exports."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    replace_dir(tmp, final)


def save_checkpoint(path: Path, step: int, modules: dict, ema_modules: dict, optimizer,
                    rng: np.random.Generator, gen: torch.Generator, cfg,
                    spelling: dict[str, list[int]]) -> None:
    """Write model, EMA, optimizer, step and random states to `path` (a folder), and
    ``spelling``: the token ids of each vocabulary word, which the text encoder learnt."""
    def write(tmp: Path) -> None:
        save_file(state_tensors(modules), tmp / "model.safetensors")
        save_file(state_tensors(ema_modules), tmp / "ema.safetensors")
        save_file({"torch_generator": gen.get_state()}, tmp / "rng.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        state = {"step": step, "numpy_rng": rng.bit_generator.state,
                 "config": dataclasses.asdict(cfg), "spelling": spelling}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))

    write_dir(path, write)


def load_checkpoint(path: Path, modules: dict, ema_modules: dict, optimizer,
                    rng: np.random.Generator, gen: torch.Generator,
                    spelling: dict[str, list[int]]) -> int:
    """Restore everything `save_checkpoint` wrote; returns the step. Refuses a checkpoint
    whose vocabulary was tokenized otherwise than ``spelling`` (its text encoder would read
    other embeddings for those words)."""
    for name in REQUIRED:
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint file {path / name} is missing; start afresh "
                                    "without --resume (or point --out at a complete run)")
    state = json.loads((path / "state.json").read_text())
    _check_spelling(path, state.get("spelling"), spelling)
    load_state_tensors(modules, load_file(path / "model.safetensors"))
    load_state_tensors(ema_modules, load_file(path / "ema.safetensors"))
    gen.set_state(load_file(path / "rng.safetensors")["torch_generator"])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True,
                                         map_location="cpu"))
    rng.bit_generator.state = state["numpy_rng"]
    return int(state["step"])


def _check_spelling(path: Path, saved: dict | None, now: dict[str, list[int]]) -> None:
    fix = "start the run afresh (without --resume, or with another --out)"
    if saved is None:  # written before build_clip_tokenizer spelt every word as one token
        raise CheckpointError(f"{path} does not record how its captions were tokenized (it "
                              "predates one token per vocabulary word, which changed "
                              f"'triangle'); its text encoder would misread them: {fix}")
    changed = sorted(w for w in set(saved) | set(now) if saved.get(w) != now.get(w))
    if changed:
        w = changed[0]
        raise CheckpointError(f"{path} was trained with {w!r} tokenized as {saved.get(w)}, "
                              f"the tokenizer now gives {now.get(w)}; its text encoder would "
                              f"misread it: {fix}")
