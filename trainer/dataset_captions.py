"""A dataset's missing captions, written by a captioner where the trainer reads them.

- kohya (`<repeats>_<name>/` subfolders): a `.txt` beside each image;
- imagefolder (`metadata.jsonl`), or a folder of images with no captions at all: one
  `{"file_name", "text"}` line per image in `metadata.jsonl` (other keys of a line are kept), so
  that the trainer then reads the folder as an imagefolder.

An image with a caption keeps it unless `overwrite` (an empty caption counts as none, as the
readers treat it). An unreadable image is reported by name and skipped; the rest go on.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from common.files import atomic_write
from common.image_files import IMAGE_EXTENSIONS, images_in
from trainer.captioning import CaptionConfig, apply_template, caption_model_problem
from trainer.config import TrainConfig
from trainer.dataset_layouts import METADATA_FILE, DatasetError, detect_dataset_type, kohya_folders, read_caption

CaptionFn = Callable[[list[Image.Image]], list[str]]


@dataclass
class CaptionReport:
    layout: str  # where the captions went: kohya (.txt files) or imagefolder (metadata.jsonl)
    written: list[Path] = field(default_factory=list)  # images captioned now
    kept: int = 0  # images that had a caption and kept it
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # (image, why), not captioned

    def summary(self) -> str:
        where = ".txt files" if self.layout == "kohya" else METADATA_FILE
        line = f"captioned {len(self.written)} image(s) into {where}; {self.kept} kept their caption"
        if self.unreadable:
            line += f"; {len(self.unreadable)} unreadable, not captioned: " + ", ".join(str(p) for p, _ in self.unreadable)
        return line


def caption_layout(root: Path) -> str:
    """kohya or imagefolder: where this dataset's captions are read from (a flat folder of images
    becomes an imagefolder)."""
    kind = detect_dataset_type(root)
    return "kohya" if kind == "kohya" else "imagefolder"


def caption_input_problems(dataset: str | Path, trigger: str | None, config: CaptionConfig) -> list[tuple[str, str]]:
    """(input, message) for what stops captioning, found without loading the model; the inputs
    are trigger, dataset and model, which each caller names as its user wrote them."""
    problems = [] if trigger and trigger.strip() else [("trigger", "empty; give the trigger word every caption carries")]
    try:
        caption_layout(Path(dataset).expanduser())
    except DatasetError as err:
        problems.append(("dataset", str(err)))
    model = caption_model_problem(config.model)
    return problems + ([("model", model)] if model else [])


def caption_settings_problems(cfg: TrainConfig, caption: CaptionConfig) -> list[tuple[str, str]]:
    """(TrainConfig field, message) for training settings that captions cannot serve: no trigger
    word for the template, or a DreamBooth dataset (captioned by its instance prompt)."""
    out = []
    if not cfg.trigger_word:
        out.append(("trigger_word", "required by caption: (the {trigger} of caption.template); set the trigger word"))
    if cfg.dataset_type == "dreambooth":
        out.append(("dataset_type", "a dreambooth dataset is captioned by instance_prompt, never by caption files; "
                                    "remove caption: or use dataset_type auto"))
    elif cfg.instance_prompt:
        out.append(("instance_prompt", "captions replace the instance prompt of a DreamBooth folder; remove "
                                       "instance_prompt to train on the written captions, or remove caption:"))
    return out


def _read_rows(meta: Path) -> list[dict]:
    rows = []
    if not meta.is_file():
        return rows
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{meta}:{n}: not a JSON object ({err}); fix or remove the line") from None
        if not isinstance(row, dict) or "file_name" not in row:
            raise DatasetError(f"{meta}:{n}: expected a JSON object with file_name (and text)")
        rows.append(row)
    return rows


def _has_text(row: dict | None) -> bool:
    return row is not None and bool(str(row.get("text") or "").strip())


def _todo(root: Path, layout: str, overwrite: bool, rows: list[dict]) -> tuple[list[Path], int]:
    """(images to caption, how many keep their caption)."""
    if layout == "kohya":
        images = [p for sub in kohya_folders(root) for p in images_in(sub)]
        keep = [] if overwrite else [p for p in images if read_caption(p) is not None]
    else:
        by_name = {str(r["file_name"]): r for r in rows}
        images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        keep = [] if overwrite else [p for p in images if _has_text(by_name.get(p.relative_to(root).as_posix()))]
    kept = set(keep)
    return [p for p in images if p not in kept], len(kept)


def caption_counts(root: str | Path, config: CaptionConfig) -> tuple[int, int]:
    """(images to caption, images keeping their caption) of the dataset at `root`; opens no image."""
    root = Path(root).expanduser()
    layout = caption_layout(root)
    todo, kept = _todo(root, layout, config.overwrite, _read_rows(root / METADATA_FILE) if layout == "imagefolder" else [])
    return len(todo), kept


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _write(root: Path, layout: str, rows: list[dict], captions: dict[Path, str]) -> None:
    if layout == "kohya":
        for image, text in captions.items():
            atomic_write(image.with_suffix(".txt"), lambda tmp, t=text: Path(tmp).write_text(t + "\n", encoding="utf-8"),
                         fsync=False)
        return
    by_name = {str(r["file_name"]): r for r in rows}
    for image, text in captions.items():
        name = image.relative_to(root).as_posix()
        if name in by_name:
            by_name[name]["text"] = text
        else:
            by_name[name] = {"file_name": name, "text": text}
            rows.append(by_name[name])
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write(root / METADATA_FILE, lambda tmp: Path(tmp).write_text(body, encoding="utf-8"), fsync=False)


def caption_dataset(root: str | Path, trigger: str, config: CaptionConfig, captioner: CaptionFn | None = None,
                    progress: bool = True) -> CaptionReport:
    """Caption the images of `root` that have no caption (all with `config.overwrite`) with BLIP
    (`config.model`, loaded only when some image needs a caption) and `config.template`; written
    after every batch, so that an interrupted run keeps what it made."""
    from tqdm import tqdm

    root = Path(root).expanduser()
    layout = caption_layout(root)
    rows = _read_rows(root / METADATA_FILE) if layout == "imagefolder" else []
    todo, kept = _todo(root, layout, config.overwrite, rows)
    report = CaptionReport(layout, kept=kept)
    if not todo:
        return report
    if captioner is None:
        from trainer.captioning import Captioner

        blip = Captioner(config.model)
        captioner = lambda images: blip.caption(images, config.max_new_tokens)
    bar = tqdm(total=len(todo), unit="image", desc="captioning", disable=not progress, file=sys.stderr)
    for first in range(0, len(todo), config.batch_size):
        batch, images = [], []
        for path in todo[first:first + config.batch_size]:
            try:
                images.append(_open_rgb(path))
                batch.append(path)
            except (OSError, ValueError) as err:  # PIL's errors for truncated, corrupt or unknown files
                report.unreadable.append((path, str(err)))
                bar.write(f"cannot read image {path}: {err}; not captioned", file=sys.stderr)
        captions = {p: apply_template(config.template, trigger, c) for p, c in zip(batch, captioner(images))} if images else {}
        _write(root, layout, rows, captions)
        report.written += list(captions)
        bar.update(len(todo[first:first + config.batch_size]))
    bar.close()
    return report
