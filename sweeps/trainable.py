"""The per-trial function Ray Tune runs: params -> TrainConfig -> train -> sample -> score -> report."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from ray import tune

from evaluator import ClipModel, score_images
from sweeps.spec import SweepSpec, parse_spec
from trainer.export import save_lora_diffusers
from trainer.loop import LoraTrainer

LORA_FILE = "lora.safetensors"
SAMPLES_FILE = "samples.png"


def train_trial(params: dict, spec_data: dict) -> None:
    """Train one LoRA; every `eval.interval` steps, score samples and report with a checkpoint."""
    spec: SweepSpec = parse_spec(spec_data, "<sweep spec>")
    _quiet_libraries()
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_trial)))
    cfg = spec.train_config(params)
    trainer = LoraTrainer(cfg)
    clip = ClipModel.load(spec.evaluator.model, spec.evaluator.pretrained)
    prompts, seeds = spec.eval_prompts()
    while trainer.global_step < cfg.max_train_steps:
        history = trainer.train(spec.eval.interval)
        images = trainer.sample(prompts, seeds)
        scores = score_images(clip, images, prompts)
        metrics = {
            "step": trainer.global_step,
            "loss": float(np.mean([h["loss"] for h in history])),
            "lr": history[-1]["lr"],
            "images_per_sec": float(np.median([h["images_per_sec"] for h in history])),
            "clip_score": scores["clip_score"],
        }
        with tempfile.TemporaryDirectory() as ckpt:
            save_lora_diffusers(trainer.models.unet, Path(ckpt) / LORA_FILE)
            save_grid(images, Path(ckpt) / SAMPLES_FILE)
            (Path(ckpt) / "trial.json").write_text(json.dumps({"params": params, "metrics": metrics}, indent=2))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(ckpt))


def _quiet_libraries() -> None:
    """Per-trial progress bars and load warnings from diffusers/transformers drown the sweep's own lines."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def save_grid(images: np.ndarray, path: Path, columns: int = 4) -> None:
    """The eval samples side by side, for people to look at."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * h, min(n, columns) * w, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = im
    Image.fromarray(grid).save(path)
