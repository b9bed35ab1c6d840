"""val_loss: the diffusion loss of the LoRA on fixed validation inputs, a score a sweep can trust.

The training loss swings with each step's random timesteps and noise; val_loss measures the same
loss (trainer.losses, min-SNR weighting as configured) over the validation images (TrainData's
`validation_set()`: held-out images, else each training image once) at `validation_timesteps`
timesteps spread evenly over the schedule, with noise and latent samples drawn once from a CPU
generator seeded with `validation_seed`. No caption dropout, no flips, no offset noise (augmentations,
not the loss); the models in eval mode (LoRA dropout off), gradients off. Nothing here draws from
the trainer's RNGs, so computing val_loss leaves the training run bit-identical.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.training_utils import compute_snr

from trainer.cache import encode_moments
from trainer.images import load_image
from trainer.losses import diffusion_target, per_sample_loss

VALIDATION_METRICS = ("val_loss",)  # what LoraTrainer.validation_loss() reports; a sweep's objective may name it


def fixed_timesteps(num_train_timesteps: int, n: int) -> list[int]:
    """n timesteps at the middles of n equal parts of the schedule (1000, 4 -> 125, 375, 625, 875)."""
    return [int((i + 0.5) * num_train_timesteps / n) for i in range(n)]


class ValidationLoss:
    """The fixed inputs of one trainer's val_loss, built on the first call and kept (the VAE and,
    unless it trains, the text encoder are frozen, so they never change)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.examples = trainer.data.validation_set()
        self._items = None  # [(latents, noise, timestep index)] per example x timestep, on the device
        self._cond = None  # text embeddings per example, when the text encoder is frozen

    def _latent_moments(self, example) -> tuple[torch.Tensor, torch.Tensor]:
        tr = self.trainer
        if tr.latent_cache is not None:
            return tr.latent_cache.moments(example.image_path, False)
        size = tr.target_sizes[example.image_path]
        pixels = load_image(example.image_path, size, True, False, np.random.default_rng(0))  # center crop: no draw
        mean, std = encode_moments(tr.models.vae, pixels[None])
        return mean[0].float().cpu(), std[0].float().cpu()

    def _build(self) -> None:
        tr = self.trainer
        sched = tr.models.noise_scheduler
        self.timesteps = fixed_timesteps(sched.config.num_train_timesteps, tr.cfg.validation_timesteps)
        gen = torch.Generator(device="cpu").manual_seed(tr.cfg.validation_seed)  # same values on every device
        scale = tr.models.vae.config.scaling_factor
        items = []
        for i, e in enumerate(self.examples):
            mean, std = self._latent_moments(e)
            mean, std = mean.float().cpu(), std.float().cpu()
            latents = (mean + std * torch.randn(mean.shape, generator=gen)) * scale
            for t in self.timesteps:
                noise = torch.randn(latents.shape, generator=gen)
                items.append((i, latents.to(tr.device), noise.to(tr.device), t))
        self._items = items

    def _embeddings(self) -> torch.Tensor:
        tr = self.trainer
        if self._cond is not None:
            return self._cond
        cond = tr._cond([e.caption for e in self.examples])
        if not tr.cfg.train_text_encoder:
            self._cond = cond
        return cond

    @torch.no_grad()
    def __call__(self) -> float:
        tr = self.trainer
        if self._items is None:
            self._build()
        m, cfg = tr.models, tr.cfg
        sched = m.noise_scheduler
        batch = 2 * cfg.train_batch_size  # forward only: no activations kept for a backward
        m.unet.eval()
        m.text_encoder.eval()
        try:
            cond = self._embeddings()
            groups: dict[tuple, list] = {}
            for item in self._items:
                groups.setdefault(tuple(item[1].shape), []).append(item)
            total = torch.zeros((), dtype=torch.float64, device=tr.device)
            for shape in sorted(groups):
                group = groups[shape]
                for start in range(0, len(group), batch):
                    chunk = group[start : start + batch]
                    latents = torch.stack([c[1] for c in chunk])
                    noise = torch.stack([c[2] for c in chunk])
                    t = torch.tensor([c[3] for c in chunk], dtype=torch.long, device=tr.device)
                    noisy = sched.add_noise(latents, noise, t)
                    target = diffusion_target(sched, latents, noise, t)
                    with tr._autocast():
                        pred = m.unet(noisy, t, cond[[c[0] for c in chunk]]).sample
                    snr = compute_snr(sched, t) if cfg.snr_gamma is not None else None
                    per = per_sample_loss(pred, target, snr, cfg.snr_gamma, sched.config.prediction_type)
                    total += per.double().sum()
            return float(total.item() / len(self._items))
        finally:
            m.unet.train()
            if cfg.train_text_encoder:
                m.text_encoder.train()
