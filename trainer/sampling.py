"""Evaluation sampling: images from the current LoRA at fixed seeds, as uint8 arrays."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)

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
        cond = encode_prompts(models.tokenizer, models.text_encoder, chunk, clip_skip)
        uncond = encode_prompts(models.tokenizer, models.text_encoder, [sampling.negative_prompt] * len(chunk), clip_skip)
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
        out.append(np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(out, axis=0)
