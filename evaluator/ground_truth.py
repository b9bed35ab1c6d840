"""Ground-truth evaluation: held-out (caption, truth image) pairs, one generated image per caption at
a fixed seed, scored against the truth as the seed project compared its original and fine-tuned
models: LPIPS per image and mean (evaluator.lpips_judge), Fréchet distance, KID and CMMD between
the generated and the truth images' CLIP features (evaluator.distribution_metrics, torchmetrics for
FD/KID), and CLIP-T of each image against its caption.

The pairs are an imagefolder: images and `metadata.jsonl` with `file_name` and `text` per line (a
dataset's test split, or a folder of its own). `builtin:demo-test` is the toy world's: held-out
pictures of the demo's concept (`builtin:demo`), drawn at another seed, with their captions.

The CLIP part (`clip_ground_truth_scores`) is a pure function of embeddings: a sweep's shared
evaluator computes it on its own CLIP features (evaluator.evaluator_service), a trial without one
on its CLIP model, with the same numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from common.cache_dir import cache_root
from evaluator.distribution_metrics import clip_fd, clip_kid, cmmd
from evaluator.metrics import mean_clip_t

METADATA_FILE = "metadata.jsonl"
TOY_WORLD_TEST_ID = "builtin:demo-test"
# The toy world's test split: a few pictures (each evaluation samples them all) at a seed that the
# demo's training pictures (seed 0) do not use.
_TOY_TEST_COUNT, _TOY_TEST_SEED = 6, 101
# Reported names (lower is better for all but gt_clip_t); `gt_lpips_items` holds the per-image LPIPS.
GROUND_TRUTH_METRICS = ("gt_lpips", "gt_fd", "gt_kid", "gt_cmmd", "gt_clip_t")


class GroundTruthError(ValueError):
    """The ground-truth folder cannot be read; the message names the file (and line) and the fix."""


@dataclass(frozen=True)
class GroundTruthPair:
    caption: str
    image_path: str  # absolute


def resolve_ground_truth_folder(folder: str | Path) -> Path:
    """`builtin:demo-test` as the folder it is written into (once, under the cache root); a path made absolute."""
    if str(folder) == TOY_WORLD_TEST_ID:
        from toyworld.lora_task import write_lora_dataset

        return write_lora_dataset(cache_root() / "datasets" / "toy-world-test", layout="imagefolder",
                                  count=_TOY_TEST_COUNT, seed=_TOY_TEST_SEED)
    return Path(folder).expanduser().resolve()


def read_ground_truth(folder: str | Path) -> list[GroundTruthPair]:
    """The pairs of `folder/metadata.jsonl`, every image checked to exist (at least two: FD and KID need a pair)."""
    folder = resolve_ground_truth_folder(folder)
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


def clip_ground_truth_scores(generated_emb, truth_emb, caption_emb) -> dict:
    """gt_fd, gt_kid, gt_cmmd and gt_clip_t from CLIP embeddings (rows: pair i's generated image, truth
    image and caption): pure, so that the trial's own CLIP and the shared evaluator's give the same numbers."""
    return {
        "gt_fd": clip_fd(generated_emb, truth_emb),
        "gt_kid": clip_kid(generated_emb, truth_emb),
        "gt_cmmd": cmmd(generated_emb, truth_emb),
        "gt_clip_t": mean_clip_t(generated_emb, caption_emb),
    }


def lpips_scores(lpips_model, generated: np.ndarray, truth: np.ndarray) -> dict:
    """gt_lpips (the mean) and gt_lpips_items (one LPIPS per pair) of generated image i against truth image i."""
    from evaluator.lpips_judge import lpips_distances

    per_image = lpips_distances(lpips_model, generated, truth)
    return {"gt_lpips": float(per_image.mean()), "gt_lpips_items": [float(v) for v in per_image]}


def ground_truth_scores(clip, lpips_model, generated: np.ndarray, truth: np.ndarray, captions: list[str]) -> dict:
    """GROUND_TRUTH_METRICS (floats) and `gt_lpips_items` of generated image i against truth image i and
    caption i, with an in-process CLIP model."""
    clip_part = clip_ground_truth_scores(clip.embed_images(generated), clip.embed_images(truth), clip.embed_texts(captions))
    return {**lpips_scores(lpips_model, generated, truth), **clip_part}
