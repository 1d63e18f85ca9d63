"""Fine-tuning a LoRA on distillation data with the model's own denoising loss, resumably.

Each step draws a batch of accepted images (a function of (seed, step): a resumed run draws
the batches an uninterrupted one would), one sampling timestep per image from the model's
sampling grid (where generation reads the network), Gaussian noise, and drops the text to ""
for a fraction of images (the unconditional branch classifier-free guidance reads stays
trained). The loss is the mean squared error of the network's raw output against its own
training target: x0 ("sample"), epsilon, v, or the rectified-flow velocity.

The whole state (LoRA tensors, AdamW moments, step, loss history) is written to
``train-checkpoint.safetensors`` every ``checkpoint_every`` steps (atomically), so a killed
run continues from its last checkpoint and ends with the same LoRA as one never interrupted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from l2s.distill.lora import LoRAError, lora_state, set_lora_state
from l2s.engine.backbone import Denoiser
from l2s.engine.schedules import DDPMSchedule, FlowMatchSchedule

CHECKPOINT = "train-checkpoint.safetensors"


def noised(denoiser: Denoiser, x0: torch.Tensor, noise: torch.Tensor, ts: Sequence
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) for clean latents x0 (B, ...) at one timestep per image: the forward
    process of the model's schedule and the target of its raw network output."""
    shape = (-1,) + (1,) * (x0.dim() - 1)
    sched = denoiser.schedule
    if isinstance(sched, FlowMatchSchedule):
        s = torch.tensor([sched.sigma(t) for t in ts], device=x0.device).view(shape)
        return (1 - s) * x0 + s * noise, noise - x0
    if not isinstance(sched, DDPMSchedule):
        raise LoRAError(f"distill: no denoising loss for a {type(sched).__name__} schedule")
    a = torch.tensor([sched.alpha(t) for t in ts], device=x0.device).view(shape)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    kind = sched.prediction_type
    target = {"sample": x0, "epsilon": noise,
              "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}[kind]
    return x_t, target


def _model_time(denoiser: Denoiser, ts: Sequence) -> torch.Tensor:
    dtype = torch.float32 if isinstance(denoiser.schedule, FlowMatchSchedule) else torch.int64
    return torch.tensor(list(ts), dtype=dtype, device=denoiser.device)


def start_training(net, params: list, lr: float, steps: int, checkpoint: Path, identity: dict,
                   callback: Callable[[dict], None] | None = None
                   ) -> tuple[torch.optim.Optimizer, int, list[dict]]:
    """(AdamW over ``params``, step, history): fresh, or restored from ``checkpoint`` when a
    run of this ``identity`` left one (the callback hears that it resumed)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    step, history = 0, []
    if checkpoint.is_file():
        step, history = load_checkpoint(checkpoint, net, opt, params, identity)
        if callback:
            callback({"phase": "train", "step": step, "steps": steps, "resumed": True,
                      "loss": history[-1]["loss"] if history else math.nan})
    return opt, step, history


def save_checkpoint(path: Path, net, opt: torch.optim.Optimizer, params: list, step: int,
                    history: list[dict], identity: dict) -> None:
    from l2s.inversion.cache import atomic_write

    tensors = {f"lora.{k}": v.cpu() for k, v in lora_state(net).items()}
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                tensors[f"opt.{i}.{key}"] = st[key].detach().cpu().contiguous()
        if "step" in st:
            tensors[f"opt.{i}.step"] = torch.as_tensor(st["step"]).float().reshape(1).cpu()
    meta = {"step": str(step), "history": json.dumps(history),
            "identity": json.dumps(identity, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_checkpoint(path: Path, net, opt: torch.optim.Optimizer, params: list,
                    identity: dict) -> tuple[int, list[dict]]:
    """(step, history) of a checkpoint of this very run, its state loaded into net and opt."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise LoRAError(f"distill: checkpoint {path} is unreadable ({e}); rerun with --fresh "
                        "to start over") from e
    if json.loads(meta.get("identity", "{}")) != json.loads(json.dumps(identity,
                                                                       sort_keys=True)):
        raise LoRAError(f"distill: {path} is a checkpoint of other settings; rerun with "
                        "--fresh to start over (or choose another --out)")
    dev = params[0].device
    set_lora_state(net, {k[5:]: v.to(dev) for k, v in tensors.items() if k.startswith("lora.")})
    for i, p in enumerate(params):
        if f"opt.{i}.exp_avg" in tensors:
            opt.state[p] = {"step": tensors[f"opt.{i}.step"][0].clone(),
                            "exp_avg": tensors[f"opt.{i}.exp_avg"].to(dev),
                            "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].to(dev)}
    return int(meta["step"]), json.loads(meta["history"])


def train_lora(denoiser: Denoiser, net, params: list, latents: torch.Tensor,
               prompts: Sequence[str], *, steps: int, batch: int, lr: float, seed: int,
               grid: Sequence, drop_text: float, checkpoint: Path, checkpoint_every: int,
               identity: dict, paired: torch.Tensor | None = None, paired_fraction: float = 0.0,
               callback: Callable[[dict], None] | None = None) -> list[dict]:
    """Train the attached LoRA ``params`` of ``net`` (``denoiser``'s network) for ``steps``
    steps on ``latents`` (N, ...) captioned ``prompts``; returns the loss history (one entry
    per checkpoint interval). ``paired`` (N, ...): the initial noise each image was generated
    from; a ``paired_fraction`` of each batch is noised with it instead of fresh noise (the
    straight path from that noise to the steered image, as reflow trains: the layout steering
    gave that very noise is the target, not only the average layout of the prompt)."""
    opt, step, history = start_training(net, params, lr, steps, checkpoint, identity, callback)
    unique = sorted(set(prompts))
    with torch.no_grad():
        table = denoiser.encode_prompt(unique + [""])
    row = {p: i for i, p in enumerate(unique)}
    rows = torch.tensor([row[p] for p in prompts])
    empty = len(unique)
    net.train()
    running, count = 0.0, 0
    while step < steps:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(len(prompts), (batch,), generator=g)
        t_idx = torch.randint(len(grid), (batch,), generator=g).tolist()
        noise = torch.randn((batch, *latents.shape[1:]), generator=g).to(denoiser.device)
        drop = torch.rand(batch, generator=g) < drop_text
        if paired is not None:
            use = (torch.rand(batch, generator=g) < paired_fraction).to(denoiser.device)
            use = use.view(-1, *([1] * (noise.dim() - 1)))
            noise = torch.where(use, paired[idx].to(denoiser.device), noise)
        cond_rows = torch.where(drop, torch.full_like(rows[idx], empty), rows[idx])
        cond = table.select(cond_rows.to(denoiser.device))
        ts = [grid[i] for i in t_idx]
        x0 = latents[idx].to(denoiser.device)
        x_t, target = noised(denoiser, x0, noise, ts)
        out = denoiser.network_output(x_t, _model_time(denoiser, ts), cond)
        loss = torch.nn.functional.mse_loss(out.float(), target.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        running, count = running + loss.item(), count + 1
        if step % checkpoint_every == 0 or step == steps:
            history.append({"step": step, "loss": running / count})
            running, count = 0.0, 0
            save_checkpoint(checkpoint, net, opt, params, step, history, identity)
        if callback:
            callback({"phase": "train", "step": step, "steps": steps, "loss": loss.item()})
    net.eval()
    return history

