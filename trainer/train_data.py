"""The training data of a config: its layout read once, its images checked once, as TrainData.

TrainData keeps every image's raw size, not the size it is trained at: that depends on the
resolution and bucket settings, which a sweep may search, so a trial asks `target_sizes(cfg)`
of data that the sweep's driver read and checked once.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from common.cache_dir import cache_root
from common.image_files import IMAGE_EXTENSIONS
from toyworld.lora_task import write_lora_dataset
from trainer.config import TrainConfig
from trainer.dataset_layouts import (
    DatasetError,
    Example,
    detect_dataset_type,
    load_image_folder_flat,
    load_imagefolder,
    load_kohya_folder,
)
from trainer.images import ImageInfo, Size, check_images, target_sizes

DEMO_DATASET_ID = "builtin:demo"
# The TrainConfig fields that decide which examples a dataset yields (not how they are trained).
DATA_FIELDS = (
    "dataset", "dataset_type", "num_repeats", "on_bad_image", "instance_prompt",
    "with_prior_preservation", "class_prompt", "class_data_dir", "num_class_images",
    "validation_fraction", "validation_dir",
)


def data_settings(cfg: TrainConfig) -> dict:
    return cfg.model_dump(include=set(DATA_FIELDS))


@dataclass
class TrainData:
    """Everything the loop and the caches need to know about the data."""

    kind: str  # the layout: kohya, imagefolder or dreambooth
    root: Path
    examples: list[Example]  # instance examples, repeats included
    class_examples: list[Example] = field(default_factory=list)  # prior preservation
    images: dict[Path, ImageInfo] = field(default_factory=dict)  # raw size and file version; empty unless verified
    settings: dict = field(default_factory=dict)  # data_settings() of the config it was read for
    # Held-out images for val_loss (one example per image, never trained on); empty: val_loss
    # uses the training images (see validation_set()).
    validation_examples: list[Example] = field(default_factory=list)

    def unique_images(self) -> list[Path]:
        """Every image the caches hold: training, class and validation images."""
        return sorted({e.image_path for e in self.examples + self.class_examples + self.validation_examples})

    def captions(self) -> list[str]:
        return sorted({e.caption for e in self.examples + self.class_examples + self.validation_examples})

    def validation_set(self) -> list[Example]:
        """The examples val_loss is measured on: the held-out ones, else each training image once."""
        if self.validation_examples:
            return list(self.validation_examples)
        return _one_per_image(self.examples)

    def target_sizes(self, cfg: TrainConfig) -> dict[Path, Size]:
        """The (width, height) each image is trained at under `cfg` (square or bucket); opens no file."""
        if not self.images:
            raise DatasetError(f"dataset {self.root} was listed without checking its images; read it with verify=True")
        return target_sizes(cfg, {p: info.size for p, info in self.images.items()})


def ensure_demo_dataset(folder: Path) -> Path:
    """The toy world's LoRA task (18 pictures of its held-out colour, captioned `a lswsks <shape>`)
    as a kohya folder, written once and atomically (see `toyworld.lora_task`)."""
    return write_lora_dataset(folder, layout="kohya")


def resolve_dataset(dataset: str, root: Path | None = None) -> Path:
    """Turn `builtin:demo` into the generated demo folder (under `root`, default the cache root);
    anything else is a path."""
    if dataset == DEMO_DATASET_ID:
        return ensure_demo_dataset((root or cache_root()) / "datasets" / "toy-world-kohya")
    return Path(dataset).expanduser()


def _instance_examples(cfg: TrainConfig, root: Path, kind: str) -> list[Example]:
    if kind == "kohya":
        return load_kohya_folder(root, cfg.num_repeats)
    if kind == "imagefolder":
        return load_imagefolder(root, cfg.num_repeats or 1, cfg.on_bad_image)
    if not cfg.instance_prompt:
        raise DatasetError(f"{root} is a DreamBooth instance folder: set instance_prompt (e.g. 'a photo of sks dog')")
    examples = load_image_folder_flat(root, cfg.instance_prompt, cfg.num_repeats or 1, "instance")
    if not examples:
        raise DatasetError(f"instance folder {root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return examples


def _one_per_image(examples: list[Example]) -> list[Example]:
    """The first example of each image (repeats collapsed), sorted by path."""
    first: dict[Path, Example] = {}
    for e in examples:
        first.setdefault(e.image_path, e)
    return [first[p] for p in sorted(first)]


def _holdout_rank(root: Path, path: Path) -> str:
    """A stable pseudo-random order of images: sha256 of the path inside the dataset (the same on
    every machine and for every training seed)."""
    try:
        name = path.relative_to(root).as_posix()
    except ValueError:
        name = path.as_posix()
    return hashlib.sha256(name.encode()).hexdigest()


def split_validation(examples: list[Example], fraction: float, root: Path) -> tuple[list[Example], list[Example]]:
    """(training examples, held-out examples): round(fraction x unique images), at least one,
    leave the training examples; every repeat of a held-out image goes."""
    images = sorted({e.image_path for e in examples}, key=lambda p: _holdout_rank(root, p))
    n = max(1, round(fraction * len(images)))
    if n >= len(images):
        raise DatasetError(f"validation_fraction {fraction} holds out all {len(images)} images of {root}; "
                           "lower it, or set it to 0 to measure val_loss on the training images")
    held = set(images[:n])
    return [e for e in examples if e.image_path not in held], _one_per_image([e for e in examples if e.image_path in held])


def _validation_dir_examples(cfg: TrainConfig, verify: bool) -> tuple[list[Example], dict[Path, ImageInfo]]:
    vroot = Path(cfg.validation_dir).expanduser()
    kind = cfg.dataset_type if cfg.dataset_type != "auto" else detect_dataset_type(vroot)
    examples = _one_per_image(_instance_examples(cfg, vroot, kind))
    infos: dict[Path, ImageInfo] = {}
    if verify:
        examples, infos = check_images(examples, cfg.on_bad_image)
    if not examples:
        raise DatasetError(f"validation_dir {vroot} holds no usable images")
    return examples, infos


def load_train_data(cfg: TrainConfig, root: Path | None = None, verify: bool = True) -> TrainData:
    """Resolve, detect, load and check the dataset of `cfg` (class images must already exist).

    `verify=False` only lists the examples (for counting): no image is opened, and the result has
    no image sizes, so it cannot be trained on.
    """
    root = root or resolve_dataset(cfg.dataset)
    kind = cfg.dataset_type if cfg.dataset_type != "auto" else detect_dataset_type(root)
    examples = _instance_examples(cfg, root, kind)
    infos: dict[Path, ImageInfo] = {}
    if verify:
        examples, infos = check_images(examples, cfg.on_bad_image)
    class_examples: list[Example] = []
    if cfg.with_prior_preservation:
        class_dir = Path(cfg.class_data_dir).expanduser()
        if not class_dir.is_dir():
            raise DatasetError(f"class_data_dir {class_dir} does not exist yet; trainer.preparation.prepare generates "
                               "the class images into it (python -m trainer and sweeps call it before training)")
        class_examples = load_image_folder_flat(class_dir, cfg.class_prompt, 1, "class")[: cfg.num_class_images]
        listed = len(class_examples)
        if verify:
            class_examples, class_infos = check_images(class_examples, cfg.on_bad_image)
            infos.update(class_infos)
        if not class_examples:
            raise DatasetError(f"class_data_dir {class_dir} holds no usable class images ({listed} unreadable); "
                               "remove them and the trainer generates new ones with the base model" if listed else
                               f"class_data_dir {class_dir} holds no class images yet; trainer.preparation.prepare "
                               "generates them (python -m trainer and sweeps call it before training)")
    if not examples:
        raise DatasetError(f"dataset {root}: every image was skipped as unreadable")
    validation: list[Example] = []
    if cfg.validation_fraction > 0:
        # After the checks, so that a skipped image is never held out; `infos` keeps the held-out
        # images' sizes (the caches hold them too).
        examples, validation = split_validation(examples, cfg.validation_fraction, root)
    elif cfg.validation_dir:
        validation, validation_infos = _validation_dir_examples(cfg, verify)
        infos.update(validation_infos)
    return TrainData(kind, root, examples, class_examples, infos, data_settings(cfg), validation)


def dataset_summary(data: TrainData) -> dict:
    """kohya's `ss_dataset_dirs` ({dir: {n_repeats, img_count}}) and `ss_tag_frequency` ({dir:
    {tag: images carrying it}}) of the instance examples, as {"dirs": ..., "tag_frequency": ...}.
    A kohya dataset has one dir per `<repeats>_<name>/` folder; other layouts one, the dataset's."""
    groups: dict[str, list[Example]] = {}
    for e in data.examples:
        name = e.image_path.parent.name if data.kind == "kohya" else data.root.name
        groups.setdefault(name, []).append(e)
    dirs, tags = {}, {}
    for name in sorted(groups):
        captions = {e.image_path: e.caption for e in groups[name]}  # one per image, repeats collapsed
        dirs[name] = {"n_repeats": len(groups[name]) // len(captions), "img_count": len(captions)}
        counts = Counter(t.strip() for c in captions.values() for t in set(c.split(",")) if t.strip())
        tags[name] = dict(sorted(counts.items()))
    return {"dirs": dirs, "tag_frequency": tags}
