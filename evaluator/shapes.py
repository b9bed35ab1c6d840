"""Procedurally drawn images of simple coloured shapes with matching captions.

They give the tiny CLIP something learnable ("a red circle" vs "a blue square"), so that its
scores carry meaning in tests, and give tests held-out images with known captions.
Everything is numpy and seeded: the same seed draws the same pixels on any machine.
"""

from __future__ import annotations

import numpy as np

# RGB of each colour word; far apart so that a 64 px model can tell them from any background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 170),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")


def caption(color: str, shape: str) -> str:
    return f"a {color} {shape}"


def all_classes() -> list[tuple[str, str]]:
    """Every (colour, shape) pair, in a fixed order."""
    return [(c, s) for c in COLORS for s in SHAPES]


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean (size, size) mask of one shape centred at (cx, cy) with half-extent r (pixels)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        # Slightly smaller than the circle's bounding box so both cover similar areas.
        h = r * 0.85
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    if shape == "triangle":
        # Upright isosceles triangle: inside the base line and both slanted edges.
        top, bottom = cy - r, cy + r * 0.8
        t = (y - top) / (bottom - top)
        return (t >= 0) & (t <= 1) & (np.abs(x - cx) <= t * r)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A plain grey-ish or pale background with a gentle gradient, so colour alone never
    identifies the background and the model must look at the shape."""
    base = rng.uniform(60, 200, size=3).astype(np.float32)
    tint = rng.uniform(-25, 25, size=3).astype(np.float32)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    ramp = ramp[None, :, None] if rng.random() < 0.5 else ramp[:, None, None]
    return np.broadcast_to(base + tint * ramp, (size, size, 3)).copy()


def draw_shape(rng: np.random.Generator, color: str, shape: str, size: int = 64) -> np.ndarray:
    """One (size, size, 3) uint8 image of a `color` `shape` at a random place and scale."""
    img = _background(rng, size)
    r = rng.uniform(0.2, 0.35) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    mask = _shape_mask(shape, size, cx, cy, r)
    jitter = rng.uniform(-20, 20, size=3)
    img[mask] = np.clip(np.asarray(COLORS[color], np.float32) + jitter, 0, 255)
    noise = rng.normal(0.0, 4.0, size=img.shape).astype(np.float32)
    return np.clip(img + noise, 0, 255).round().astype(np.uint8)


def render_shapes(n: int, seed: int, size: int = 64) -> tuple[np.ndarray, list[str]]:
    """`n` images (uint8 NHWC) with their captions, classes cycling through every pair.

    Cycling (rather than sampling) classes keeps a batch of len(all_classes()) free of
    duplicate captions, which would be false negatives for the contrastive loss.
    """
    rng = np.random.default_rng(seed)
    classes = all_classes()
    order = np.concatenate([rng.permutation(len(classes)) for _ in range(-(-n // len(classes)))])
    images = np.empty((n, size, size, 3), np.uint8)
    captions: list[str] = []
    for i, k in enumerate(order[:n]):
        color, shape = classes[k]
        images[i] = draw_shape(rng, color, shape, size)
        captions.append(caption(color, shape))
    return images, captions
