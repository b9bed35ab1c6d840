"""Every evaluation's images, scaled down and kept in the sweep's storage for the report.

Tune keeps only a trial's best checkpoints and its latest (sweeps.tuner), so the images of most
evaluations are gone by the end of a trial; the report's steps-as-columns grid needs all of them.
`<sweep>/evals/<trial id>/step-<N>.jpg` holds one evaluation's images as a grid (the layout of
sweeps.sample_grids.save_grid, in the order of the trial's prompts and seeds), each image scaled
to at most THUMB px: a 512 px sweep's evaluation of 44 images takes a few hundred kB, not 30 MB.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

from sweeps import storage
from sweeps.sample_grids import read_grid, save_grid

EVALS = "evals"
THUMB = 128  # px, the longest side of a kept image
_STEP_FILE = re.compile(r"^step-(\d+)\.jpg$")


def thumbnails(images: np.ndarray, size: int = THUMB) -> np.ndarray:
    """uint8 NHWC images scaled down (area filter) so that the longer side is at most `size`."""
    h, w = images.shape[1:3]
    if max(h, w) <= size:
        return images
    scale = size / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.stack([np.asarray(Image.fromarray(im).resize(new, Image.BOX)) for im in images])


def eval_uri(sweep_uri: str, trial_id: str, step: int) -> str:
    return storage.join(sweep_uri, EVALS, trial_id, f"step-{int(step):06d}.jpg")


def save_eval_images(sweep_uri: str, trial_id: str, step: int, images: np.ndarray) -> None:
    buf = io.BytesIO()
    save_grid(thumbnails(images), buf, format="JPEG", quality=90)
    storage.write_bytes(eval_uri(sweep_uri, trial_id, step), buf.getvalue())


def eval_steps(sweep_uri: str, trial_id: str) -> list[int]:
    """The steps at which the trial's evaluation images were kept, in order."""
    names = storage.listdir(storage.join(sweep_uri, EVALS, trial_id))
    return sorted(int(m.group(1)) for m in map(_STEP_FILE.match, names) if m)


def read_eval_images(sweep_uri: str, trial_id: str, step: int, count: int) -> np.ndarray:
    """The `count` kept images of the evaluation at `step` (uint8 NHWC)."""
    return read_grid(io.BytesIO(storage.read_bytes(eval_uri(sweep_uri, trial_id, step))), count)
