"""What the evaluator accepts as images (numpy only, so a Ray client checks before sending)."""

from __future__ import annotations

import numpy as np


def validate_images(images: object) -> None:
    """Raise a clear error unless `images` is a non-empty uint8 (N, H, W, 3) array."""
    if not isinstance(images, np.ndarray):
        raise TypeError("images must be a numpy array (N, H, W, 3) uint8, "
                        f"got {type(images).__name__}")
    if images.dtype != np.uint8:
        hint = (" (floats in [0, 1]: use (x * 255).round().astype(np.uint8))"
                if images.dtype.kind == "f" else "")
        raise ValueError(f"images must have dtype uint8, got {images.dtype}{hint}")
    if images.ndim != 4:
        raise ValueError(f"images must be 4-D (N, H, W, 3) NHWC, got shape {images.shape}")
    if images.shape[-1] != 3:
        hint = " (looks like NCHW: transpose to NHWC)" if images.shape[1] == 3 else ""
        hint = hint or (" (RGBA: drop alpha with images[..., :3])" if images.shape[-1] == 4 else "")
        raise ValueError("images must have 3 RGB channels in the last axis, "
                         f"got shape {images.shape}{hint}")
    if images.shape[0] == 0:
        raise ValueError("no images to embed: got an empty batch (N == 0)")
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise ValueError(f"images have zero height or width: shape {images.shape}")


def image_batches(images: np.ndarray, batch_size: int):
    """Check `images` (validate_images) and `batch_size`, then yield consecutive slices of at most
    `batch_size` images: the batching every embedding model of the evaluator shares."""
    validate_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size]
