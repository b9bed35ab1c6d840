"""The dataset layouts the trainer reads, each to a list of (image, caption) examples.

- kohya: `<root>/<repeats>_<class tokens>/` folders of images with `.txt` (else `.caption`)
  captions beside them; a missing or empty caption falls back to the folder's class tokens, as
  kohya sd-scripts does;
- imagefolder: images under `<root>` and `metadata.jsonl` (`file_name`, `text`), as Hugging
  Face datasets reads it;
- dreambooth: images directly in an instance folder, all captioned with one instance prompt
  (and a class folder, likewise, for prior preservation).

Readers only list files; opening and checking the images is `trainer.images.check_images`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from common.image_files import IMAGE_EXTENSIONS, images_in

log = logging.getLogger(__name__)
METADATA_FILE = "metadata.jsonl"
CAPTION_EXTENSIONS = (".txt", ".caption")
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")  # `<repeats>_<class tokens>`


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the path and the fix."""


@dataclass(frozen=True)
class Example:
    image_path: Path
    caption: str


def report_bad(message: str, on_bad: str) -> None:
    """Bad data (an unreadable image, a missing caption): fail, or skip it with a warning."""
    if on_bad == "fail":
        raise DatasetError(message + " (or set on_bad_image: skip)")
    log.warning("skipping: %s", message)


def read_caption(image: Path) -> str | None:
    """The text of the image's caption file (`.txt`, else `.caption`); None when there is none
    or it is empty or only whitespace, so that callers treat both alike."""
    for ext in CAPTION_EXTENSIONS:
        path = image.with_suffix(ext)
        if path.is_file():
            return path.read_text(encoding="utf-8").strip() or None
    return None


def kohya_folders(root: Path) -> list[Path]:
    """The `<repeats>_<name>/` subfolders of `root`, sorted."""
    return sorted(d for d in root.iterdir() if d.is_dir() and KOHYA_FOLDER.match(d.name)) if root.is_dir() else []


def load_kohya_folder(root: str | Path, num_repeats: int | None = None) -> list[Example]:
    """Examples of a kohya dataset, each repeated as its folder's `<repeats>_` prefix says
    (or `num_repeats` times when given)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist; point `dataset` at a folder of `<repeats>_<name>/` subfolders")
    subdirs = kohya_folders(root)
    if not subdirs:
        raise DatasetError(
            f"dataset folder {root} has no kohya subfolders; expected e.g. `{root}/10_mytrigger myclass/` "
            "holding images and .txt captions"
        )
    examples: list[Example] = []
    for sub in subdirs:
        repeats, class_tokens = KOHYA_FOLDER.match(sub.name).groups()
        for image in images_in(sub):
            caption = read_caption(image) or class_tokens
            examples.extend([Example(image, caption)] * (num_repeats or int(repeats)))
    if not examples:
        raise DatasetError(f"dataset folder {root} has kohya subfolders but no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return examples


def _metadata_captions(meta: Path) -> dict[str, str]:
    captions: dict[str, str] = {}
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[str(row["file_name"])] = str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DatasetError(f"{meta}:{n}: expected a JSON object with file_name and text ({err!r})") from None
    return captions


def load_imagefolder(root: str | Path, num_repeats: int = 1, on_bad_image: str = "fail") -> list[Example]:
    """Examples from `root/metadata.jsonl`: one JSON object per line with `file_name` and `text`."""
    root = Path(root)
    meta = root / METADATA_FILE
    if not meta.is_file():
        raise DatasetError(f"{meta} does not exist; an imagefolder dataset needs one line per image: "
                           '{"file_name": "a.png", "text": "its caption"}')
    captions = _metadata_captions(meta)
    examples = []
    for name, text in captions.items():
        if not (root / name).is_file():
            report_bad(f"{meta}: file_name {name!r} does not exist in {root}", on_bad_image)
            continue
        if not text.strip():  # an imagefolder has no class tokens to fall back on
            report_bad(f"{meta}: the caption of {name!r} is empty; write one", on_bad_image)
            continue
        examples += [Example(root / name, text.strip())] * num_repeats
    listed = {(root / n).resolve() for n in captions}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.resolve() not in listed:
            report_bad(f"image {p} has no caption: add a line for it to {meta}", on_bad_image)
    if not examples:
        raise DatasetError(f"{meta} lists no usable images")
    return examples


def load_image_folder_flat(root: Path, prompt: str, num_repeats: int, what: str) -> list[Example]:
    """Every image directly in `root`, each captioned `prompt` (DreamBooth instance or class folder)."""
    if not root.is_dir():
        raise DatasetError(f"{what} folder {root} does not exist")
    return [Example(p, prompt) for p in images_in(root) for _ in range(num_repeats)]


def detect_dataset_type(root: Path) -> str:
    """imagefolder if metadata.jsonl is there, kohya if `<n>_<name>/` subfolders, else dreambooth."""
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist; point `dataset` at an existing folder")
    if (root / METADATA_FILE).is_file():
        return "imagefolder"
    if kohya_folders(root):
        return "kohya"
    if images_in(root):
        return "dreambooth"
    unprefixed = sorted(d.name for d in root.iterdir() if d.is_dir() and images_in(d))
    if unprefixed:
        raise DatasetError(
            f"dataset folder {root}: subfolder {unprefixed[0]!r} holds images but its name lacks kohya's "
            f"`<repeats>_` prefix; rename it, e.g. to `10_{unprefixed[0]}` (10 repeats per epoch)"
        )
    raise DatasetError(
        f"dataset folder {root} has no {METADATA_FILE}, no kohya `<repeats>_<name>/` subfolders and no images; "
        "see dataset_type for the supported layouts"
    )
