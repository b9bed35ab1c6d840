"""One evaluation of a trial: sample and score every variant of the plan (`sweeps.eval_variants`).

Without variants this is what it always was: the suite sampled once, scored once. With them, each
(guidance scale, LoRA strength) pair is sampled and scored as a whole suite and the metrics are
combined by `evaluator.variant_metrics.aggregate_variants`; the img2img items are sampled per
strength with diffusers' img2img pipeline made from the trial's own modules (no model is loaded
again) and scored by CLIP-T against their prompt and CLIP cosine to their init image.

The LoRA strength is peft's adapter scale (`LoraLayer.set_scale`: strength x alpha / rank) on the
UNet and, when it is trained, the text encoder, as a UI's `<lora:name:0.85>` scales both. The exact
scales are put back afterwards, so training goes on bit for bit as without the evaluation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
from peft.tuners.lora import LoraLayer

from evaluator.metrics import paired_cosine
from evaluator.suites import clip_text
from evaluator.variant_metrics import aggregate_variants, img2img_metrics
from sweeps.suite_scoring import local_clip, sampling_at
from sweeps.trial_plan import TrialPlan
from trainer.loop import LoraTrainer
from trainer.sampling import fit_image

Evaluation = Callable[[list[str], list[int]], tuple[np.ndarray, dict]]


@contextlib.contextmanager
def lora_strength(trainer: LoraTrainer, weight: float | None):
    """Every LoRA layer of the trainer at `weight` x its trained scale (None or 1: as it is)."""
    if weight is None or weight == 1.0:
        yield
        return
    modules = [trainer.models.unet] + ([trainer.models.text_encoder] if trainer.cfg.train_text_encoder else [])
    layers = [m for model in modules for m in model.modules() if isinstance(m, LoraLayer)]
    saved = [(layer, dict(layer.scaling)) for layer in layers]
    for layer in layers:
        for adapter in layer.active_adapters:
            layer.set_scale(adapter, float(weight))
    try:
        yield
    finally:
        for layer, scaling in saved:  # the floats as they were, not scale / weight (rounding)
            layer.scaling.clear()
            layer.scaling.update(scaling)


def make_evaluation(plan: TrialPlan, trainer: LoraTrainer, scorer: Callable) -> Evaluation:
    """`evaluate(prompts, seeds) -> (images, scores)`: the images shown for the evaluation (the first
    variant's) and its metrics. `scorer(images, prompts[, guidance=g])` scores one variant."""
    variants = plan.eval_variants
    if variants is None:
        def evaluate_once(prompts: list[str], seeds: list[int]) -> tuple[np.ndarray, dict]:
            images = trainer.sample(prompts, seeds)
            return images, scorer(images, prompts)

        return evaluate_once
    img2img = make_img2img_scorer(plan, trainer) if variants.img2img else None

    def evaluate(prompts: list[str], seeds: list[int]) -> tuple[np.ndarray, dict]:
        results, shown = {}, None
        for guidance, weight in variants.pairs():
            with lora_strength(trainer, weight):
                images = trainer.sample(prompts, seeds, sampling_at(trainer, guidance))
            extra = {} if guidance is None else {"guidance": guidance}
            results[(guidance, weight)] = scorer(images, prompts, **extra)
            shown = images if shown is None else shown
        scores = aggregate_variants(results, variants.guidance_scales is not None, variants.lora_scales is not None)
        if img2img is not None:
            scores.update(img2img())
        return shown, scores

    return evaluate


def _clip_calls(plan: TrialPlan):
    """(embed(images), clip_t(images, texts) per image) on the shared evaluator, else in-process."""
    if plan.evaluator_actor:
        from evaluator.remote import connect_evaluator, embed_remote, score_remote

        handle = connect_evaluator(name=plan.evaluator_actor, timeout_s=120)
        return (lambda images: embed_remote(handle, images, timeout_s=600),
                lambda images, texts: score_remote(handle, images, texts, timeout_s=600)["per_image"])
    from evaluator.score import score_images

    clip = local_clip(plan.evaluator_model, plan.evaluator_pretrained)
    return clip.embed_images, lambda images, texts: score_images(clip, images, texts)["per_image"]


def make_img2img_scorer(plan: TrialPlan, trainer: LoraTrainer) -> Callable[[], dict]:
    """`score() -> metrics`: sample the plan's img2img items (grouped by strength) and score them."""
    items = plan.eval_variants.img2img
    raw = [plan.eval_variants.init_images[it.init_image] for it in items]
    texts = [clip_text(it.prompt, plan.trigger_word) for it in items]
    embed, clip_t = _clip_calls(plan)
    # What the pipeline starts from (fitted to the resolution), embedded once per trial.
    init_emb = embed(np.stack([fit_image(im, trainer.cfg.resolution) for im in raw]))

    def score() -> dict:
        images: list = [None] * len(items)
        for strength in dict.fromkeys(it.strength for it in items):
            where = [i for i, it in enumerate(items) if it.strength == strength]
            made = trainer.sample_img2img([items[i].prompt for i in where], [items[i].seed for i in where],
                                          [raw[i] for i in where], strength)
            for i, im in zip(where, made, strict=True):
                images[i] = im
        batch = np.stack(images)
        return img2img_metrics([it.strength for it in items], clip_t(batch, texts),
                               paired_cosine(embed(batch), init_emb))

    return score
