"""Which files are images: the one list of extensions that datasets, class folders and the
evaluator's folder scoring accept."""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def images_in(folder: str | Path) -> list[Path]:
    """Image files directly in `folder` (not below it), sorted by name; [] when it is no folder."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if is_image_file(p)) if folder.is_dir() else []
