"""How well a toy-world SD draws what it is asked, judged by the exact pixel oracle.

    python bench/toy_world_quality.py [--model builtin:tiny-sd] [--per-class 64] [--steps 20]

For every known (colour, shape) class: the fraction of samples whose colour, shape and both are
right; for the held-out colour: how often it is drawn when asked for by name (`a cyan circle`)
or through the demo's trigger word without a LoRA. Prints JSON; `--grid PATH` also writes one
row of samples per prompt.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from toyworld.oracle import read
from toyworld.world import HELD_OUT_COLOR, KNOWN_COLORS, SHAPES
from trainer.config import SamplingConfig
from trainer.model_loading import load_sd_components
from trainer.sampling import sample_images
from trainer.tiny import load_toy_sd_pipeline


def measure(model: str, per_class: int, sampling: SamplingConfig, trigger: str, clip_skip: int = 1,
            grid: str | None = None) -> dict:
    comps = load_sd_components(model)
    seeds = list(range(1000, 1000 + per_class))
    known = [(f"a {c} {s}", c, s) for c in KNOWN_COLORS for s in SHAPES]
    held = [(f"a {HELD_OUT_COLOR} {s}", HELD_OUT_COLOR, s) for s in SHAPES]
    held += [(f"a {trigger} {s}", HELD_OUT_COLOR, s) for s in SHAPES]
    rows, out, start = [], {"per_class": {}}, time.perf_counter()
    color_ok = shape_ok = both_ok = n = 0
    for prompt, color, shape in known + held:
        images = sample_images(comps, [prompt] * len(seeds), seeds, clip_skip, 64, sampling, batch_size=32)
        reads = [read(im) for im in images]
        c = np.mean([r.color == color for r in reads])
        s = np.mean([r.shape == shape for r in reads])
        b = np.mean([r == (color, shape) for r in reads])
        out["per_class"][prompt] = {"color": round(float(c), 3), "shape": round(float(s), 3), "both": round(float(b), 3)}
        if color != HELD_OUT_COLOR:
            color_ok, shape_ok, both_ok, n = color_ok + c, shape_ok + s, both_ok + b, n + 1
        rows.append(np.concatenate(list(images[:12]), axis=1))
    out["known_color_accuracy"] = round(float(color_ok / n), 3)
    out["known_shape_accuracy"] = round(float(shape_ok / n), 3)
    out["known_both_accuracy"] = round(float(both_ok / n), 3)
    named = [out["per_class"][p]["color"] for p, c, _ in held if HELD_OUT_COLOR in p]
    trig = [out["per_class"][p]["color"] for p, c, _ in held if trigger in p]
    out["held_out_drawn_when_named"] = round(float(np.mean(named)), 3)
    out["held_out_drawn_with_trigger_no_lora"] = round(float(np.mean(trig)), 3)
    out["samples"] = per_class * len(known + held)
    out["wall_s"] = round(time.perf_counter() - start, 1)
    if grid:
        Image.fromarray(np.concatenate(rows, axis=0)).save(grid)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="builtin:tiny-sd")
    p.add_argument("--weights", default=None, help="a `pretrain.tiny_sd` output folder instead of --model")
    p.add_argument("--per-class", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--trigger", default="lswsks")
    p.add_argument("--grid", default=None, help="PNG with 12 samples per prompt")
    a = p.parse_args()
    sampling = SamplingConfig(steps=a.steps, guidance_scale=a.guidance, sampler=a.sampler)
    model = a.model
    if a.weights:
        model = tempfile.mkdtemp(prefix="toy-sd-")
        load_toy_sd_pipeline(Path(a.weights)).save_pretrained(model)
    res = measure(model, a.per_class, sampling, a.trigger, grid=a.grid)
    print(json.dumps({"model": a.model, "sampling": sampling.model_dump(include={"steps", "guidance_scale", "sampler"}),
                      **res}, indent=1))


if __name__ == "__main__":
    main()
