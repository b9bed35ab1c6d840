"""The prepare phase: what a run needs that is resolved once, before training.

A sweep's driver calls `prepare` once and ships the `Prepared` to every trial, so that no trial
re-reads and re-verifies the dataset, fingerprints the VAE and text encoder, or hashes the base
model's weights (3.4 GB for SD 1.5); `python -m trainer` calls it as its first phase.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from common.files import sha256_file
from trainer.cache import ensure_latent_cache, ensure_text_cache, module_fingerprint
from trainer.class_images import ensure_class_images, missing_class_images, render_class_images
from trainer.config import TrainConfig, TrainConfigError
from trainer.model_loading import SDComponents, base_model_weights_file, load_sd_components, resolve_base_model
from trainer.train_data import TrainData, dataset_summary, load_train_data


@dataclass(frozen=True)
class Prepared:
    """What a training run needs that is resolved once, before training (picklable: a sweep ships it to every trial)."""

    base_model: str  # resolved: local absolute path, or hub id
    # sha256 of the weights file that identifies the base model (kohya ss_sd_model_hash and
    # ss_new_sd_model_hash); None when there is no local file (a hub id not in the HF cache)
    base_model_sha256: str | None
    data: TrainData  # verified examples (repeats included), class examples, raw image sizes
    vae_fingerprint: str  # what module_fingerprint(vae) returns: latent cache keys are computed from it
    text_encoder_fingerprint: str  # ditto for text caches
    dataset_summary: dict  # {"dirs": ..., "tag_frequency": ...} for kohya metadata
    cache_folders: tuple[str, ...] = ()  # the latent/text cache folders built or found (absolute paths)


def default_device(device: str | torch.device | None = None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def place_base_models(models: SDComponents, cfg: TrainConfig, device: torch.device) -> None:
    """Freeze the base model on `device` with the config's attention and prediction type: set
    before class images are generated, so that they come from the model that is trained."""
    for module in (models.unet, models.vae, models.text_encoder):
        module.requires_grad_(False)
        module.to(device)
    models.unet.set_attn_processor(AttnProcessor2_0() if cfg.attention == "sdpa" else AttnProcessor())
    if cfg.prediction_type is not None:
        models.noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)


def _check_clip_skips(models: SDComponents, clip_skips: list[int]) -> None:
    """Clip skip N reads the text encoder's N-th last layer: more than it has can never encode."""
    layers = models.text_encoder.config.num_hidden_layers
    too_deep = [k for k in clip_skips if k > layers]
    if too_deep:
        message = f"{too_deep[0]} exceeds the base model's text encoder, which has {layers} layers; use 1 (off) to {layers}"
        raise TrainConfigError(f"clip_skip: {message}", [("clip_skip", message)])


def uses_text_cache(cfg: TrainConfig) -> bool:
    return cfg.cache_text_embeddings and not cfg.train_text_encoder


def check_instance_data(cfg: TrainConfig) -> None:
    """Read and verify the instance images alone (the class images are still to be made): a
    broken dataset is refused before minutes of class-image sampling."""
    load_train_data(cfg.model_copy(update={"with_prior_preservation": False}))


def class_images_from_base_model(cfg: TrainConfig, indices: list[int], device: str | None = None) -> list[tuple[str, bytes]]:
    """Class images `indices` as (file name, PNG bytes), from the base model loaded here and placed
    as training places it: the body of a sweep's class-image task on a GPU worker."""
    models = load_sd_components(cfg.base_model)
    place_base_models(models, cfg, default_device(device))
    return render_class_images(models, cfg, indices)


def prepare(cfg: TrainConfig, clip_skips: list[int] | None = None, components: SDComponents | None = None,
            device: str | None = None) -> Prepared:
    """Class images (prior preservation), then the dataset read and verified once, then latent and
    text caches (text caches for cfg.clip_skip and every clip skip in `clip_skips`); returns Prepared.
    Callable from the CLI and by a sweep's driver; safe from several processes at once."""
    _, base_model = resolve_base_model(cfg.base_model)  # a hub id stays a hub id
    weights = base_model_weights_file(cfg.base_model)
    making_class_images = missing_class_images(cfg) > 0
    # A broken dataset fails before any model is loaded or any class image is made.
    if making_class_images:
        check_instance_data(cfg)
    else:
        data = load_train_data(cfg)
    models = components or load_sd_components(cfg.base_model)
    _check_clip_skips(models, sorted({cfg.clip_skip, *(clip_skips or [])}))
    place_base_models(models, cfg, default_device(device))
    if making_class_images:
        ensure_class_images(cfg, models)  # with the base model, before any LoRA layer exists
        data = load_train_data(cfg)
    vae_fingerprint = module_fingerprint(models.vae)
    text_encoder_fingerprint = module_fingerprint(models.text_encoder)
    caches = []
    if cfg.cache_latents:
        caches.append(ensure_latent_cache(cfg, models.vae, data, vae_fingerprint))
    if uses_text_cache(cfg):
        for skip in sorted({cfg.clip_skip, *(clip_skips or [])}):
            caches.append(ensure_text_cache(cfg, models.tokenizer, models.text_encoder, data.captions(), skip,
                                            text_encoder_fingerprint))
    return Prepared(
        base_model=base_model,
        base_model_sha256=sha256_file(weights) if weights else None,
        data=data,
        vae_fingerprint=vae_fingerprint,
        text_encoder_fingerprint=text_encoder_fingerprint,
        dataset_summary=dataset_summary(data),
        cache_folders=tuple(str(c.folder) for c in caches),
    )
