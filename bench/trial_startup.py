"""Trial start-up, cold vs warm: what a trial pays before its first training step.

A trial does what sweeps.trainable.train_trial does up to its first step: construct the
LoraTrainer (config checks), get the base model from the worker (trainer.resident_models), and
`setup()` (device placement, caches by key, LoRA layers, samplers, optimizer, schedule).

- **cold**: a worker with no resident model, as every trial was before: the base model is loaded
  from its diffusers folder (which this script wrote just before: the OS page cache holds it,
  so this is the best case for a disk read).
- **warm**: the worker's previous trial used the same base model: it is reset and reused.

Each model is timed in the same run, cold and warm trials alternating, so that the machine's
speed swings hit both alike: the built-in tiny SD, and the SD 1.5-shaped model at half its channel
widths that bench/train_step.py builds (saved as a diffusers folder first). Then a few training
steps and one evaluation (sampling) are timed, and the start-up's share of a pruned trial is
computed: a trial stopped at its first evaluation, `--interval` steps (the demo's `eval.interval`)
plus that evaluation.

    .venv/bin/python bench/trial_startup.py [--models tiny,sd15-half] [--repeats 3] [--steps 3]
        [--interval 100] [--eval-images 4] [--sampling-steps 12] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Per model: its training resolution and batch (the demo's for the tiny model, bench/train_step.py's
# for the SD 1.5-shaped one).
MODELS = {"tiny": dict(resolution=64, train_batch_size=8), "sd15-half": dict(resolution=256, train_batch_size=1)}


def model_folder(name: str, root: Path) -> str:
    """The base model as a diffusers folder on disk, so that a cold trial loads it as a user's model."""
    from trainer.tiny import ensure_tiny_sd

    if name == "tiny":
        return str(ensure_tiny_sd())
    from bench.train_step import sd15_shaped_components

    comps = sd15_shaped_components(divisor=2)
    folder = root / name
    comps.to_pipeline(scheduler=comps.noise_scheduler).save_pretrained(folder)
    return str(folder)


def clock() -> tuple[float, float]:
    """(wall, CPU) seconds: CPU time of this process is robust to other jobs on a shared machine."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    now = clock()
    return now[0] - start[0], now[1] - start[1]


def start_trial(cfg, prepared, workers) -> tuple:
    """What train_trial does before its first step; returns the trainer, its start-up (wall, CPU)
    seconds, the base model's (wall, CPU) seconds to get it from the worker, and whether it was warm."""
    from trainer.loop import LoraTrainer

    start = clock()
    trainer = LoraTrainer(cfg, prepared=prepared)
    got = workers.acquire(cfg, trainer.device, prepared)
    acquired = since(start)
    trainer.models = got.components
    trainer.setup()
    return trainer, since(start), acquired, got.warm


def time_model(name: str, args, root: Path) -> dict:
    from trainer.config import build_train_config
    from trainer.preparation import prepare
    from trainer.resident_models import ResidentModels

    cfg = build_train_config(dict(
        base_model=model_folder(name, root), dataset="builtin:demo", **MODELS[name], max_train_steps=1000,
        learning_rate=1e-4, seed=0, cache_dir=str(root / "cache"),
        sampling={"steps": args.sampling_steps, "prompts": ["a lswsks circle"]}))
    prepared = prepare(cfg, device="cpu")  # once per sweep, on the driver: not a trial's start-up
    warm_workers = ResidentModels()
    start_trial(cfg, prepared, warm_workers)  # the worker's previous trial (untimed)
    cold, warm, load, warm_get = [], [], [], []
    for _ in range(args.repeats):
        workers = ResidentModels()
        _, seconds, loading, was_warm = start_trial(cfg, prepared, workers)
        assert not was_warm
        cold.append(seconds)
        load.append(loading)
        workers.release()
        trainer, seconds, reset, was_warm = start_trial(cfg, prepared, warm_workers)
        assert was_warm
        warm.append(seconds)
        warm_get.append(reset)
    trainer.train(1)  # the first step's one-off costs are not a step's
    steps = []
    for _ in range(args.steps):
        start = clock()
        trainer.step()
        steps.append(since(start))
    start = clock()
    trainer.sample(["a lswsks circle"] * args.eval_images, list(range(args.eval_images)))
    return {**summarise(name, cold, warm, load, steps, since(start), args), "warm_get": warm_get}


def summarise(name, cold, warm, load, steps, evaluation, args) -> dict:
    """Per clock (wall, CPU): medians, the speed-up, and the start-up's share of a pruned trial."""
    out = {"model": name, "cold": cold, "warm": warm, "cold_load": load, "steps": steps, "eval": evaluation}
    for i, clock_name in enumerate(("wall", "cpu")):
        cold_s, warm_s = statistics.median(c[i] for c in cold), statistics.median(w[i] for w in warm)
        step_s = statistics.median(s[i] for s in steps)
        work = args.interval * step_s + evaluation[i]  # a trial pruned at its first evaluation, without start-up
        out[clock_name] = {"cold_s": cold_s, "warm_s": warm_s, "load_s": statistics.median(c[i] for c in load),
                           "speedup": cold_s / warm_s, "step_s": step_s, "eval_s": evaluation[i],
                           "pruned_trial_work_s": work, "cold_share": cold_s / (cold_s + work),
                           "warm_share": warm_s / (warm_s + work)}
    return out


def report(rows: list[dict], args) -> None:
    print(f"pruned trial: {args.interval} steps + one evaluation of {args.eval_images} images at "
          f"{args.sampling_steps} sampling steps; medians of {args.repeats} start-ups")
    print("| model | clock | cold start-up (of it: getting the model) | warm start-up (of it: the reset) | cold / warm | "
          "step | evaluation | start-up share of a pruned trial, cold -> warm |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        warm_get = statistics.median(w[1] for w in r["warm_get"])
        for clock_name in ("wall", "cpu"):
            c = r[clock_name]
            get = warm_get if clock_name == "cpu" else statistics.median(w[0] for w in r["warm_get"])
            print(f"| {r['model']} | {clock_name} | {c['cold_s']:.3f} s ({c['load_s']:.3f} s) | {c['warm_s']:.3f} s "
                  f"({get:.3f} s) | {c['speedup']:.1f}x | {c['step_s'] * 1000:.0f} ms | {c['eval_s']:.2f} s | "
                  f"{100 * c['cold_share']:.2f}% -> **{100 * c['warm_share']:.2f}%** |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,sd15-half", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--repeats", type=int, default=3, help="cold and warm start-ups per model")
    p.add_argument("--steps", type=int, default=3, help="timed training steps (for the pruned trial's length)")
    p.add_argument("--interval", type=int, default=100, help="steps before a pruned trial's first (and last) evaluation")
    p.add_argument("--eval-images", type=int, default=4)
    p.add_argument("--sampling-steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [time_model(name, args, Path(tmp)) for name in names]
    print(json.dumps(rows))
    report(rows, args)


if __name__ == "__main__":
    main()
