"""Resume-checkpoint size and save/load time per training method on the tiny model, and SD 1.5's by
arithmetic from its parameter counts (BENCHMARKS.md, "Full fine-tune checkpoints").

    .venv/bin/python bench/checkpoint_size.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.config import build_train_config
from trainer.loop import LoraTrainer
from trainer.tiny import ensure_tiny_sd
from trainer.train_data import resolve_dataset

VARIANTS = {
    "lora rank 4": {},
    "full": {"method": "full"},
    "full + EMA": {"method": "full", "use_ema": True},
    "full + EMA + text encoder": {"method": "full", "use_ema": True, "train_text_encoder": True},
}
# SD 1.5's parameters (v1-5-pruned-emaonly): UNet, CLIP ViT-L/14 text encoder.
SD15 = {"unet": 859_520_964, "text_encoder": 123_060_480}
BYTES_PER_TRAINED = {"full": 12, "full + EMA": 16, "full + EMA + text encoder": 16}  # fp32 weight + 2 moments (+ EMA)


def measure(repeats: int) -> None:
    base = dict(base_model=str(ensure_tiny_sd()), dataset=str(resolve_dataset("builtin:demo")), resolution=64,
                train_batch_size=2, max_train_steps=2)
    for name, over in VARIANTS.items():
        trainer = LoraTrainer.build(build_train_config({**base, **over}), device="cpu")
        trainer.train(1)
        with tempfile.TemporaryDirectory() as folder:
            saves, loads = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                save_checkpoint(trainer, folder)
                saves.append(time.perf_counter() - start)
                start = time.perf_counter()
                load_checkpoint(trainer, folder)
                loads.append(time.perf_counter() - start)
            size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        trained = sum(p.numel() for p in trainer.params)
        print(f"{name}: {trained} trained parameters, {size / 1e6:.2f} MB, save {min(saves):.3f} s, "
              f"load {min(loads):.3f} s (min of {repeats}); {size / min(saves) / 1e6:.0f} MB/s saved")
    for name, per in BYTES_PER_TRAINED.items():
        params = SD15["unet"] + (SD15["text_encoder"] if "text encoder" in name else 0)
        print(f"SD 1.5 {name}: {params * per / 1e9:.2f} GB ({params} x {per} bytes)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    torch.set_num_threads(1)
    measure(parser.parse_args().repeats)
