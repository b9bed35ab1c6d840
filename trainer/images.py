"""Image files as training sees them: checked once, sized (square or aspect-ratio bucket), loaded as pixels.

Buckets are kohya style: (width, height) pairs in `step` px increments between a min and a max
side whose area is at most resolution^2; each image goes to the bucket of nearest aspect ratio
(in log space, so 2:1 and 1:2 are equally far from 1:1), is resized to cover it and cropped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from trainer.config import TrainConfig
from trainer.dataset_layouts import DatasetError, Example, report_bad

Size = tuple[int, int]  # (width, height) in pixels


class ImageInfo(NamedTuple):
    """What a check of the file found: its raw pixel size, and the file version (latent caches
    are keyed by it, so a rewritten image gets new latents)."""

    width: int
    height: int
    file_bytes: int
    mtime_ns: int

    @property
    def size(self) -> Size:
        return self.width, self.height


def check_images(examples: list[Example], on_bad_image: str) -> tuple[list[Example], dict[Path, ImageInfo]]:
    """Open every image once (header + integrity check); bad ones fail or are skipped. Returns the
    kept examples and what was found of each image."""
    infos: dict[Path, ImageInfo] = {}
    bad: set[Path] = set()
    for path in sorted({e.image_path for e in examples}):
        try:
            stat = path.stat()
            with Image.open(path) as im:
                size = im.size
                im.verify()
            infos[path] = ImageInfo(*size, stat.st_size, stat.st_mtime_ns)
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            report_bad(f"cannot read image {path}: {err}; remove or replace the file", on_bad_image)
            bad.add(path)
    return [e for e in examples if e.image_path not in bad], infos


def make_buckets(resolution: int, min_reso: int, max_reso: int, step: int = 64) -> list[Size]:
    """Every (w, h) with sides multiples of `step` in [min_reso, max_reso] and w*h <= resolution^2,
    taking for each width the largest fitting height (and its transpose)."""
    area = resolution * resolution
    buckets: set[Size] = set()
    for w in range(min_reso, max_reso + 1, step):
        h = min(max_reso, (area // w) // step * step)
        if h >= min_reso:
            buckets.add((w, h))
            buckets.add((h, w))
    if not buckets:
        raise ValueError(f"no bucket fits resolution {resolution} between {min_reso} and {max_reso} px")
    return sorted(buckets)


def nearest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is nearest the image's (ties: the larger area)."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def target_sizes(cfg: TrainConfig, sizes: dict[Path, Size]) -> dict[Path, Size]:
    """The (width, height) each image is trained at: its bucket, or resolution x resolution."""
    if not cfg.enable_bucket:
        return {p: (cfg.resolution, cfg.resolution) for p in sizes}
    buckets = make_buckets(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)
    return {p: nearest_bucket(s, buckets) for p, s in sizes.items()}


def load_image(
    path: Path, resolution: int | tuple[int, int], center_crop: bool, flip: bool, rng: np.random.Generator
) -> torch.Tensor:
    """Resize to cover `resolution` (a square side, or a (width, height) bucket), crop to it,
    optionally flip; CHW float32 in [-1, 1]. Random crops draw from `rng`."""
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except OSError as err:
        raise DatasetError(f"cannot read image {path}: {err}; remove or replace the file") from None
    scale = max(width / im.width, height / im.height)
    im = im.resize((max(width, round(im.width * scale)), max(height, round(im.height * scale))), Image.BICUBIC)
    if center_crop:
        left, top = (im.width - width) // 2, (im.height - height) // 2
    else:
        left = int(rng.integers(0, im.width - width + 1))
        top = int(rng.integers(0, im.height - height + 1))
    im = im.crop((left, top, left + width, top + height))
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
