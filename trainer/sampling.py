"""Evaluation sampling: images from the current LoRA at fixed seeds, as uint8 arrays."""

from __future__ import annotations

from pathlib import Path

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

from common.files import atomic_write
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


def generate_class_images(models: SDComponents, cfg, count: int, folder: Path, batch_size: int = 4) -> list[Path]:
    """`count` images of `cfg.class_prompt` from the base model (LoRA-free: call before adding
    adapters), saved as PNG into `folder` after the ones already there. Seeds follow the file
    index, so a folder topped up later holds the same images as one generated at once."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    start = len([p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.name.startswith("class_")])
    written = []
    for first in range(start, start + count, batch_size):
        idx = list(range(first, min(first + batch_size, start + count)))
        images = sample_images(
            models, [cfg.class_prompt] * len(idx), [cfg.seed * 1_000_003 + i for i in idx],
            cfg.clip_skip, cfg.resolution, cfg.sampling,
        )
        for i, im in zip(idx, images):
            path = folder / f"class_{i:05d}.png"
            # atomic: a reader never sees half an image
            atomic_write(path, lambda tmp, im=im: Image.fromarray(im).save(tmp, format="PNG"), fsync=False)
            written.append(path)
    return written
