"""Datasets: kohya folders (`<repeats>_<trigger> <class>/` + .txt captions) and the generated demo set."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from toyworld.lora_task import write_lora_dataset

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
CAPTION_EXTENSIONS = (".txt", ".caption")
DEMO_DATASET_ID = "builtin:demo"
_KOHYA_DIR = re.compile(r"^(\d+)_(.+)$")


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the path and the fix."""


@dataclass(frozen=True)
class Example:
    image_path: Path
    caption: str


def load_kohya_folder(root: str | Path, num_repeats: int | None = None) -> list[Example]:
    """Examples of a kohya dataset, each repeated as its folder's `<repeats>_` prefix says
    (or `num_repeats` times when given).

    A missing caption file (`.txt`, else `.caption`) falls back to the folder's class tokens
    (`<trigger> <class>`), as kohya sd-scripts does.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist; point `dataset` at a folder of `<repeats>_<name>/` subfolders")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and _KOHYA_DIR.match(d.name))
    if not subdirs:
        raise DatasetError(
            f"dataset folder {root} has no kohya subfolders; expected e.g. `{root}/10_mytrigger myclass/` holding images and .txt captions"
        )
    examples: list[Example] = []
    for sub in subdirs:
        repeats_str, class_tokens = _KOHYA_DIR.match(sub.name).groups()
        images = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        for image in images:
            caption = _read_caption(image) or class_tokens
            examples.extend([Example(image, caption)] * (num_repeats or int(repeats_str)))
    if not examples:
        raise DatasetError(f"dataset folder {root} has kohya subfolders but no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return examples


def _read_caption(image: Path) -> str | None:
    """The image's caption file's text; None when there is none or it is empty or only whitespace
    (the caller then uses the folder's class tokens, as for a missing file)."""
    for ext in CAPTION_EXTENSIONS:
        path = image.with_suffix(ext)
        if path.is_file():
            return path.read_text(encoding="utf-8").strip() or None
    return None


def resolve_dataset(dataset: str, cache_root: Path) -> Path:
    """Turn `builtin:demo` into the generated demo folder; anything else is a path."""
    if dataset == DEMO_DATASET_ID:
        return ensure_demo_dataset(cache_root / "datasets" / "toy-world-kohya")
    return Path(dataset).expanduser()


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


class EpochSampler:
    """Shuffled epochs over the examples, resumable exactly from its state."""

    def __init__(self, num_examples: int, seed: int):
        self.num_examples = num_examples
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.num_examples, generator=g).tolist()

    def next_indices(self, count: int) -> list[int]:
        out = []
        order = self._order()
        while len(out) < count:
            if self.position >= self.num_examples:
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
            out.append(order[self.position])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_examples": self.num_examples}

    def load_state_dict(self, state: dict) -> None:
        if state["num_examples"] != self.num_examples:
            raise DatasetError(
                f"checkpoint was taken on a dataset of {state['num_examples']} examples, this one has {self.num_examples}"
            )
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]


# --- the generated demo dataset ---------------------------------------------------------------


def ensure_demo_dataset(folder: Path) -> Path:
    """The toy world's LoRA task (18 pictures of its held-out colour, captioned `a lswsks <shape>`)
    as a kohya folder, written once and atomically (see `toyworld.lora_task`)."""
    return write_lora_dataset(folder, layout="kohya")
