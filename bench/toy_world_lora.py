"""LoRA trainings on the toy world, judged by the exact oracle on held-out seeds.

    python bench/toy_world_lora.py --lr 3e-4 3e-3 3e-2 --steps 150 --eval-every 50 [--rank 4] [--set k=v ...]

For each learning rate: a LoRA on the built-in tiny SD over the toy world's LoRA task
(`builtin:demo`), and at every `--eval-every` steps concept_accuracy (trigger prompts drawn as the
held-out colour in the asked shape) and prior_accuracy (known-colour prompts drawn right), on
seeds no sweep evaluates on. Prints one JSON line per evaluation.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import yaml

from toyworld.lora_task import HELD_OUT_SEEDS, TRIGGER, judge_prompts
from toyworld.oracle import oracle_metrics
from trainer.config import build_train_config
from trainer.loop import LoraTrainer


def run(values: dict, eval_every: int, seeds: tuple[int, ...]) -> list[dict]:
    trainer = LoraTrainer.build(build_train_config(values))
    prompts, seeds = judge_prompts(seeds)
    out, start, history = [], time.perf_counter(), []
    while True:  # step 0 first: the base model, as a fresh LoRA leaves it unchanged
        images = trainer.sample(prompts, seeds)
        loss = round(sum(h["loss"] for h in history) / len(history), 4) if history else None
        row = {"step": trainer.global_step, "loss": loss,
               **{k: round(v, 3) for k, v in oracle_metrics(images, prompts, TRIGGER).items()},
               "wall_s": round(time.perf_counter() - start, 1)}
        out.append(row)
        if trainer.global_step >= trainer.max_train_steps:
            return out
        history = trainer.train(eval_every)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lr", type=float, nargs="+", required=True)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seeds", type=int, default=8, help="held-out seeds per prompt")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], help="any TrainConfig field, key=value (YAML value)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for lr in a.lr:
        values = dict(base_model="builtin:tiny-sd", dataset="builtin:demo", trigger_word=TRIGGER, resolution=64,
                      max_train_steps=a.steps, train_batch_size=a.batch, learning_rate=lr, rank=a.rank,
                      lr_scheduler="constant", sampling={"steps": 12, "guidance_scale": 5.0})
        for item in a.set:
            key, _, raw = item.partition("=")
            values[key] = yaml.safe_load(raw)
        for row in run(values, a.eval_every, HELD_OUT_SEEDS[: a.seeds]):
            print(json.dumps({"lr": lr, "rank": a.rank, **{k: v for k, v in values.items() if k in
                              ("lr_scheduler", "clip_skip", "target_modules", "alpha")}, **row}), flush=True)


if __name__ == "__main__":
    main()
