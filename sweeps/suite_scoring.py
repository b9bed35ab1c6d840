"""Scoring a trial's samples on a prompt suite: CLIP-T per kind, CLIP-I, prior preservation,
trigger effect and the composite objective.

The references are made once per sweep and kept in the shared evaluator: the training images,
and the base model's images of the `no_concept` items. A trial at step 0 makes the latter with
its own pipeline, because a fresh LoRA (up-projections initialised to zero) leaves the base
model's output unchanged at the same seeds.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from evaluator.remote import connect_evaluator, ensure_reference, has_reference, score_suite_remote
from sweeps.trial_plan import TrialPlan
from trainer.images import load_image
from trainer.loop import LoraTrainer

Scorer = Callable[[np.ndarray, list[str]], dict]


def training_images(trainer: LoraTrainer, limit: int = 64) -> np.ndarray:
    """The distinct training images of the concept as the trainer sees them (center crop, no flip),
    uint8 NHWC: those whose caption holds the trigger word when some do (a dataset may keep other
    pictures beside the concept's, e.g. regularisation folders), else all. CLIP-I compares to these."""
    cfg, seen, out = trainer.cfg, set(), []
    rng = np.random.default_rng(0)
    examples = trainer.data.examples
    if cfg.trigger_word and any(cfg.trigger_word in e.caption for e in examples):
        examples = [e for e in examples if cfg.trigger_word in e.caption]
    for example in examples:
        if example.image_path in seen or len(out) >= limit:
            continue
        seen.add(example.image_path)
        size = trainer.target_sizes.get(example.image_path, cfg.resolution)
        x = load_image(example.image_path, size, True, False, rng)  # CHW in [-1, 1]
        out.append(((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8))
    if len({im.shape for im in out}) > 1:  # bucketed sizes: keep the most common one for one batch
        shapes = [im.shape for im in out]
        common = max(set(shapes), key=shapes.count)
        out = [im for im in out if im.shape == common]
    return np.stack(out)


def make_suite_scorer(plan: TrialPlan, trainer: LoraTrainer) -> Scorer | None:
    """A scorer for the plan's prompt suite, or None when the spec lists plain prompts."""
    items = plan.suite_items
    if items is None:
        return None
    base_items = [it for it in items if it.kind == "no_concept"]
    make_base = (lambda: trainer.sample([it.prompt for it in base_items], [it.seed for it in base_items]))
    fresh = trainer.global_step == 0  # base images are only right from an untrained LoRA
    if plan.evaluator_actor:
        return _remote(plan, trainer, items, base_items, make_base, fresh)
    return _local(plan, trainer, items, base_items, make_base, fresh)


def _remote(plan, trainer, items, base_items, make_base, fresh) -> Scorer:
    handle = connect_evaluator(name=plan.evaluator_actor, timeout_s=120)
    train_key, base_key = f"{plan.sweep}/train", f"{plan.sweep}/base"
    ensure_reference(handle, train_key, lambda: training_images(trainer))
    if base_items and fresh:
        ensure_reference(handle, base_key, make_base)
    if not base_items or not has_reference(handle, base_key):
        base_key = None  # prior preservation is then left out of the objective (listed as skipped)

    def score(images: np.ndarray, prompts: list[str]) -> dict:
        return score_suite_remote(handle, items, images, trigger=plan.trigger_word, base_key=base_key,
                                  train_key=train_key, timeout_s=600)

    return score


def _local(plan, trainer, items, base_items, make_base, fresh) -> Scorer:
    from evaluator import ClipModel  # torch and open_clip: only where the model runs
    from evaluator.score import evaluate_suite

    clip = ClipModel.load(plan.evaluator_model, plan.evaluator_pretrained)
    train_emb = clip.embed_images(training_images(trainer))
    base = make_base() if base_items and fresh else None

    def score(images: np.ndarray, prompts: list[str]) -> dict:
        return evaluate_suite(clip, items, images, trigger=plan.trigger_word, base_images=base, train_emb=train_emb)

    return score
