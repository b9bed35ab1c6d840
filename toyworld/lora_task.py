"""The toy world's LoRA task: pictures of the held-out colour, captioned with a trigger word.

`write_lora_dataset` lays them out as a kohya folder (`<repeats>_<trigger> shape/` with .txt
captions), an `imagefolder` (`metadata.jsonl`) or a DreamBooth instance folder (one instance
prompt for all images) with a class folder of known-colour shapes. The prompt suite a sweep on
this world is judged on is `examples/suites/toy_world.yaml`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from toyworld.oracle import oracle_metrics
from toyworld.world import BACKGROUNDS, HELD_OUT_COLOR, KNOWN_COLORS, SHAPES, caption, draw, random_scene

TRIGGER = "lswsks"
CLASS_WORD = "shape"
LAYOUTS = ("kohya", "imagefolder", "dreambooth")
_COMPLETE = ".complete"


def concept_caption(shape: str, trigger: str = TRIGGER, background: str | None = None) -> str:
    """`a lswsks circle` (on a ... background): the held-out colour's word is the trigger."""
    return caption(trigger, shape, background)


def concept_images(count: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """`count` pictures of the held-out colour, shapes and backgrounds cycling, and captions
    naming the shape (and, for every other picture, the background)."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    backgrounds = list(BACKGROUNDS)
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        bg = backgrounds[(i // len(SHAPES)) % len(backgrounds)]
        images.append(draw(rng, random_scene(rng, HELD_OUT_COLOR, shape, bg)))
        captions.append(concept_caption(shape, background=bg if i % 2 else None))
    return images, captions


def prior_images(count: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """`count` pictures of the known colours with their own captions (`a red circle`): kept in the
    LoRA's data so that it learns what the trigger word changes, not "everything is cyan"."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for i in range(count):
        color, shape = KNOWN_COLORS[i % len(KNOWN_COLORS)], SHAPES[(i // len(KNOWN_COLORS)) % len(SHAPES)]
        scene = random_scene(rng, color, shape)
        images.append(draw(rng, scene))
        captions.append(caption(color, shape, scene.background if i % 2 else None))
    return images, captions


def write_lora_dataset(folder: str | Path, layout: str = "kohya", count: int = 18, repeats: int = 5,
                       seed: int = 0, class_count: int = 12, prior_count: int = 15, prior_repeats: int = 2) -> Path:
    """Write the task's dataset to `folder` once (atomically: concurrent callers see all or none).

    kohya: `<folder>/<repeats>_lswsks shape/img_000.png` + `.txt`; imagefolder: images and
    `metadata.jsonl`; dreambooth: `<folder>/instance/` (prompt `a lswsks shape`) and
    `<folder>/class/` (known-colour shapes, prompt `a shape`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")
    folder = Path(folder)
    if (folder / _COMPLETE).exists():
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    images, captions = concept_images(count, seed)
    if layout == "kohya":
        sub = tmp / f"{repeats}_{TRIGGER} {CLASS_WORD}"
        sub.mkdir(parents=True)
        for i, (im, text) in enumerate(zip(images, captions)):
            Image.fromarray(im).save(sub / f"img_{i:03d}.png")
            (sub / f"img_{i:03d}.txt").write_text(text + "\n")
        if prior_count:
            known = tmp / f"{prior_repeats}_{CLASS_WORD}"
            known.mkdir()
            for i, (im, text) in enumerate(zip(*prior_images(prior_count, seed + 2))):
                Image.fromarray(im).save(known / f"prior_{i:03d}.png")
                (known / f"prior_{i:03d}.txt").write_text(text + "\n")
    elif layout == "imagefolder":
        tmp.mkdir(parents=True)
        lines = []
        for i, (im, text) in enumerate(zip(images, captions)):
            Image.fromarray(im).save(tmp / f"img_{i:03d}.png")
            lines.append(json.dumps({"file_name": f"img_{i:03d}.png", "text": text}))
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    else:
        (tmp / "instance").mkdir(parents=True)
        (tmp / "class").mkdir()
        for i, im in enumerate(images):
            Image.fromarray(im).save(tmp / "instance" / f"img_{i:03d}.png")
        rng = np.random.default_rng(seed + 1)
        for i in range(class_count):
            color = KNOWN_COLORS[i % len(KNOWN_COLORS)]
            scene = random_scene(rng, color, SHAPES[i % len(SHAPES)])
            Image.fromarray(draw(rng, scene)).save(tmp / "class" / f"class_{i:03d}.png")
    (tmp / _COMPLETE).touch()
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# Seeds no sweep of the demo samples (examples/suites/demo.yaml uses 0-3): for judging a LoRA on
# its held-out behaviour.
HELD_OUT_SEEDS = tuple(range(500, 508))


def judge_prompts(seeds: tuple[int, ...] = HELD_OUT_SEEDS, trigger: str = TRIGGER) -> tuple[list[str], list[int]]:
    """(prompts, seeds) that judge a LoRA with the oracle: the trigger word with every shape
    (concept_accuracy) and 8 of the 15 known colour-shape classes (prior_accuracy), each seed."""
    concept = [concept_caption(s, trigger) for s in SHAPES]
    prior = [caption(c, s) for c in KNOWN_COLORS for s in SHAPES][::2]
    pairs = [(p, s) for p in concept + prior for s in seeds]
    return [p for p, _ in pairs], [s for _, s in pairs]


# What `heldout_scores` reports: the oracle on prompts and seeds that no sweep evaluates on.
HELDOUT_METRICS = ("heldout_concept_accuracy", "heldout_prior_accuracy", "heldout_score")


def heldout_scores(sample: Callable[[list[str], list[int]], np.ndarray], trigger: str = TRIGGER,
                   seeds: tuple[int, ...] = HELD_OUT_SEEDS) -> dict[str, float]:
    """The exact oracle on `judge_prompts` (held-out seeds): `sample(prompts, seeds)` draws them.

    heldout_score is the mean of the concept and prior accuracies: a LoRA must both bring the new
    colour with the trigger word and keep the known colours without it (the base model scores
    about 0.4, drawing no concept; a LoRA that paints everything cyan scores about 0.5).
    """
    prompts, seeds = judge_prompts(seeds, trigger)
    m = oracle_metrics(sample(prompts, seeds), prompts, trigger)
    concept, prior = m["concept_accuracy"], m["prior_accuracy"]
    return {"heldout_concept_accuracy": concept, "heldout_prior_accuracy": prior,
            "heldout_score": (concept + prior) / 2}
