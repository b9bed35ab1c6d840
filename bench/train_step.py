"""Steady-state LoRA training step: shared caches vs encoding every step (diffusers-script style).

(a) cached:   latent moments and text embeddings come from trainer.cache (built once, as a sweep does);
(b) per-step: as diffusers' train_text_to_image_lora.py does it: every step loads and transforms
              the images, encodes them with the VAE and the captions with the text encoder.
Same config, same seed, same trainer code otherwise. Each (mode, repeat) runs in its own process
(for its own peak RSS); modes alternate per repeat so machine noise hits both alike.

    .venv/bin/python bench/train_step.py [--resolution 128] [--batch 4] [--steps 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = {"cached": dict(cache_latents=True, cache_text_embeddings=True),
         "per_step": dict(cache_latents=False, cache_text_embeddings=False)}


def run_child(args) -> dict:
    """One mode: set up (caches built outside the timing), warm up, time `steps` steps."""
    import torch

    torch.set_num_threads(args.threads)
    from trainer.cache import build_caches
    from trainer.config import build_train_config
    from trainer.loop import LoraTrainer
    from trainer.tiny import ensure_tiny_sd

    cfg = build_train_config(dict(
        base_model=str(ensure_tiny_sd()), dataset="builtin:demo", resolution=args.resolution,
        train_batch_size=args.batch, max_train_steps=args.warmup + args.steps, learning_rate=1e-4,
        seed=0, cache_dir=args.cache_dir, **MODES[args.mode],
    ))
    if args.mode == "cached":
        build_caches(cfg, device="cpu")  # once per sweep, before trials: not part of a step
    trainer = LoraTrainer(cfg)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train(args.warmup)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        trainer.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "mode": args.mode,
        "step_s": times,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=128, help="training side in px (tiny VAE: 64 is too cheap to show)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", choices=sorted(MODES), help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(run_child(args)))
        return
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as cache_dir:
        for r in range(args.repeats):
            for mode in MODES:
                cmd = [sys.executable, __file__, "--mode", mode, "--cache-dir", cache_dir] + [
                    f"--{k}={getattr(args, k)}" for k in ("resolution", "batch", "steps", "warmup", "threads")]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
                results[mode].append(json.loads(out.strip().splitlines()[-1]))
                print(f"repeat {r} {mode}: median step {statistics.median(results[mode][-1]['step_s']):.3f} s", flush=True)
    report(results, args)


def report(results: dict[str, list[dict]], args) -> None:
    med = {m: statistics.median(statistics.median(x["step_s"]) for x in runs) for m, runs in results.items()}
    rss = {m: max(x["peak_rss_mib"] for x in runs) for m, runs in results.items()}
    print(f"resolution {args.resolution}px, batch {args.batch}, {args.steps} timed steps x {args.repeats} repeats per mode")
    for m in MODES:
        cuda = results[m][0]["cuda_peak_mib"]
        extra = f", CUDA peak {cuda:.0f} MiB" if cuda is not None else ""
        print(f"  {m:9s} median step {med[m] * 1000:8.1f} ms   peak RSS {rss[m]:7.0f} MiB{extra}")
    print(f"  ratio cached / per_step = {med['cached'] / med['per_step']:.3f} (target <= 0.7)")


if __name__ == "__main__":
    main()
