"""Steady-state LoRA training step: shared caches vs encoding every step (diffusers-script style).

(a) cached:   latent moments and text embeddings come from trainer.cache (built once, as a sweep does);
(b) per-step: as diffusers' train_text_to_image_lora.py does it: every step loads and transforms
              the images, encodes them with the VAE and the captions with the text encoder.
Same config, same seed, same trainer code otherwise. Each (mode, repeat) runs in its own process
(for its own peak RSS); modes alternate per repeat so machine noise hits both alike.

    .venv/bin/python bench/train_step.py [--model tiny|sd15-quarter|sd15-half] [--resolution 128] [--batch 4]
        [--steps 6] [--repeats 3]

--interleave times both modes in ONE process, alternating step by step, so that the speed
swings of a shared machine hit both alike (no per-mode peak RSS then).

--flops counts instead of timing: the floating-point operations of one trainer step in each mode
(torch's FlopCounterMode over the real step), and the same count for SD 1.5's own VAE, text
encoder and UNet at 512 px built on the meta device (shapes only, no weights, no compute).
Counts do not depend on machine load, so they show the ratio a model's shapes allow.
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


def sd15_vae_unet(divisor: int, cross_attention_dim: int):
    """A VAE and UNet with SD 1.5's layouts at 1/divisor of its channel widths (random weights).
    Built on the current torch device: the meta device gives shapes only, for counting."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=tuple(c // divisor for c in (128, 256, 512, 512)), layers_per_block=2, latent_channels=4,
        norm_num_groups=32,
    )
    unet = UNet2DConditionModel(
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=tuple(c // divisor for c in (320, 640, 1280, 1280)), layers_per_block=2, norm_num_groups=16,
        cross_attention_dim=cross_attention_dim, attention_head_dim=8,
    )
    for m in (vae, unet):
        m.eval()
        m.requires_grad_(False)
    return vae, unet


def sd15_shaped_components(divisor: int):
    """The tiny model's tokenizer, text encoder and scheduler with a VAE and UNet shaped like
    SD 1.5's at 1/divisor of its channel widths (seeded): bigger convolutions and attention than
    the tiny model's, so per-op overhead weighs less on a CPU."""
    import torch

    from trainer.model_loading import load_sd_components
    from trainer.tiny import ensure_tiny_sd

    comps = load_sd_components(str(ensure_tiny_sd()))
    torch.manual_seed(0)
    comps.vae, comps.unet = sd15_vae_unet(divisor, comps.text_encoder.config.hidden_size)
    return comps


def _trainer(args, mode: str, cache_dir: str):
    from trainer.config import build_train_config
    from trainer.loop import LoraTrainer
    from trainer.preparation import prepare
    from trainer.tiny import ensure_tiny_sd

    cfg = build_train_config(dict(
        base_model=args.base_model or str(ensure_tiny_sd()), dataset="builtin:demo", resolution=args.resolution,
        train_batch_size=args.batch, max_train_steps=args.warmup + args.steps + 1, learning_rate=1e-4,
        seed=0, cache_dir=cache_dir, **MODES[mode]))
    divisor = {"tiny": None, "sd15-quarter": 4, "sd15-half": 2}[args.model]
    comps = sd15_shaped_components(divisor) if divisor else None
    if mode == "cached":  # once per sweep, before trials: not part of a step
        return LoraTrainer.build(cfg, components=comps, prepared=prepare(cfg, components=comps, device="cpu"))
    return LoraTrainer.build(cfg, components=comps)


def run_child(args) -> dict:
    """One mode: set up (caches built outside the timing), warm up, time `steps` steps."""
    import torch

    torch.set_num_threads(args.threads)
    trainer = _trainer(args, args.mode, args.cache_dir)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train(args.warmup)
    times, cpu_times = [], []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "mode": args.mode,
        "step_s": times,
        "step_cpu_s": cpu_times,  # CPU seconds of this process: robust to other load on a shared machine
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


def run_interleaved(args) -> None:
    """Both modes in one process; step i of each runs back to back, in alternating order."""
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as cache_dir:
        trainers = {mode: _trainer(args, mode, cache_dir) for mode in MODES}
        for t in trainers.values():
            t.train(args.warmup)
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for i in range(args.steps):
            for mode in (list(MODES) if i % 2 == 0 else list(MODES)[::-1]):
                start = time.perf_counter()
                trainers[mode].step()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times[mode].append(time.perf_counter() - start)
    pair = [c / p for c, p in zip(times["cached"], times["per_step"])]
    print(f"model {args.model}, resolution {args.resolution}px, batch {args.batch}, {args.steps} interleaved steps per mode")
    for mode, ts in times.items():
        print(f"  {mode:9s} median step wall {statistics.median(ts) * 1000:8.1f} ms  "
              f"(min {min(ts) * 1000:.1f}, max {max(ts) * 1000:.1f})")
    print(f"  ratio of medians {statistics.median(times['cached']) / statistics.median(times['per_step']):.3f}, "
          f"median of per-pair ratios {statistics.median(pair):.3f} (target <= 0.7)")
    print(json.dumps({"step_s": times}))


def count_step_flops(args) -> dict[str, int]:
    """FLOPs of one steady-state step per mode, counted over the real trainer code."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        for mode in MODES:
            trainer = _trainer(args, mode, cache_dir)
            trainer.step()
            with FlopCounterMode(display=False) as counter:
                trainer.step()
            counts[mode] = counter.get_total_flops()
            del trainer
    return counts


def sd15_component_flops(resolution: int = 512, batch: int = 1) -> dict[str, int]:
    """SD 1.5's real architectures on the meta device: VAE encode, text encode, UNet forward +
    backward to its input (what a LoRA step back-propagates through)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        vae, unet = sd15_vae_unet(1, cross_attention_dim=768)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77))
        pixels = torch.empty(batch, 3, resolution, resolution)
        ids = torch.zeros(batch, 77, dtype=torch.long)
        latents = torch.empty(batch, 4, resolution // 8, resolution // 8, requires_grad=True)
        context = torch.empty(batch, 77, 768)
        out = {}
        with FlopCounterMode(display=False) as c:
            with torch.no_grad():
                vae.encode(pixels)
        out["vae_encode"] = c.get_total_flops()
        with FlopCounterMode(display=False) as c:
            with torch.no_grad():
                text(ids)
        out["text_encode"] = c.get_total_flops()
        with FlopCounterMode(display=False) as c:
            unet(latents, torch.zeros(batch, dtype=torch.long), context).sample.sum().backward()
        out["unet_forward_backward"] = c.get_total_flops()
    return out


def report_flops(args) -> None:
    step = count_step_flops(args)
    print(f"model {args.model}, resolution {args.resolution}px, batch {args.batch}: FLOPs of one trainer step")
    for mode, n in step.items():
        print(f"  {mode:9s} {n / 1e9:10.3f} GFLOP")
    print(f"  ratio cached / per_step: {step['cached'] / step['per_step']:.3f} (target <= 0.7)")
    sd = sd15_component_flops()
    flops = ", ".join(f"{k} {v / 1e12:.3f} TFLOP" for k, v in sd.items())
    print(f"SD 1.5 architectures at 512 px, batch 1 (meta device): {flops}")
    print(f"  ratio UNet fwd+bwd / (that + VAE encode + text encode): {sd['unet_forward_backward'] / sum(sd.values()):.3f}")
    print(json.dumps({"step_flops": step, "sd15_flops": sd}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=128,
                   help="training side in px (128: the tiny model's 64 px steps are mostly per-op overhead on a CPU)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", choices=["tiny", "sd15-quarter", "sd15-half"], default="tiny",
                   help="tiny: builtin:tiny-sd; sd15-quarter/-half: SD 1.5-shaped VAE + UNet at 1/4 or 1/2 "
                   "channel width (random weights)")
    p.add_argument("--base-model", default=None,
                   help="a real SD 1.x model (folder, .safetensors, hub id) instead of the tiny one; use with --model tiny")
    p.add_argument("--interleave", action="store_true", help="both modes in one process, step by step (noise-robust)")
    p.add_argument("--flops", action="store_true", help="count FLOPs per step instead of timing (load-independent)")
    p.add_argument("--mode", choices=sorted(MODES), help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(run_child(args)))
        return
    if args.flops:
        report_flops(args)
        return
    if args.interleave:
        run_interleaved(args)
        return
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as cache_dir:
        for r in range(args.repeats):
            for mode in MODES:
                cmd = [sys.executable, __file__, "--mode", mode, "--cache-dir", cache_dir] + [
                    f"--{k}={getattr(args, k)}" for k in ("resolution", "batch", "steps", "warmup", "threads", "model")] + (
                    [f"--base-model={args.base_model}"] if args.base_model else [])
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
                results[mode].append(json.loads(out.strip().splitlines()[-1]))
                last = results[mode][-1]
                print(f"repeat {r} {mode}: median step wall {statistics.median(last['step_s']):.3f} s, "
                      f"CPU {statistics.median(last['step_cpu_s']):.3f} s", flush=True)
    report(results, args)


def report(results: dict[str, list[dict]], args) -> None:
    med = {m: statistics.median(statistics.median(x["step_s"]) for x in runs) for m, runs in results.items()}
    cpu = {m: statistics.median(statistics.median(x["step_cpu_s"]) for x in runs) for m, runs in results.items()}
    rss = {m: max(x["peak_rss_mib"] for x in runs) for m, runs in results.items()}
    print(f"model {args.model}, resolution {args.resolution}px, batch {args.batch}, "
          f"{args.steps} timed steps x {args.repeats} repeats per mode")
    for m in MODES:
        cuda = results[m][0]["cuda_peak_mib"]
        extra = f", CUDA peak {cuda:.0f} MiB" if cuda is not None else ""
        print(f"  {m:9s} median step wall {med[m] * 1000:8.1f} ms  CPU {cpu[m] * 1000:8.1f} ms  "
              f"peak RSS {rss[m]:7.0f} MiB{extra}")
    print(f"  ratio cached / per_step: wall {med['cached'] / med['per_step']:.3f}, "
          f"CPU time {cpu['cached'] / cpu['per_step']:.3f} (target <= 0.7)")
    print(json.dumps({"wall_s": med, "cpu_s": cpu, "peak_rss_mib": rss}))


if __name__ == "__main__":
    main()
