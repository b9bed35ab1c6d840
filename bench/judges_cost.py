"""The optional judges' cost per evaluation, at the real models' sizes (random weights: no download).

    .venv/bin/python bench/judges_cost.py [--repeats 5] [--threads 1]

DINO: a ViT-S/16 at 224 px (facebook/dino-vits16's shape) saved as a local Hugging Face folder and
loaded through evaluator.dino.DinoEmbedder; it embeds one evaluation's concept images (24, the demo
suite's count) at 64 px upscaled, as a sweep does. Aesthetic: the improved-aesthetic-predictor MLP
(768 -> 1024 -> 128 -> 64 -> 16 -> 1) through evaluator.aesthetic.AestheticHead on 33 CLIP
embeddings (the demo's prompt-kind images). Median of the repeats, milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import ViTConfig, ViTModel

from evaluator.aesthetic import AestheticHead, build_head
from evaluator.dino import DinoEmbedder


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "dino-vits16"
        cfg = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                        image_size=224, patch_size=16)
        ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)
        dino = DinoEmbedder.load(folder)
        images = np.random.default_rng(0).integers(0, 256, (24, 64, 64, 3), dtype=np.uint8)
        dino_ms = median_ms(lambda: dino.embed_images(images), a.repeats)
        head_file = Path(tmp) / "head.safetensors"
        save_file(build_head("mlp", 768).state_dict(), head_file)
        head = AestheticHead.load(head_file, clip_width=768)
        emb = torch.nn.functional.normalize(torch.randn(33, 768), dim=-1)
        head_ms = median_ms(lambda: head(emb), a.repeats)
    print(f"dino_i: embed 24 concept images with a ViT-S/16 at 224 px: {dino_ms:.0f} ms per evaluation")
    print(f"aesthetic: MLP head on 33 CLIP embeddings (768-d): {head_ms:.2f} ms per evaluation")


if __name__ == "__main__":
    main()
