"""Drawing the world: 64 px images of one coloured shape on a named background, with captions.

Everything is numpy and seeded: the same seed draws the same pixels on any machine. A picture
is a `Scene` (colour, shape, background, centre and size); `draw` turns it into pixels and
`caption` into words.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# RGB of each colour word, far apart so that a 64 px model (and the oracle) can tell them apart
# on any background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 170),
    "cyan": (20, 205, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Named backgrounds (base RGB); each picture adds a gentle gradient and a tint around it.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (225, 225, 220),
    "gray": (125, 125, 130),
    "black": (30, 30, 35),
}

# Left out of the built-in SD model's pretraining: what the demo's LoRA learns.
HELD_OUT_COLOR = "cyan"
KNOWN_COLORS: tuple[str, ...] = tuple(c for c in COLORS if c != HELD_OUT_COLOR)

RADIUS_RANGE = (0.2, 0.34)  # half-extent of a shape, as a fraction of the image side


class Scene(NamedTuple):
    color: str
    shape: str
    background: str
    cx: float  # centre, pixels
    cy: float
    r: float  # half-extent, pixels


def caption(color: str, shape: str, background: str | None = None) -> str:
    """`a red circle`, or `a red circle on a white background`."""
    text = f"a {color} {shape}"
    return f"{text} on a {background} background" if background else text


def all_classes(colors: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """Every (colour, shape) pair, in a fixed order."""
    return [(c, s) for c in (colors or tuple(COLORS)) for s in SHAPES]


def shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean (size, size) mask of one shape centred at (cx, cy) with half-extent r (pixels)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        h = r * 0.85  # a little smaller than the circle's box, so both cover similar areas
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    if shape == "triangle":
        top, bottom = cy - r, cy + r * 0.8  # upright isosceles
        t = (y - top) / (bottom - top)
        return (t >= 0) & (t <= 1) & (np.abs(x - cx) <= t * r)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def random_scene(rng: np.random.Generator, color: str, shape: str, background: str | None = None,
                 size: int = 64) -> Scene:
    """A scene of `color` `shape` at a random place and scale (and background, unless given)."""
    bg = background or str(rng.choice(list(BACKGROUNDS)))
    r = float(rng.uniform(*RADIUS_RANGE)) * size
    cx, cy = (float(v) for v in rng.uniform(r, size - r, size=2))
    return Scene(color, shape, bg, cx, cy, r)


def draw(rng: np.random.Generator, scene: Scene, size: int = 64) -> np.ndarray:
    """One (size, size, 3) uint8 image of `scene`; `rng` draws the gradient, tint and noise."""
    base = np.asarray(BACKGROUNDS[scene.background], np.float32) + rng.uniform(-12, 12, 3)
    tint = rng.uniform(-20, 20, size=3).astype(np.float32)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    ramp = ramp[None, :, None] if rng.random() < 0.5 else ramp[:, None, None]
    img = np.broadcast_to(base + tint * ramp, (size, size, 3)).copy()
    mask = shape_mask(scene.shape, size, scene.cx, scene.cy, scene.r)
    jitter = rng.uniform(-15, 15, size=3)
    img[mask] = np.clip(np.asarray(COLORS[scene.color], np.float32) + jitter, 0, 255)
    noise = rng.normal(0.0, 3.0, size=img.shape).astype(np.float32)
    return np.clip(img + noise, 0, 255).round().astype(np.uint8)


def draw_shape(rng: np.random.Generator, color: str, shape: str, size: int = 64,
               background: str | None = None) -> np.ndarray:
    """One image of a `color` `shape` at a random place, scale and background."""
    return draw(rng, random_scene(rng, color, shape, background, size), size)


def render_world(n: int, seed: int, colors: tuple[str, ...] | None = None, size: int = 64,
                 background_in_caption: float = 0.5) -> tuple[np.ndarray, list[str], list[Scene]]:
    """`n` images (uint8 NHWC), captions and scenes, classes cycling through every pair of
    `colors` (all colours by default) x shapes. A caption names the background with probability
    `background_in_caption`.

    Cycling (rather than sampling) classes keeps a batch of len(all_classes()) free of duplicate
    captions, which would be false negatives for a contrastive loss.
    """
    rng = np.random.default_rng(seed)
    classes = all_classes(colors)
    order = np.concatenate([rng.permutation(len(classes)) for _ in range(-(-n // len(classes)))])
    images = np.empty((n, size, size, 3), np.uint8)
    captions: list[str] = []
    scenes: list[Scene] = []
    for i, k in enumerate(order[:n]):
        color, shape = classes[k]
        scene = random_scene(rng, color, shape, size=size)
        images[i] = draw(rng, scene, size)
        named = rng.random() < background_in_caption
        captions.append(caption(color, shape, scene.background if named else None))
        scenes.append(scene)
    return images, captions, scenes


def render_shapes(n: int, seed: int, size: int = 64) -> tuple[np.ndarray, list[str]]:
    """`n` images with plain `a <colour> <shape>` captions over every colour (the CLIP judge's
    and the evaluator tests' data)."""
    images, captions, _ = render_world(n, seed, size=size, background_in_caption=0.0)
    return images, captions
