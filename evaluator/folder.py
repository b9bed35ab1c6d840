"""Score a folder of images without Ray (what `python -m evaluator score` runs).

The prompts FILE is either
- a suite YAML (`.yaml`/`.yml`, see `evaluator.suites`): the images, in sorted file-name order,
  are the suite's expanded items in `expand_suite` order (`python -m evaluator items` lists
  them with suggested file names); every suite metric is computed;
- or a text file: one prompt per non-empty line, line i for image i in sorted file-name order;
  CLIP-T only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.image_files import IMAGE_EXTENSIONS, images_in
from evaluator.clip_model import ClipModel
from evaluator.metrics import TORCHMETRICS_SCALE, clip_t
from evaluator.score import suite_metrics
from evaluator.suites import SuiteItem, clip_texts, expand_suite, load_suite


def image_files(folder: str | Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: images folder not found")
    files = images_in(folder)
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    return files


def load_images(files: list[Path]) -> list[np.ndarray]:
    """Each file as uint8 (H, W, 3) RGB."""
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def embed_arrays(model: ClipModel, images: list[np.ndarray]) -> torch.Tensor:
    """Embed (H, W, 3) images whose sizes may differ: same-size images go through together."""
    out: list[torch.Tensor | None] = [None] * len(images)
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.shape, []).append(i)
    for idx in groups.values():
        emb = model.embed_images(np.stack([images[i] for i in idx]))
        for i, e in zip(idx, emb):
            out[i] = e
    return torch.stack(out)


def read_prompt_lines(path: str | Path) -> list[str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompts file not found")
    prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one prompt per line, for each image in sorted "
                         "file-name order)")
    return prompts


def is_suite_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".yaml", ".yml")


def score_folder(model: ClipModel, images_dir: str | Path, prompts_file: str | Path,
                 trigger: str | None = None, class_word: str | None = None,
                 base_dir: str | Path | None = None, train_dir: str | Path | None = None,
                 weights: dict | None = None, scale: float = TORCHMETRICS_SCALE) -> dict:
    """{"images": [{file, kind, prompt, seed, clip_score}], "metrics": {...}, "model": ...}.

    base_dir: the base model's images for the suite's no_concept items (sorted order);
    train_dir: the training images (for CLIP-I). Both only with a suite file.
    """
    files = image_files(images_dir)
    if is_suite_file(prompts_file):
        suite = load_suite(prompts_file)
        items = expand_suite(suite, trigger, class_word)
        texts = clip_texts(items, trigger, suite.score_with_trigger)
    else:
        if base_dir or train_dir:
            raise ValueError("--base-images and --train-images need a suite YAML as --prompts "
                             "(a plain prompt list has no no-concept prompts or concept images)")
        prompts = read_prompt_lines(prompts_file)
        items = [SuiteItem("prompt", p, -1) for p in prompts]
        texts = prompts
    if len(items) != len(files):
        what = "suite items (see `python -m evaluator items`)" if is_suite_file(prompts_file) \
            else "prompt lines"
        raise ValueError(f"{images_dir} has {len(files)} images but {prompts_file} gives "
                         f"{len(items)} {what}: need one image per prompt, in sorted file order")
    image_emb = embed_arrays(model, load_images(files))
    text_emb = model.embed_texts(texts)
    if is_suite_file(prompts_file):
        base = embed_arrays(model, load_images(image_files(base_dir))) if base_dir else None
        train = embed_arrays(model, load_images(image_files(train_dir))) if train_dir else None
        metrics = suite_metrics(items, image_emb, text_emb, base, train, weights, scale)
        per_image = metrics["per_image"]
    else:
        scores = clip_t(image_emb, text_emb, scale=scale)
        per_image = [float(s) for s in scores]
        metrics = {"clip_score": float(scores.mean()), "per_image": per_image}
    rows = [{"file": f.name, "kind": it.kind, "prompt": it.prompt,
             "seed": it.seed if it.seed >= 0 else None, "clip_score": s}
            for f, it, s in zip(files, items, per_image)]
    return {"model": model.name, "pretrained": model.pretrained, "images_dir": str(images_dir),
            "prompts_file": str(prompts_file), "images": rows, "metrics": metrics}


def format_table(result: dict) -> str:
    """The per-image scores and the summary metrics as aligned text."""
    rows = result["images"]
    fw = max(4, *(len(r["file"]) for r in rows))
    kw = max(4, *(len(r["kind"]) for r in rows))
    lines = [f"{'file':<{fw}}  {'kind':<{kw}}  {'seed':>4}  {'CLIP-T':>7}  prompt"]
    for r in rows:
        seed = "" if r["seed"] is None else str(r["seed"])
        lines.append(f"{r['file']:<{fw}}  {r['kind']:<{kw}}  {seed:>4}  "
                     f"{r['clip_score']:7.2f}  {r['prompt']}")
    lines.append("")
    for key, value in result["metrics"].items():
        if key == "per_image":
            continue
        if isinstance(value, float):
            value = f"{value:.4f}"
        lines.append(f"{key:<24} {value}")
    return "\n".join(lines)
