"""Export of a full fine-tune: a diffusers pipeline folder and one original-layout (LDM) `.safetensors`
checkpoint, the file AUTOMATIC1111 and ComfyUI load (`v1-5-pruned-emaonly.safetensors`'s layout).

Both come either from a live trainer (its evaluation weights: the EMA's when on) or from a resume
checkpoint (trainer.checkpoint) plus the base model, so that a sweep's checkpoints need not carry
a second copy of the model: the checkpoint's trained weights (or EMA shadows) go into the base
pipeline, whose VAE, tokenizer, scheduler and frozen text encoder are the base model's own.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from common.files import atomic_folder, atomic_write
from trainer.checkpoint import CheckpointError, read_checkpoint
from trainer.full_finetune import TRAINED_MODULES, load_named_parameters
from trainer.ldm_conversion import modules_to_ldm_state_dict

SINGLE_FILE_FORMAT = "pt"  # the `format` metadata that single-file SD checkpoints carry


def save_pipeline_folder(pipe: StableDiffusionPipeline, folder: str | Path) -> Path:
    """The pipeline as a diffusers folder (safetensors), written whole or not at all."""
    with atomic_folder(folder) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return Path(folder)


def save_single_file(pipe: StableDiffusionPipeline, path: str | Path, metadata: dict[str, str] | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """UNet, VAE and text encoder as one SD 1.x checkpoint file; `dtype` (e.g. float16, as SD 1.5's
    2 GB files) casts the floating-point tensors, None keeps them as trained."""
    state = modules_to_ldm_state_dict(pipe.unet, pipe.vae, pipe.text_encoder)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    meta = {"format": SINGLE_FILE_FORMAT, **(metadata or {})}
    atomic_write(Path(path), lambda tmp: save_file(state, str(tmp), metadata=meta))
    return Path(path)


def export_trainer(trainer, folder: str | Path | None = None, single_file: str | Path | None = None,
                   metadata: dict[str, str] | None = None) -> None:
    """The trainer's model with its evaluation weights (EMA when on) as a folder and/or a single file."""
    from diffusers import PNDMScheduler

    pipe = trainer.models.to_pipeline(PNDMScheduler.from_config(trainer.models.noise_scheduler.config))
    with trainer.eval_weights():
        if folder is not None:
            save_pipeline_folder(pipe, folder)
        if single_file is not None:
            save_single_file(pipe, single_file, metadata)


def checkpoint_weights(checkpoint: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """{"unet": ..., "text_encoder": ...}: a full fine-tune's evaluation weights in a resume checkpoint,
    the EMA shadows when it kept an EMA, else the trained weights."""
    state = read_checkpoint(checkpoint)
    if "full" not in state:
        raise CheckpointError(f"checkpoint {checkpoint} holds no full fine-tune (method lora?); export its LoRA files")
    if state.get("ema") is None:
        return state["full"]
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state["ema"]["shadow"].items():
        module, _, param = name.partition(".")
        out.setdefault(module, {})[param] = tensor
    return out


def export_checkpoint(base_model: str, checkpoint: str | Path, folder: str | Path | None = None,
                      single_file: str | Path | None = None, metadata: dict[str, str] | None = None) -> None:
    """A full fine-tune's resume checkpoint on its base model, as a folder and/or a single file."""
    from trainer.export import _load_base_pipeline

    weights = checkpoint_weights(checkpoint)
    pipe = _load_base_pipeline(base_model)
    for module in TRAINED_MODULES:
        if module in weights:
            load_named_parameters(getattr(pipe, module), weights[module], f"{checkpoint}: {module}")
    if folder is not None:
        save_pipeline_folder(pipe, folder)
    if single_file is not None:
        save_single_file(pipe, single_file, metadata)
