"""The toys' training losses: the UNet toy's denoising loss, the toy-mmdit's rectified flow.

UNet toy: x_t = sqrt(a) x0 + sqrt(1 - a) noise on the toy's DDPM schedule; the UNet predicts x0
("sample"), epsilon or v, and each sample's MSE is weighted over noise levels (``WEIGHTINGS``).
toy-mmdit (``flow_loss``): x_s = (1 - s) x0 + s noise, the transformer predicts the velocity
noise - x0 through its engine adapter, s drawn logit-normal (``sample_timesteps``, as SD3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHTINGS = ("uniform", "min_snr", "clamped_snr")


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at timesteps t, (B,)."""
    a = alphas_cumprod[t]
    return a / (1 - a)


def prediction_target(
    prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """What the UNet should output for x_t = sqrt(a) x0 + sqrt(1-a) noise; alpha (B, 1, 1, 1)."""
    if prediction_type == "sample":
        return x0
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":  # Salimans & Ho, 2022
        return alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def loss_weights(weighting: str, prediction_type: str, s: torch.Tensor, gamma: float
                 ) -> torch.Tensor:
    """Per-sample loss weights (B,) for the prediction space, from SNRs s (B,).

    The x0-space weight w(s) becomes w(s) / c(s) in the prediction's space, where the plain
    prediction loss equals c(s) times the x0 loss: c = 1 (x0), s (epsilon), s + 1 (v).
    ``min_snr`` is Min-SNR-gamma (Hang et al., 2023): w = min(s, gamma).
    ``clamped_snr`` also keeps the noisiest steps, where layout is decided: w = clamp(s, 1, gamma).
    """
    if weighting == "uniform":
        return torch.ones_like(s)
    c = {"sample": torch.ones_like(s), "epsilon": s, "v_prediction": s + 1}[prediction_type]
    if weighting == "min_snr":
        w = s.clamp(max=gamma)
    elif weighting == "clamped_snr":
        w = s.clamp(min=1.0, max=gamma)
    else:
        raise ValueError(f"unknown weighting {weighting!r}: expected one of "
                         f"{', '.join(WEIGHTINGS)}")
    return w / c.clamp(min=1e-8)


def diffusion_loss(unet, text_emb, images, t, noise, scheduler, weighting, gamma):
    """Weighted denoising loss for images (B, 3, H, W) in [-1, 1] at timesteps t (B,)."""
    alphas = scheduler.alphas_cumprod.to(images.device, images.dtype)
    a = alphas[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    x_t = a.sqrt() * images + (1 - a).sqrt() * noise
    pred = unet(x_t, t, encoder_hidden_states=text_emb).sample  # (B, 3, H, W)
    kind = scheduler.config.prediction_type
    target = prediction_target(kind, images, noise, a)
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))  # (B,)
    w = loss_weights(weighting, kind, snr(scheduler.alphas_cumprod.to(t.device), t).float(),
                     gamma)
    return (w * per_sample).mean()


def sample_timesteps(cfg, n: int, generator: torch.Generator) -> torch.Tensor:
    """Logit-normal timesteps s in (0, 1), (n,), as SD3 / Flux training (cfg: ToyMMDiTConfig)."""
    return torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator))


def flow_loss(denoiser, cond, images, s, noise) -> torch.Tensor:
    """Rectified-flow loss: MSE between the velocity the denoiser predicts at
    x_s = (1 - s) x0 + s noise and the true one, noise - x0.

    ``denoiser`` is the toy-mmdit's adapter (``ToyMMDiTDenoiser``) over the networks being
    trained; images and noise (B, 3, H, W), s (B,) in (0, 1), one per image.
    """
    sv = s.view(-1, 1, 1, 1).to(images.dtype)
    x_s = (1 - sv) * images + sv * noise
    # Model time is 1000 s (the flow families' convention); the adapter divides it back.
    pred = denoiser.predict(denoiser.pack(x_s), s * 1000, cond)  # (B, N, 12)
    return F.mse_loss(denoiser.unpack(pred).float(), (noise - images).float())
