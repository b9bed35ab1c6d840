"""The exact oracle: reads a picture's pixels and says which colour and shape it shows.

No learned model: the background is the median colour of the image's border; the shape is the
largest connected region of pixels far from it; its colour is the palette colour nearest to the
region's median; its shape follows from how much of its bounding box it fills (square ~1,
circle ~pi/4, triangle ~1/2). A picture with no such region, one that covers too much of the
image, or a colour far from every palette colour reads as "none" (None).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage

from toyworld.world import COLORS, HELD_OUT_COLOR, SHAPES

_FOREGROUND = 60.0  # distance (RGB, 0-255) from the background that makes a pixel foreground
_MIN_AREA, _MAX_AREA = 0.02, 0.45  # of the image: drawn shapes cover about 4% to 35%
_MAX_COLOR_DIST = 75.0  # median foreground colour this far from every palette colour: no colour
_PALETTE = np.asarray(list(COLORS.values()), np.float32)
_NAMES = list(COLORS)


# What `oracle_metrics` reports: metrics of the toy world only (real sweeps have no oracle).
ORACLE_METRICS = ("concept_accuracy", "concept_color_rate", "prior_accuracy")


class Reading(NamedTuple):
    color: str | None
    shape: str | None


def read(image: np.ndarray) -> Reading:
    """The colour and shape a (H, W, 3) uint8 image shows; None for either when it shows none."""
    img = np.asarray(image, np.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    h, w, _ = img.shape
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    fg = np.linalg.norm(img - np.median(border, axis=0), axis=2) > _FOREGROUND
    fg = ndimage.binary_opening(fg, iterations=1)  # drop speckles and one-pixel bridges
    labels, n = ndimage.label(fg)
    if n == 0:
        return Reading(None, None)
    sizes = np.bincount(labels.ravel())[1:]
    region = labels == (1 + int(np.argmax(sizes)))
    area = region.sum() / (h * w)
    if not _MIN_AREA <= area <= _MAX_AREA:
        return Reading(None, None)
    dist = np.linalg.norm(_PALETTE - np.median(img[region], axis=0), axis=1)
    color = _NAMES[int(np.argmin(dist))] if dist.min() <= _MAX_COLOR_DIST else None
    return Reading(color, _shape_of(region))


def _shape_of(region: np.ndarray) -> str | None:
    ys, xs = np.nonzero(region)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    if not 0.6 <= width / height <= 1.6:
        return None  # a bar or a smear, not one of the world's shapes
    fill = region.sum() / (height * width)
    if fill >= 0.89:
        return "square"
    if fill >= 0.64:
        return "circle"
    if fill >= 0.35:
        return "triangle"
    return None



# --------------------------------------------------------------------------- metrics of a suite

def _has_trigger(prompt: str, trigger: str | None) -> bool:
    return bool(trigger) and trigger.lower() in _words(prompt)


def _words(prompt: str) -> list[str]:
    return prompt.lower().replace(",", " ").split()


def expected(prompt: str, trigger: str | None) -> Reading:
    """What a prompt of this world asks for: the shape it names, and the held-out colour when it
    holds the trigger word, else the colour it names. None where it names none."""
    words = _words(prompt)
    shape = next((w for w in words if w in SHAPES), None)
    if _has_trigger(prompt, trigger):
        return Reading(HELD_OUT_COLOR, shape)
    return Reading(next((w for w in words if w in COLORS), None), shape)


def oracle_metrics(images: np.ndarray, prompts: list[str], trigger: str | None) -> dict[str, float]:
    """Exact scores of one evaluation's images (one per prompt), for the toy world only.

    concept_accuracy: of the prompts with the trigger word, the fraction drawn as the held-out
    colour in the asked shape; concept_color_rate: ... drawn in the held-out colour at all;
    prior_accuracy: of the prompts that name a known colour and a shape (no trigger word), the
    fraction drawn exactly so. A metric whose prompts are absent is left out.
    """
    if len(images) != len(prompts):
        raise ValueError(f"need one prompt per image: got {len(images)} images and {len(prompts)} prompts")
    concept, color_hits, prior = [], [], []
    for image, prompt in zip(images, prompts):
        want = expected(prompt, trigger)
        if want.shape is None or want.color is None:
            continue
        got = read(image)
        if _has_trigger(prompt, trigger):
            concept.append(got == want)
            color_hits.append(got.color == HELD_OUT_COLOR)
        elif want.color != HELD_OUT_COLOR:
            prior.append(got == want)
    out = {}
    if concept:
        out["concept_accuracy"] = float(np.mean(concept))
        out["concept_color_rate"] = float(np.mean(color_hits))
    if prior:
        out["prior_accuracy"] = float(np.mean(prior))
    return out
