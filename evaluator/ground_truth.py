"""Ground-truth evaluation: held-out (caption, truth image) pairs, one generated image per caption at
a fixed seed, scored against the truth as the seed project compared its original and fine-tuned
models: LPIPS per image and mean (evaluator.lpips_judge), Fréchet distance, KID and CMMD between
the generated and the truth images' CLIP features (evaluator.distribution_metrics, torchmetrics for
FD/KID), and CLIP-T of each image against its caption.

The pairs are an imagefolder: images and `metadata.jsonl` with `file_name` and `text` per line (a
dataset's test split, or a folder of its own).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from evaluator.distribution_metrics import clip_fd, clip_kid, cmmd
from evaluator.metrics import mean_clip_t

METADATA_FILE = "metadata.jsonl"
# Reported names (lower is better for all but gt_clip_t); `gt_lpips_items` holds the per-image LPIPS.
GROUND_TRUTH_METRICS = ("gt_lpips", "gt_fd", "gt_kid", "gt_cmmd", "gt_clip_t")


class GroundTruthError(ValueError):
    """The ground-truth folder cannot be read; the message names the file (and line) and the fix."""


@dataclass(frozen=True)
class GroundTruthPair:
    caption: str
    image_path: str  # absolute


def read_ground_truth(folder: str | Path) -> list[GroundTruthPair]:
    """The pairs of `folder/metadata.jsonl`, every image checked to exist (at least two: FD and KID need a pair)."""
    folder = Path(folder).expanduser().resolve()
    meta = folder / METADATA_FILE
    if not meta.is_file():
        raise GroundTruthError(f"{meta} does not exist; a ground-truth folder holds images and {METADATA_FILE} "
                               '(one line per image: {"file_name": "a.png", "text": "its caption"})')
    pairs = []
    for number, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, caption = str(row["file_name"]), str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise GroundTruthError(f"{meta}:{number}: not a JSON object with file_name and text ({err})") from None
        if not (folder / name).is_file():
            raise GroundTruthError(f"{meta}:{number}: image {folder / name} does not exist")
        pairs.append(GroundTruthPair(caption, str(folder / name)))
    if len(pairs) < 2:
        raise GroundTruthError(f"{meta}: {len(pairs)} pair(s); FD, KID and CMMD need at least 2")
    return pairs


def load_truth_images(pairs: list[GroundTruthPair], resolution: int) -> np.ndarray:
    """The truth images centre-cropped and resized to `resolution` (the generated images' size), NHWC uint8."""
    out = []
    for pair in pairs:
        with Image.open(pair.image_path) as im:
            fitted = ImageOps.fit(im.convert("RGB"), (resolution, resolution), Image.Resampling.BICUBIC)
            out.append(np.asarray(fitted, dtype=np.uint8))
    return np.stack(out)


def ground_truth_scores(clip, lpips_model, generated: np.ndarray, truth: np.ndarray, captions: list[str]) -> dict:
    """GROUND_TRUTH_METRICS (floats) and `gt_lpips_items` (one LPIPS per pair) of generated image i
    against truth image i and caption i."""
    from evaluator.lpips_judge import lpips_distances

    per_image = lpips_distances(lpips_model, generated, truth)
    gen, ref = clip.embed_images(generated), clip.embed_images(truth)
    return {
        "gt_lpips": float(per_image.mean()),
        "gt_fd": clip_fd(gen, ref),
        "gt_kid": clip_kid(gen, ref),
        "gt_cmmd": cmmd(gen, ref),
        "gt_clip_t": mean_clip_t(gen, clip.embed_texts(captions)),
        "gt_lpips_items": [float(v) for v in per_image],
    }
