"""Score generated images against their prompts with a `ClipModel`."""

from __future__ import annotations

import numpy as np

from evaluator.clip_model import ClipModel, validate_images
from evaluator.metrics import TORCHMETRICS_SCALE, clip_t


def score_images(model: ClipModel, images: np.ndarray, prompts: list[str],
                 scale: float = TORCHMETRICS_SCALE, batch_size: int = 32) -> dict:
    """CLIP-T of each image (uint8 NHWC) against its own prompt.

    Returns {"clip_score": mean over images, "per_image": [score of image i, ...]}, floats on
    the `scale` (100 = torchmetrics convention, see `evaluator.metrics`).
    """
    validate_images(images)
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings (one per image), got a single string")
    if len(images) != len(prompts):
        raise ValueError(f"need one prompt per image: got {len(images)} images "
                         f"and {len(prompts)} prompts")
    # Eval suites repeat each prompt over several seeds: embed each distinct prompt once.
    unique = list(dict.fromkeys(prompts))
    text_emb = model.embed_texts(unique)
    where = {p: i for i, p in enumerate(unique)}
    text_emb = text_emb[[where[p] for p in prompts]]
    image_emb = model.embed_images(images, batch_size=batch_size)
    per_image = clip_t(image_emb, text_emb, scale=scale)
    return {"clip_score": float(per_image.mean()), "per_image": [float(s) for s in per_image]}
