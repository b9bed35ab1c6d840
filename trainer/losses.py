"""The diffusion training loss: what the UNet predicts, and the per-sample (min-SNR weighted) MSE."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_target(sched, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon) or the velocity (v_prediction)."""
    kind = sched.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return sched.get_velocity(latents, noise, t)
    raise ValueError(f"prediction_type {kind!r} is not trainable here; use epsilon or v_prediction")


def per_sample_loss(pred, target, snr: torch.Tensor | None, gamma: float | None, prediction_type: str) -> torch.Tensor:
    """Per-sample MSE (mean over C, H, W), weighted by min(SNR, gamma) / SNR when `snr` is given
    (Hang et al. 2023); v-prediction uses min(SNR, gamma) / (SNR + 1)."""
    per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    if snr is None:
        return per
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    weights = clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
    return per * weights
