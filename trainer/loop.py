"""The LoRA training loop, in plain phases: setup, step, sample, save, restore.

Knows nothing of Ray or W&B: callers drive it step by step and read metrics from a callback.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from trainer.config import TARGET_MODULES, TrainConfig
from trainer.data import EpochSampler, load_image, load_kohya_folder, resolve_dataset
from trainer.model_loading import SDComponents, load_sd_components
from trainer.prompts import encode_prompts
from trainer.tiny import cache_root

MetricsCallback = Callable[[dict], None]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run cannot continue."""


class LoraTrainer:
    """One LoRA run on an SD 1.x UNet. `step()` is one optimizer step."""

    def __init__(self, cfg: TrainConfig, components: SDComponents | None = None, device: str | None = None):
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(cfg.seed)  # LoRA init draws from the global RNG
        self.models = components or load_sd_components(cfg.base_model)
        self._setup_models()
        self.examples = load_kohya_folder(resolve_dataset(cfg.dataset, cache_root()))
        self.sampler = EpochSampler(len(self.examples), cfg.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.np_rng = np.random.default_rng(cfg.seed)
        self.params = [p for p in self.models.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay,
        )
        self.lr_scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer=self.optimizer,
            num_warmup_steps=cfg.lr_warmup_steps,
            num_training_steps=cfg.max_train_steps,
            num_cycles=cfg.lr_num_cycles,
            power=cfg.lr_power,
        )
        self.global_step = 0

    # --- setup ----------------------------------------------------------------------------
    def _setup_models(self) -> None:
        m, cfg = self.models, self.cfg
        for module in (m.unet, m.vae, m.text_encoder):
            module.requires_grad_(False)
            module.to(self.device)
        if cfg.prediction_type is not None:
            m.noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)
        lora = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            init_lora_weights="gaussian",
            target_modules=TARGET_MODULES[cfg.target_modules],
        )
        m.unet.add_adapter(lora)
        m.unet.train()

    # --- step -----------------------------------------------------------------------------
    def _batch(self) -> tuple[torch.Tensor, list[str]]:
        idx = self.sampler.next_indices(self.cfg.train_batch_size)
        cfg = self.cfg
        pixels = []
        for i in idx:
            flip = cfg.random_flip and bool(self.np_rng.random() < 0.5)
            pixels.append(load_image(self.examples[i].image_path, cfg.resolution, cfg.center_crop, flip, self.np_rng))
        return torch.stack(pixels).to(self.device), [self.examples[i].caption for i in idx]

    def _loss(self, pixels: torch.Tensor, captions: list[str]) -> torch.Tensor:
        m, cfg = self.models, self.cfg
        with torch.no_grad():
            latents = m.vae.encode(pixels).latent_dist.sample(self.generator) * m.vae.config.scaling_factor
            cond = encode_prompts(m.tokenizer, m.text_encoder, captions, cfg.clip_skip)
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device)
        if cfg.noise_offset:
            offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=self.generator, device=self.device)
            noise = noise + cfg.noise_offset * offset
        sched = m.noise_scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=self.generator, device=self.device)
        noisy = sched.add_noise(latents, noise, t)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        pred = m.unet(noisy, t, cond).sample
        if cfg.snr_gamma is None:
            return F.mse_loss(pred.float(), target.float())
        return min_snr_loss(pred, target, compute_snr(sched, t), cfg.snr_gamma, sched.config.prediction_type)

    def step(self) -> dict:
        """One optimizer step over `gradient_accumulation_steps` micro-batches."""
        cfg = self.cfg
        start = time.perf_counter()
        total = 0.0
        for _ in range(cfg.gradient_accumulation_steps):
            pixels, captions = self._batch()
            loss = self._loss(pixels, captions) / cfg.gradient_accumulation_steps
            loss.backward()
            total += loss.item()
        if not math.isfinite(total):
            raise TrainingDiverged(
                f"loss became {total} at step {self.global_step + 1} (lr {self.lr_scheduler.get_last_lr()[0]:.3g}); "
                "lower the learning rate or enable gradient clipping"
            )
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        lr = self.lr_scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        seconds = time.perf_counter() - start
        return {
            "step": self.global_step,
            "loss": total,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "images_per_sec": cfg.train_batch_size * cfg.gradient_accumulation_steps / seconds,
        }

    def train(self, num_steps: int | None = None, callback: MetricsCallback | None = None) -> list[dict]:
        """Run `num_steps` steps (default: until max_train_steps); returns every step's metrics."""
        remaining = self.cfg.max_train_steps - self.global_step
        steps = remaining if num_steps is None else min(num_steps, remaining)
        history = []
        for _ in range(steps):
            metrics = self.step()
            history.append(metrics)
            if callback:
                callback(metrics)
        return history

    # --- sample ---------------------------------------------------------------------------
    def sample(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        from trainer.sampling import sample_images

        self.models.unet.eval()
        try:
            return sample_images(self.models, prompts, seeds, self.cfg.clip_skip, self.cfg.resolution, self.cfg.sampling)
        finally:
            self.models.unet.train()

    # --- save / restore -------------------------------------------------------------------
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """peft-format UNet LoRA weights (keys without the adapter name)."""
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.models.unet).items()}

    def state_dict(self) -> dict:
        return {
            "lora": self.lora_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "global_step": self.global_step,
            "sampler": self.sampler.state_dict(),
            "generator": self.generator.get_state(),
            "np_rng": self.np_rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        set_peft_model_state_dict(self.models.unet, state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_step = state["global_step"]
        self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"])
        self.np_rng.bit_generator.state = state["np_rng"]
        torch.set_rng_state(state["torch_rng"])


def min_snr_loss(pred, target, snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """MSE weighted per sample by min(SNR, gamma) / SNR (Hang et al. 2023); v-prediction uses SNR + 1."""
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    weights = clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()
