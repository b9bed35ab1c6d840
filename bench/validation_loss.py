"""Cost of val_loss: LoraTrainer.validation_loss() beside one training step, on the tiny model.

Both timed in one process, alternating, so a shared machine's speed swings hit both alike. The
first val_loss call (which builds its fixed latents and noise once) is reported apart.

    .venv/bin/python bench/validation_loss.py [--resolution 64] [--batch 4] [--timesteps 4] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--timesteps", type=int, default=4, help="validation_timesteps")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    from trainer.config import build_train_config
    from trainer.loop import LoraTrainer
    from trainer.tiny import ensure_tiny_sd

    torch.set_num_threads(args.threads)
    cfg = build_train_config(dict(
        base_model=str(ensure_tiny_sd()), dataset="builtin:demo", resolution=args.resolution,
        train_batch_size=args.batch, max_train_steps=10 * args.repeats + 10, learning_rate=1e-4, seed=0,
        validation_timesteps=args.timesteps))
    trainer = LoraTrainer.build(cfg)
    trainer.train(2)  # warm up
    start = time.perf_counter()
    trainer.validation_loss()
    first = time.perf_counter() - start
    val, step = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        trainer.step()
        step.append(time.perf_counter() - start)
        start = time.perf_counter()
        trainer.validation_loss()
        val.append(time.perf_counter() - start)
    n_images = len(trainer.data.validation_set())
    v, s = statistics.median(val), statistics.median(step)
    print(f"tiny model, {args.resolution}px, batch {args.batch}, {n_images} validation images x {args.timesteps} "
          f"timesteps, {args.threads} threads, {args.repeats} repeats")
    print(f"  validation_loss() median {v * 1000:.1f} ms (min {min(val) * 1000:.1f}; first call {first * 1000:.1f} ms)")
    print(f"  training step     median {s * 1000:.1f} ms (min {min(step) * 1000:.1f})")
    print(f"  ratio val_loss / step: {v / s:.2f} (= {n_images * args.timesteps} UNet forwards vs "
          f"{args.batch} images forward + backward)")


if __name__ == "__main__":
    main()
