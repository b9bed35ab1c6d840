"""Pictures of a sweep's samples: each evaluation's grid, and the labelled comparison of the base
model, the winner and the worst trial on the same prompts and seeds (`best_samples.png`)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLUMNS = 4  # images per row of an evaluation's grid (samples.png)
_LABEL_W, _HEADER_LINES, _LINE_H, _PAD = 190, 4, 11, 4


def save_grid(images: np.ndarray, path: Path | BinaryIO, columns: int = COLUMNS, **save_options) -> None:
    """The eval samples (uint8 NHWC) side by side, `columns` per row, for people to look at.
    `save_options` go to PIL's Image.save (a file object needs `format=`)."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * h, min(n, columns) * w, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = im
    Image.fromarray(grid).save(path, **save_options)


def read_grid(path: Path | BinaryIO, count: int, columns: int = COLUMNS) -> np.ndarray:
    """The `count` images of a grid that `save_grid` wrote (PNG is lossless: they are exact)."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    rows, cols = -(-count // columns), min(count, columns)
    h, w = grid.shape[0] // rows, grid.shape[1] // cols
    return np.stack([grid[(i // columns) * h:(i // columns + 1) * h, (i % columns) * w:(i % columns + 1) * w]
                     for i in range(count)])


def pick_columns(prompts: list[str], seeds: list[int], per_prompt: int = 2) -> list[int]:
    """Indices of the first `per_prompt` seeds of each distinct prompt, in order."""
    taken: dict[str, int] = {}
    seen, out = set(), []
    for i, pair in enumerate(zip(prompts, seeds)):
        if taken.get(pair[0], 0) < per_prompt and pair not in seen:
            taken[pair[0]] = taken.get(pair[0], 0) + 1
            seen.add(pair)
            out.append(i)
    return out


def labelled_rows(rows: list[tuple[str, np.ndarray]], prompts: list[str], seeds: list[int],
                  per_prompt: int = 2, scale: int = 2) -> Image.Image:
    """One labelled row per (label, images) pair; images are one per (prompt, seed), the same
    prompts and seeds for every row. Columns: the first `per_prompt` seeds of each prompt, under
    a header naming the prompt and seed; images enlarged `scale` times (nearest, no blur)."""
    cols = pick_columns(prompts, seeds, per_prompt)
    h, w = rows[0][1].shape[1] * scale, rows[0][1].shape[2] * scale
    header = _HEADER_LINES * _LINE_H + _PAD
    canvas = Image.new("RGB", (_LABEL_W + len(cols) * w, header + len(rows) * (h + _PAD)), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    chars = max(8, w // 6)
    for k, i in enumerate(cols):
        text = textwrap.wrap(f"{prompts[i]} | seed {seeds[i]}", chars)[:_HEADER_LINES]
        draw.multiline_text((_LABEL_W + k * w + 2, 2), "\n".join(text), fill="black", font=font, spacing=1)
    for r, (label, images) in enumerate(rows):
        if len(images) != len(prompts):
            raise ValueError(f"row {label!r}: {len(images)} images for {len(prompts)} prompts")
        y = header + r * (h + _PAD)
        lines = textwrap.wrap(label, 30)[: h // _LINE_H]
        draw.multiline_text((4, y + 2), "\n".join(lines), fill="black", font=font, spacing=1)
        for k, i in enumerate(cols):
            tile = Image.fromarray(images[i]).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (_LABEL_W + k * w, y))
    return canvas
