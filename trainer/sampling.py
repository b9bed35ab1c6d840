"""Evaluation sampling: images from the current LoRA at fixed seeds, as uint8 arrays: text-to-image
(`sample_images`) and image-to-image from init images (`sample_img2img`), both pipelines made of
the components already in memory."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from PIL import Image, ImageOps

from trainer.config import SamplingConfig
from trainer.model_loading import SDComponents
from trainer.text_encoding import encode_prompts

SAMPLERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
}


def make_pipeline(models: SDComponents, sampler: str) -> StableDiffusionPipeline:
    scheduler = SAMPLERS[sampler].from_config(models.noise_scheduler.config)
    pipe = StableDiffusionPipeline(
        vae=models.vae,
        text_encoder=models.text_encoder,
        tokenizer=models.tokenizer,
        unet=models.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)


def _embeds(models: SDComponents, prompts: list[str], clip_skip: int, negative: str):
    cond = encode_prompts(models.tokenizer, models.text_encoder, prompts, clip_skip)
    uncond = encode_prompts(models.tokenizer, models.text_encoder, [negative] * len(prompts), clip_skip)
    return cond, uncond


@torch.no_grad()
def sample_images(
    models: SDComponents,
    prompts: list[str],
    seeds: list[int],
    clip_skip: int,
    resolution: int,
    sampling: SamplingConfig,
    batch_size: int = 8,
) -> np.ndarray:
    """One image per (prompt, seed) pair, NHWC uint8. The same seed gives the same starting noise."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    pipe = make_pipeline(models, sampling.sampler)
    device = models.unet.device
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        cond, uncond = _embeds(models, chunk, clip_skip, sampling.negative_prompt)
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds[start : start + batch_size]]
        images = pipe(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            num_inference_steps=sampling.steps,
            guidance_scale=sampling.guidance_scale,
            height=resolution,
            width=resolution,
            generator=gens,
            output_type="np",
        ).images
        out.append(_to_uint8(images))
    return np.concatenate(out, axis=0)


def make_img2img_pipeline(models: SDComponents, sampler: str) -> StableDiffusionImg2ImgPipeline:
    """diffusers' img2img pipeline `from_pipe` the text-to-image one: the same modules, none loaded again."""
    pipe = StableDiffusionImg2ImgPipeline.from_pipe(make_pipeline(models, sampler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fit_image(image: np.ndarray, resolution: int) -> np.ndarray:
    """A uint8 HWC picture center-cropped to a square and resized to `resolution` (as training images are)."""
    fitted = ImageOps.fit(Image.fromarray(image).convert("RGB"), (resolution, resolution), Image.Resampling.BICUBIC)
    return np.asarray(fitted, dtype=np.uint8)


@torch.no_grad()
def sample_img2img(
    models: SDComponents,
    prompts: list[str],
    seeds: list[int],
    init_images: list[np.ndarray],
    strength: float,
    clip_skip: int,
    sampling: SamplingConfig,
    batch_size: int = 8,
) -> np.ndarray:
    """One image per (prompt, seed, init image) at img2img `strength`, NHWC uint8 at the init
    images' size (give them fitted, see `fit_image`). The pipeline is diffusers'
    `StableDiffusionImg2ImgPipeline` made `from_pipe` of the text-to-image one: same modules."""
    if not (len(prompts) == len(seeds) == len(init_images)):
        raise ValueError(f"{len(prompts)} prompts, {len(seeds)} seeds and {len(init_images)} init images; "
                         "give one of each per image")
    if int(sampling.steps * strength) < 1:
        raise ValueError(f"strength {strength} x {sampling.steps} sampling steps leaves no denoising step; "
                         "raise the strength or sampling.steps")
    pipe = make_img2img_pipeline(models, sampling.sampler)
    device = models.unet.device
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        cond, uncond = _embeds(models, prompts[chunk], clip_skip, sampling.negative_prompt)
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds[chunk]]
        init = np.stack(init_images[chunk]).astype(np.float32) / 255.0  # NHWC in [0, 1], as diffusers reads arrays
        images = pipe(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            image=init,
            strength=strength,
            num_inference_steps=sampling.steps,
            guidance_scale=sampling.guidance_scale,
            generator=gens,
            output_type="np",
        ).images
        out.append(_to_uint8(images))
    return np.concatenate(out, axis=0)
