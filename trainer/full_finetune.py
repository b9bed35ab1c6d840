"""`method: full`: the UNet's own weights train (and the text encoder's with train_text_encoder).

The LoRA path adds adapter layers to a frozen model; this one unfreezes the modules instead, keeps
their weights in float32 (mixed precision autocasts the forward pass, as diffusers'
train_text_to_image does) and saves/restores exactly the trained modules' parameters: the VAE
and a frozen text encoder never change, so a resume checkpoint leaves them out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from trainer.config import TrainConfig
from trainer.model_loading import SDComponents

TRAINED_MODULES = ("unet", "text_encoder")


def trained_modules(models: SDComponents, train_text_encoder: bool) -> dict[str, torch.nn.Module]:
    """{"unet": ..., "text_encoder": ...}: the modules whose parameters train (either method)."""
    out = {"unet": models.unet}
    if train_text_encoder:
        out["text_encoder"] = models.text_encoder
    return out


def trained_parameters(models: SDComponents, train_text_encoder: bool) -> list[tuple[str, torch.nn.Parameter]]:
    """`(module.name, parameter)` of every trainable parameter, UNet first, in `parameters()` order:
    the order of the optimizer's parameter groups."""
    return [(f"{prefix}.{name}", p) for prefix, module in trained_modules(models, train_text_encoder).items()
            for name, p in module.named_parameters() if p.requires_grad]


def setup_full_finetune(models: SDComponents, cfg: TrainConfig) -> None:
    """Unfreeze the trained modules in float32 and switch on gradient checkpointing when asked."""
    for module in trained_modules(models, cfg.train_text_encoder).values():
        module.to(dtype=torch.float32)  # master weights and optimizer moments in fp32, whatever the autocast
        module.requires_grad_(True)
        module.train()
    if cfg.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            models.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def trained_weights(models: SDComponents, train_text_encoder: bool) -> dict[str, dict[str, torch.Tensor]]:
    """{"unet": {param name: tensor}, "text_encoder": {...}}: CPU copies of the trained parameters."""
    return {prefix: {name: p.detach().to("cpu", copy=True) for name, p in module.named_parameters()}
            for prefix, module in trained_modules(models, train_text_encoder).items()}


@torch.no_grad()
def load_trained_weights(models: SDComponents, train_text_encoder: bool, weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """Copy `weights` (as `trained_weights` gives them) into the modules; every parameter must be there
    with its shape, and nothing else."""
    for prefix, module in trained_modules(models, train_text_encoder).items():
        if prefix not in weights:
            raise KeyError(f"no {prefix} weights in the saved state (was it saved without train_text_encoder?)")
        load_named_parameters(module, weights[prefix], prefix)


@torch.no_grad()
def load_named_parameters(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Copy `tensors` into `module`'s parameters of the same names; a missing, extra or misshapen one raises."""
    params = dict(module.named_parameters())
    missing, extra = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
    if missing or extra:
        raise KeyError(f"{what}: saved weights do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, p in params.items():
        if p.shape != tensors[name].shape:
            raise ValueError(f"{what}.{name}: saved shape {tuple(tensors[name].shape)}, model {tuple(p.shape)}")
        p.copy_(tensors[name])


@contextlib.contextmanager
def base_model_weights(trainer) -> Iterator[None]:
    """The base model's own weights in a full fine-tune's trained modules (and no EMA swap) for the
    block, the trained ones back afterwards: what a LoRA gets from disabling its adapters. Before
    the first step the model is the base model already; later the base weights are read again."""
    if trainer.global_step == 0:
        yield
        return
    from trainer.model_loading import load_sd_components

    base = load_sd_components(trainer.cfg.base_model)
    train_te = trainer.cfg.train_text_encoder
    saved = trained_weights(trainer.models, train_te)
    ema, trainer.ema = trainer.ema, None
    load_trained_weights(trainer.models, train_te, trained_weights(base, train_te))
    try:
        yield
    finally:
        load_trained_weights(trainer.models, train_te, saved)
        trainer.ema = ema
