"""Train the built-in tiny CLIP judge on the whole toy world and write the shipped weights.

    python -m pretrain.tiny_clip --out evaluator/weights      # ~5 CPU-minutes

Writes `tiny-clip.safetensors` (fp16) and `tiny-clip.json` (recipe, sha256, zero-shot accuracy
on freshly drawn pictures of every class). The recipe itself lives in `evaluator/tiny.py`, which
can also build the same model on first use when no shipped file matches its recipe.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from evaluator import tiny
from toyworld.world import all_classes, caption, render_world


def zero_shot_accuracy(state: dict, n: int = 1800, seed: int = 777) -> tuple[float, dict]:
    """Fraction of drawn pictures (all colours, shapes, backgrounds) whose best-scoring class
    caption is their own, overall and per class."""
    tiny.register_tiny_clip()
    model = open_clip.create_model(tiny.TINY_CLIP_NAME, pretrained=None)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.eval()
    images, _, scenes = render_world(n, seed, background_in_caption=0.0)
    classes = all_classes()
    tokens = open_clip.get_tokenizer(tiny.TINY_CLIP_NAME)([caption(*c) for c in classes])
    with torch.no_grad():
        img = model.encode_image(tiny._normalize(images), normalize=True)
        txt = model.encode_text(tokens, normalize=True)
    pred = (img @ txt.T).argmax(1)
    truth = torch.tensor([classes.index((s.color, s.shape)) for s in scenes])
    per_class = {caption(*c): round(float((pred[truth == i] == i).float().mean()), 3) for i, c in enumerate(classes)}
    return float((pred == truth).float().mean()), per_class


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    tiny.register_tiny_clip()
    start = time.perf_counter()
    state = tiny.build_tiny_clip_state()
    minutes = (time.perf_counter() - start) / 60
    half = {k: v.half().contiguous() for k, v in state.items()}
    acc, per_class = zero_shot_accuracy(half)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / tiny.TINY_CLIP_FILE
    save_file(half, str(path), metadata=tiny.tiny_clip_metadata())
    info = {"recipe": tiny.TINY_CLIP_RECIPE, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "train_minutes": round(minutes, 1), "threads": torch.get_num_threads(),
            "zero_shot_accuracy": round(acc, 4), "per_class": per_class}
    (args.out / "tiny-clip.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
