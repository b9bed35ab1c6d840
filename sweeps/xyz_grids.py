"""XYZ plots of a sweep's images, as AUTOMATIC1111's X/Y/Z plot draws them: a labelled grid whose
columns and rows are values (two parameters, training steps, seeds, the trigger word on and off,
LoRA strength), each cell one image of one prompt at one seed.

`Grid` holds the cells and their labels; the builders below make each kind of grid from images
already in memory (sweeps.report_data finds them in the sweep's storage; sweeps.xyz_sampling
samples what no trial saved). Drawing is PIL, like sweeps.sample_grids: these are pictures of
pictures, not plots.
"""

from __future__ import annotations

import bisect
import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from evaluator.suites import CONCEPT_KINDS

TILE = 128  # px per cell: small images are enlarged (nearest), large ones reduced (area)
ROW_ITEMS = 5  # (prompt, seed) rows of the steps and strength grids
_LABEL_W, _PAD, _LINE_H, _FONT = 170, 4, 13, 11
EMPTY = (225, 225, 225)


@dataclass
class Grid:
    """Cells in rows x columns (None: no image for that cell), labelled along both axes."""

    title: str
    x_name: str
    y_name: str
    columns: list[str]
    rows: list[str]
    cells: list[list[np.ndarray | None]]
    captions: list[list[str]] | None = None  # a short line under each cell (which trial, its score)
    note: str = ""  # how the cells were chosen
    meta: dict = field(default_factory=dict)  # what the tests and the page read back (trial ids, steps)

    def image(self, tile: int = TILE) -> Image.Image:
        return draw_grid(self, tile)


def draw_grid(grid: Grid, tile: int = TILE) -> Image.Image:
    font, small = ImageFont.load_default(_FONT + 2), ImageFont.load_default(_FONT)
    chars = max(10, tile // 6)
    col_text = [textwrap.wrap(c, chars)[:3] or [""] for c in grid.columns]
    header_h = _LINE_H * (2 + max((len(t) for t in col_text), default=1)) + _PAD
    caption_h = _LINE_H if grid.captions else 0
    cell_h = tile + caption_h + _PAD
    width = _LABEL_W + max(1, len(grid.columns)) * (tile + _PAD)
    canvas = Image.new("RGB", (width, header_h + len(grid.rows) * cell_h + _PAD), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), grid.title, fill="black", font=font)
    draw.text((4, 2 + _LINE_H + 2), f"x: {grid.x_name}   y: {grid.y_name}", fill=(80, 80, 80), font=small)
    for k, lines in enumerate(col_text):
        x = _LABEL_W + k * (tile + _PAD)
        draw.multiline_text((x + 2, 2 * _LINE_H + 6), "\n".join(lines), fill="black", font=small, spacing=1)
    for r, label in enumerate(grid.rows):
        y = header_h + r * cell_h
        lines = textwrap.wrap(label, 26)[: max(1, tile // _LINE_H)]
        draw.multiline_text((4, y + 2), "\n".join(lines), fill="black", font=small, spacing=1)
        for k, cell in enumerate(grid.cells[r]):
            x = _LABEL_W + k * (tile + _PAD)
            if cell is None:
                draw.rectangle([x, y, x + tile - 1, y + tile - 1], fill=EMPTY)
                draw.text((x + tile // 2 - 12, y + tile // 2 - 6), "none", fill=(120, 120, 120), font=small)
            else:
                canvas.paste(_fit(cell, tile), (x, y))
            if grid.captions and grid.captions[r][k]:
                draw.text((x + 1, y + tile + 1), grid.captions[r][k][: tile // 6], fill=(60, 60, 60), font=small)
    return canvas


def _fit(image: np.ndarray, tile: int) -> Image.Image:
    im = Image.fromarray(image)
    h, w = image.shape[:2]
    scale = tile / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return im.resize(size, Image.NEAREST if scale >= 1 else Image.BOX)


# --- which (prompt, seed) items a grid shows ---------------------------------------------------
def pick_items(prompts: Sequence[str], seeds: Sequence[int], kinds: Sequence[str] | None = None,
               limit: int = ROW_ITEMS) -> list[int]:
    """Indices of the items a small grid shows: the first seed of each distinct prompt that should
    show the concept, then the first prompt without it (the prior), at most `limit`."""
    first: dict[str, int] = {}
    for i, p in enumerate(prompts):
        first.setdefault(p, i)
    order = list(first.values())
    if kinds is None:
        return order[:limit]
    concept = [i for i in order if kinds[i] in CONCEPT_KINDS]
    prior = [i for i in order if kinds[i] == "no_concept"][:1]
    picked = concept[: max(1, limit - len(prior))] + prior
    return picked or order[:limit]


def _item_label(prompts, seeds, i) -> str:
    return f"{prompts[i]} | seed {seeds[i]}"


# --- the builders ------------------------------------------------------------------------------
def prompt_seed_grid(images: np.ndarray, prompts: Sequence[str], seeds: Sequence[int], title: str,
                     max_rows: int = 12) -> Grid:
    """Prompts as rows, seeds as columns: one evaluation's images (W&B's grid, the seeds grid)."""
    row_prompts = list(dict.fromkeys(prompts))[:max_rows]
    col_seeds = list(dict.fromkeys(seeds))
    index = {}
    for i, pair in enumerate(zip(prompts, seeds)):
        index.setdefault(pair, i)
    cells = [[images[index[(p, s)]] if (p, s) in index else None for s in col_seeds] for p in row_prompts]
    return Grid(title, "seed", "prompt", [f"seed {s}" for s in col_seeds], row_prompts, cells,
                meta={"seeds": col_seeds, "prompts": row_prompts})


def steps_grid(by_step: dict[int, np.ndarray], prompts: Sequence[str], seeds: Sequence[int], picked: list[int],
               title: str, note: str = "") -> Grid:
    """Training steps as columns (every kept evaluation of one trial), chosen items as rows."""
    steps = sorted(by_step)
    cells = [[by_step[s][i] for s in steps] for i in picked]
    return Grid(title, "training step", "prompt | seed", [f"step {s}" for s in steps],
                [_item_label(prompts, seeds, i) for i in picked], cells, note=note, meta={"steps": steps})


def trigger_grid(images: np.ndarray, prompts: Sequence[str], seeds: Sequence[int], kinds: Sequence[str],
                 trigger: str | None, title: str) -> Grid | None:
    """The trigger-word test: each trigger_test template at each seed, with and without the word.
    The suite pairs the j-th trigger_on item with the j-th trigger_off one (evaluator.suites)."""
    on = [i for i, k in enumerate(kinds) if k == "trigger_on"]
    off = [i for i, k in enumerate(kinds) if k == "trigger_off"]
    if not on or len(on) != len(off):
        return None
    word = trigger or "trigger"
    cells = [[images[a], images[b]] for a, b in zip(on, off)]
    rows = [f"{prompts[a]} | seed {seeds[a]}" for a in on]
    return Grid(title, "trigger word", "prompt | seed", [f"with '{word}'", f"without '{word}'"], rows, cells,
                meta={"pairs": list(zip(on, off))})


def strength_grid(by_strength: dict[float, np.ndarray], prompts: Sequence[str], seeds: Sequence[int],
                  title: str) -> Grid:
    """LoRA strength as columns (what a UI's `<lora:name:w>` gives), items as rows."""
    weights = sorted(by_strength)
    cells = [[by_strength[w][i] for w in weights] for i in range(len(prompts))]
    return Grid(title, "LoRA strength", "prompt | seed", [f"strength {w:g}" for w in weights],
                [_item_label(prompts, seeds, i) for i in range(len(prompts))], cells, meta={"strengths": weights})


# --- two parameters against each other ---------------------------------------------------------
@dataclass
class Axis:
    """One grid axis over a parameter: its columns' labels and which column a value falls in."""

    name: str
    labels: list[str]
    edges: list[float] | None = None  # bins of a numeric parameter (len(labels) + 1 edges)
    values: list | None = None  # one column per value otherwise

    def index(self, value) -> int | None:
        if self.values is not None:
            return self.values.index(value) if value in self.values else None
        if not isinstance(value, (int, float)) or not self.edges[0] <= value <= self.edges[-1]:
            return None
        return min(bisect.bisect_right(self.edges, value) - 1, len(self.labels) - 1)


def make_axis(name: str, values: Sequence, log: bool = False, max_bins: int = 5, choice: bool = False) -> Axis:
    """Each value its own column when the parameter is a choice or has at most `max_bins` values
    (few ints), else `max_bins` equal bins (log-spaced for log-scaled parameters) over the values seen."""
    seen = [v for v in values if v is not None]
    distinct = sorted(set(seen), key=_sort_key)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct)
    if choice or len(distinct) <= max_bins or not numeric:
        return Axis(name, [_short(v) for v in distinct], values=distinct)
    low, high = min(distinct), max(distinct)
    log = log and low > 0
    edges = list(np.geomspace(low, high, max_bins + 1) if log else np.linspace(low, high, max_bins + 1))
    labels = [f"{_short(a)}..{_short(b)}" for a, b in zip(edges, edges[1:])]
    return Axis(name, labels, edges=edges)


def param_grid(trials: list[tuple[str, dict, float | None]], x: Axis, y: Axis | None, metric: str, mode: str,
               prompt: str, seed: int, image_of: Callable[[str], np.ndarray | None]) -> Grid:
    """`trials`: (trial id, params, value of `metric`) each. Each cell shows the best trial whose
    params fall in it: `image_of(trial id)` is its image of `prompt` at `seed` (read only for those)."""
    sign = -1 if mode == "max" else 1
    rows = y.labels if y is not None else ["all"]
    best: dict[tuple[int, int], tuple[str, float]] = {}
    for tid, params, value in trials:
        kx = x.index(params.get(x.name))
        ky = y.index(params.get(y.name)) if y is not None else 0
        if kx is None or ky is None or value is None or not math.isfinite(value):
            continue
        held = best.get((ky, kx))
        if held is None or sign * value < sign * held[1]:
            best[(ky, kx)] = (tid, value)
    shape = [(r, c) for r in range(len(rows)) for c in range(len(x.labels))]
    images = {rc: image_of(best[rc][0]) for rc in shape if rc in best}
    cells = [[images.get((r, c)) for c in range(len(x.labels))] for r in range(len(rows))]
    captions = [[f"{best[(r, c)][0]} {best[(r, c)][1]:.3g}" if (r, c) in best else "" for c in range(len(x.labels))]
                for r in range(len(rows))]
    y_name = y.name if y is not None else "-"
    return Grid(f"{x.name} x {y_name}: '{prompt}', seed {seed}", x.name, y_name, x.labels, rows, cells, captions,
                note=f"each cell: the trial with the best {metric} among those whose parameters fall in it",
                meta={"cells": {rc: tid for rc, (tid, _) in best.items()}})


def _sort_key(v):
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
