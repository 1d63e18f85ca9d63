"""Recipe "reward": the relation classifier's loss as a differentiable reward for a LoRA.

Each training step draws relation prompts (pairs without the held-out objects) and seeded
noise, and runs the first steps of ordinary guided sampling with the LoRA network, keeping the
graph. At each step steering would steer (the model's ``steer_from`` .. ``steered_steps()``)
and at the step after the last, the *frozen base network* reads the latent the LoRA
trajectory reached: its cross-attention maps go through the relation classifier, exactly the
loss steering minimises. The sum of those losses is backpropagated through the sampling steps
into the LoRA. The reader is the base model, not the LoRA: a LoRA that only moved its own
attention maps would change nothing the reader sees; it has to move the latent, where the
objects are, as steering does.

A keep-close term holds the LoRA to the base model's plain outputs: at every sampling step
the LoRA takes, the mean squared difference between its guided prediction and the base's on
the same latent (the LoRA may nudge each step, as steering nudges the latent, not replace it),
plus, at one timestep per image drawn from the whole sampling grid, the difference between the
two networks' raw outputs (conditional and unconditional) on the trajectory's clean estimate
noised again (the later steps, which draw the objects, stay the base's). Its weight is
``keep``. Without it the reward is gamed: a LoRA that empties the image reads as any relation.

The state (LoRA, AdamW moments, step, loss history) is checkpointed like recipe "self"
(``l2s.distill.train``); prompts and noise are functions of (seed, step), so a resumed run
ends with the LoRA of an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from l2s.distill.data import distill_prompts, image_seed
from l2s.distill.train import save_checkpoint, start_training
from l2s.engine.backbone import Denoiser
from l2s.engine.sampling import guided_prediction, seeded_latents, uses_uncond
from l2s.steering.loop import Steerer, SteerSettings
from l2s.steering.losses import RelationLoss


def read_steps(settings: SteerSettings) -> list[int]:
    """The steps whose latents the reward reads: the steered ones and the one after them."""
    return list(range(settings.steer_from, settings.steered_steps() + 1))


def reward_step(base: Denoiser, trained: Denoiser, loss: RelationLoss,
                settings: SteerSettings, texts: list[str], trips: list, noise: torch.Tensor,
                keep_t: list | None = None, keep_noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(reward loss, keep-close loss, p(target) at the last read step) of one batch, in the
    graph of ``trained``'s LoRA parameters."""
    st = Steerer(base, texts, trips, loss, settings)
    active = st.plan.active
    aidx = st.index(active)
    weights = st.token_weights(active)
    cond = st.cond
    guidance = settings.guidance
    uncond = (base.encode_prompt([""] * len(texts)) if uses_uncond(base, guidance) else None)
    ts = base.timesteps(settings.steps)
    reads = read_steps(settings)
    x = noise.float()
    total = x.new_zeros(())
    p_last = x.new_zeros(len(active))
    steps_keep = x.new_zeros(())
    for k in range(reads[-1] + 1):
        t = ts[k]
        if k in reads:
            with st.recorder() as rec, rec.truncated():
                rec.set_weights(weights)
                base.predict(x[aidx], t, cond.select(aidx), guidance=guidance)
            scores = st.plan.score(loss, rec.stacked(), active, t, k)
            total = total + scores.loss.mean()
            p_last = scores.p_target
        if k == reads[-1]:
            break
        pred = guided_prediction(trained, x, t, cond, uncond, guidance)
        if keep_t is not None:
            with torch.no_grad():
                ref = guided_prediction(base, x, t, cond, uncond, guidance)
            steps_keep = steps_keep + torch.nn.functional.mse_loss(pred, ref)
        x = trained.step(pred, t, ts[k + 1], x)
    keep = steps_keep
    if keep_t is not None:
        # the trajectory's latent, re-noised to one timestep per image of the whole grid
        x0 = clean_estimate(base, x.detach(), ts[reads[-1]])
        xs = torch.stack([base.add_noise(x0[i:i + 1], keep_noise[i:i + 1], t)[0]
                          for i, t in enumerate(keep_t)])
        tt = torch.tensor(keep_t, dtype=_time_dtype(base), device=base.device)
        both = cond if uncond is None else type(cond).cat([cond, uncond])
        xs2 = xs if uncond is None else torch.cat([xs, xs])
        tt2 = tt if uncond is None else torch.cat([tt, tt])
        out = trained.network_output(xs2, tt2, both).float()
        with torch.no_grad():
            ref = base.network_output(xs2, tt2, both).float()
        keep = keep + torch.nn.functional.mse_loss(out, ref)
    return total, keep, p_last


def _time_dtype(denoiser: Denoiser) -> torch.dtype:
    from l2s.engine.schedules import FlowMatchSchedule

    return torch.float32 if isinstance(denoiser.schedule, FlowMatchSchedule) else torch.int64


def clean_estimate(denoiser: Denoiser, x: torch.Tensor, t) -> torch.Tensor:
    """The base model's clean-latent estimate from latent x at timestep t (no grad)."""
    from l2s.engine.schedules import FlowMatchSchedule

    with torch.no_grad():
        cond = denoiser.encode_prompt([""] * len(x))
        pred = denoiser.predict(x, t, cond)
    sched = denoiser.schedule
    if isinstance(sched, FlowMatchSchedule):
        return x - sched.sigma(t) * pred
    a = sched.alpha(t)
    return (x - math.sqrt(1 - a) * pred) / math.sqrt(a)


def train_reward(base: Denoiser, trained: Denoiser, net, params: list, loss: RelationLoss,
                 settings: SteerSettings, *, objects, hold_out, steps: int, batch: int,
                 lr: float, keep: float, seed: int, checkpoint: Path, checkpoint_every: int,
                 identity: dict, callback: Callable[[dict], None] | None = None
                 ) -> list[dict]:
    """Train the attached LoRA ``params`` of ``net`` (``trained``'s network) with the reward
    recipe for ``steps`` steps; returns the history (per checkpoint interval: the mean reward
    loss, keep-close loss and p(target) at the last read step)."""
    opt, step, history = start_training(net, params, lr, steps, checkpoint, identity, callback)
    grid = base.timesteps(settings.steps)
    net.train()
    sums = {"loss": 0.0, "keep": 0.0, "p_target": 0.0}
    count = 0
    while step < steps:
        ps = distill_prompts(objects, hold_out, batch, seed, start=step * batch)
        texts, trips = [p.prompt for p in ps], [[p.triplet] for p in ps]
        noise = seeded_latents(base, [image_seed(seed, step * batch + i) for i in range(batch)])
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        keep_t = [grid[i] for i in torch.randint(len(grid), (batch,), generator=g).tolist()]
        keep_noise = torch.randn(noise.shape, generator=g).to(base.device)
        reward, close, p = reward_step(base, trained, loss, settings, texts, trips, noise,
                                       keep_t if keep else None, keep_noise)
        total = reward + keep * close
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        step += 1
        count += 1
        sums["loss"] += reward.item()
        sums["keep"] += close.item()
        sums["p_target"] += p.mean().item()
        if step % checkpoint_every == 0 or step == steps:
            history.append({"step": step, **{k: v / count for k, v in sums.items()}})
            sums = dict.fromkeys(sums, 0.0)
            count = 0
            save_checkpoint(checkpoint, net, opt, params, step, history, identity)
        if callback:
            callback({"phase": "train", "step": step, "steps": steps, "loss": reward.item(),
                      "keep": close.item(), "p_target": p.mean().item()})
    net.eval()
    return history
