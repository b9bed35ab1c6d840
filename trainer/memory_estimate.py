"""GPU memory that one training run holds for its parameters: weights, gradients, optimizer states
and EMA, counted from the model's architecture (built on torch's meta device: no weights read).

A LoRA trains a few million parameters beside a frozen model; a full fine-tune of SD 1.5 trains
its 860 M-parameter UNet, whose fp32 weights, gradients, two AdamW moments and EMA copy take about
3.4 GB each. Activations are not counted: they depend on resolution, batch and gradient
checkpointing, and come on top. Bytes per parameter:

- weights: fp32 (4), except a LoRA's frozen UNet under mixed precision on CUDA, kept in half (2);
  a full fine-tune keeps fp32 master weights whatever the autocast (trainer.full_finetune);
- gradients: 4 per trained parameter; AdamW: two fp32 moments (8), adamw8bit two 8-bit ones (2);
- EMA: one fp32 shadow (4) per trained parameter, on the training device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import TARGET_MODULES, TEXT_ENCODER_TARGET_MODULES, TrainConfig

GB = 1e9
# SD 1.5's component configs (what diffusers' defaults differ in), for base models whose configs
# are not on this machine (a hub id, a single-file checkpoint): every SD 1.x shares them.
SD15_UNET = {"cross_attention_dim": 768, "sample_size": 64}
SD15_TEXT_ENCODER = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                     "max_position_embeddings": 77, "projection_dim": 768, "hidden_act": "quick_gelu"}
SD15_VAE = {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4, "sample_size": 512}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per part, and where the architecture came from."""

    weights: float
    gradients: float
    optimizer: float
    ema: float
    trained_params: int
    architecture: str

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.ema

    def describe(self) -> str:
        return (f"{self.total / GB:.2f} GB = weights {self.weights / GB:.2f} + gradients {self.gradients / GB:.2f} + "
                f"optimizer {self.optimizer / GB:.2f} + EMA {self.ema / GB:.2f} ({self.trained_params / 1e6:.1f} M "
                f"trained parameters; activations not included)")


def _configs(base_model: str) -> tuple[dict, dict, dict, str]:
    """UNet, text-encoder and VAE configs of `base_model`, and a name for where they came from."""
    from trainer.model_loading import BaseModelError, resolve_base_model
    from trainer.tiny import TINY_SD_FILE_ID, ensure_tiny_sd

    try:
        kind, target = resolve_base_model(base_model)
    except BaseModelError:  # a dry run on a machine that is not the cluster's
        return SD15_UNET, SD15_TEXT_ENCODER, SD15_VAE, "SD 1.5's architecture (the base model is not on this machine)"
    folder = Path(target) if kind == "folder" else ensure_tiny_sd() if base_model == TINY_SD_FILE_ID else None
    if folder is not None and (folder / "unet" / "config.json").is_file():
        read = lambda part: json.loads((folder / part / "config.json").read_text())  # noqa: E731
        return read("unet"), read("text_encoder"), read("vae"), f"the configs in {folder}"
    return SD15_UNET, SD15_TEXT_ENCODER, SD15_VAE, "SD 1.5's architecture (no configs here)"


def _meta_models(base_model: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, te_cfg, vae_cfg, source = _configs(base_model)
    te_cfg = {k: v for k, v in te_cfg.items() if k not in ("architectures", "transformers_version", "dtype", "torch_dtype")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
        vae = AutoencoderKL.from_config(vae_cfg)
    return unet, text_encoder, vae, source


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_parameters(module: torch.nn.Module, targets: list[str], rank: int) -> int:
    """Parameters of rank-`rank` LoRA layers on the modules peft would target (name == target or ending
    in `.target`): Linear r x (in + out); Conv2d r x (in x kernel) + out x r."""
    total = 0
    for name, sub in module.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(sub, torch.nn.Linear):
            total += rank * (sub.in_features + sub.out_features)
        elif isinstance(sub, torch.nn.Conv2d):
            kh, kw = sub.kernel_size
            total += rank * sub.in_channels * kh * kw + sub.out_channels * rank
    return total


def estimate_memory(cfg: TrainConfig, on_cuda: bool = True) -> MemoryEstimate:
    """The parameter memory of `cfg`'s run on one device (`on_cuda`: mixed precision halves a LoRA's frozen UNet)."""
    unet, te, vae, source = _meta_models(cfg.base_model)
    n_unet, n_te, n_vae = _count(unet), _count(te), _count(vae)
    if cfg.method == "full":
        trained = n_unet + (n_te if cfg.train_text_encoder else 0)
        weights = 4.0 * (n_unet + n_te + n_vae)
    else:
        trained = lora_parameters(unet, TARGET_MODULES[cfg.target_modules], cfg.rank)
        if cfg.train_text_encoder:
            trained += lora_parameters(te, TEXT_ENCODER_TARGET_MODULES[cfg.target_modules], cfg.rank)
        unet_bytes = 2.0 if cfg.mixed_precision != "no" and on_cuda else 4.0
        weights = unet_bytes * n_unet + 4.0 * (n_te + n_vae + trained)
    moments = 2.0 if cfg.optimizer == "adamw8bit" else 8.0
    return MemoryEstimate(weights=weights, gradients=4.0 * trained, optimizer=moments * trained,
                          ema=4.0 * trained if cfg.use_ema else 0.0, trained_params=trained, architecture=source)
