"""Score generated images against their prompts with a `ClipModel`: plain prompt lists
(`score_images`) and whole prompt suites (`evaluate_suite`, `suite_metrics`)."""

from __future__ import annotations

import numpy as np
import torch

from evaluator.clip_model import ClipModel, validate_images
from evaluator.distribution_metrics import concept_distribution
from evaluator.judge_metrics import JudgeInputs, judge_metrics
from evaluator.metrics import (
    DEFAULT_OBJECTIVE_WEIGHTS,
    OBJECTIVE_COMPONENTS,
    TORCHMETRICS_SCALE,
    ObjectiveWeights,
    clip_i,
    clip_i_per_image,
    clip_t,
    composite_objective,
    paired_cosine,
    prior_preservation,
    trigger_effect,
)
from evaluator.suites import CONCEPT_KINDS, KINDS, PROMPT_KINDS, SuiteItem, check_items, clip_texts


def score_images(model: ClipModel, images: np.ndarray, prompts: list[str],
                 scale: float = TORCHMETRICS_SCALE, batch_size: int = 32) -> dict:
    """CLIP-T of each image (uint8 NHWC) against its own prompt.

    Returns {"clip_score": mean over images, "per_image": [score of image i, ...]}, floats on
    the `scale` (100 = torchmetrics convention, see `evaluator.metrics`).
    """
    validate_images(images)
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings (one per image), got a single string")
    if len(images) != len(prompts):
        raise ValueError(f"need one prompt per image: got {len(images)} images "
                         f"and {len(prompts)} prompts")
    # Eval suites repeat each prompt over several seeds: embed each distinct prompt once.
    text_emb = _embed_unique(model, list(prompts))
    image_emb = model.embed_images(images, batch_size=batch_size)
    per_image = clip_t(image_emb, text_emb, scale=scale)
    return {"clip_score": float(per_image.mean()), "per_image": [float(s) for s in per_image]}


def suite_metrics(items: list[SuiteItem], image_emb: torch.Tensor, text_emb: torch.Tensor,
                  base_emb: torch.Tensor | None = None, train_emb: torch.Tensor | None = None,
                  weights: dict[str, float] | None = None,
                  scale: float = TORCHMETRICS_SCALE, judged: JudgeInputs | None = None) -> dict:
    """Every metric of an expanded suite, from embeddings (pure; the service calls this too).

    image_emb: one row per item (the LoRA's images); text_emb: one row per item (the text
    each image is scored against, see `evaluator.suites.clip_text`); base_emb: the base model's
    images for the `no_concept` items, in item order (same prompts and seeds); train_emb: the
    training images.

    Returns clip_score (mean CLIP-T over the natural, new_setting and no_concept images),
    clip_score_<kind> for each kind present, per_image (CLIP-T of every item), clip_i (over the
    concept images: natural, new_setting, trigger_on), prior_preservation, trigger_effect
    (None when their inputs are missing), objective with objective_terms/objective_skipped
    (see `composite_objective`), and objective_items: the objective split over the items (their
    mean is the objective; see `objective_items`). Beside the objective, not in it: cmmd, clip_fd,
    clip_kid (concept images vs training images) and diversity (of the concept prompts across seeds),
    see `evaluator.distribution_metrics.concept_distribution`. With `judged` (what the optional
    judges measured, `evaluator.judges`): dino_i and/or aesthetic too (`evaluator.judge_metrics`).
    """
    check_items(items, image_emb.shape[0])
    per_image = clip_t(image_emb, text_emb, scale=scale)
    kinds = [it[0] for it in items]

    def idx(*wanted: str) -> list[int]:
        return [i for i, k in enumerate(kinds) if k in wanted]

    out: dict = {}
    main = idx(*PROMPT_KINDS) or list(range(len(items)))
    out["clip_score"] = float(per_image[main].mean())
    for kind in KINDS:
        if idx(kind):
            out[f"clip_score_{kind}"] = float(per_image[idx(kind)].mean())
    out["per_image"] = [float(s) for s in per_image]
    concept = idx(*CONCEPT_KINDS)
    out["clip_i"] = (clip_i(image_emb[concept], train_emb)
                     if train_emb is not None and concept else None)
    out.update(concept_distribution(image_emb[concept], [items[i][1:3] for i in concept], train_emb))
    none = idx("no_concept")
    if base_emb is not None and none:
        if base_emb.shape[0] != len(none):
            raise ValueError(f"need one base-model image per no_concept item: got "
                             f"{base_emb.shape[0]} base-model images for {len(none)} items")
        out["prior_preservation"] = prior_preservation(image_emb[none], base_emb)
    else:
        out["prior_preservation"] = None
    on, off = idx("trigger_on"), idx("trigger_off")
    out["trigger_effect"] = trigger_effect(per_image[on], per_image[off]) if on else None
    out.update(judge_metrics(items, judged))
    comp = {k: out[k] for k in OBJECTIVE_COMPONENTS}
    obj = composite_objective(comp, weights)
    out.update(objective=obj["objective"], objective_terms=obj["terms"],
               objective_skipped=obj["skipped"])
    per_item = {"clip_score": (main, per_image[main])}
    if out["clip_i"] is not None:
        per_item["clip_i"] = (concept, clip_i_per_image(image_emb[concept], train_emb))
    if out["prior_preservation"] is not None:
        per_item["prior_preservation"] = (none, paired_cosine(image_emb[none], base_emb))
    if on:
        per_item["trigger_effect"] = (on, per_image[on] - per_image[off])
    out["objective_items"] = objective_items(len(items), per_item, obj["terms"], weights)
    return out


def objective_items(n_items: int, per_item: dict[str, tuple[list[int], torch.Tensor]],
                    terms: dict[str, float], weights: dict[str, float] | None) -> list[float]:
    """The composite objective split over the suite's items, so that their mean is the objective.

    per_item: for each component, (the items it is averaged over, the value of each); a component
    over k of the n items gives each of them weight x value x n / k (the trigger effect goes to the
    trigger_on item of each with/without pair). Items are the same prompt and seed in every trial
    of a sweep, so two trials' lists compare item by item (the paired test of the wilcoxon pruner).
    """
    if isinstance(weights, ObjectiveWeights):
        weights = weights.as_dict()
    weights = dict(DEFAULT_OBJECTIVE_WEIGHTS if weights is None else weights)
    values = torch.zeros(n_items, dtype=torch.float64)
    for key, (where, v) in per_item.items():
        if key not in terms or not where:  # weight 0: the objective leaves it out too
            continue
        values[where] += weights[key] * v.to(torch.float64) * (n_items / len(where))
    return [float(x) for x in values]


def evaluate_suite(model: ClipModel, items: list[SuiteItem], images: np.ndarray,
                   trigger: str | None = None, base_images: np.ndarray | None = None,
                   train_images: np.ndarray | None = None, train_emb: torch.Tensor | None = None,
                   weights: dict[str, float] | None = None, keep_trigger: bool = False,
                   scale: float = TORCHMETRICS_SCALE, judges=None,
                   train_dino_emb: torch.Tensor | None = None) -> dict:
    """`suite_metrics` of the LoRA's `images` (one per item of `expand_suite`, uint8 NHWC).

    base_images: the base model's images for the no_concept items (in item order);
    train_images or train_emb (precomputed): the training images, for CLIP-I.
    judges: the optional judges (`evaluator.judges.Judges`), with train_dino_emb (precomputed
    by `Judges.reference`) or train_images for DINO.
    """
    validate_images(images)
    check_items(items, images.shape[0])
    texts = clip_texts(items, trigger, keep_trigger)
    image_emb = model.embed_images(images)
    text_emb = _embed_unique(model, texts)
    base_emb = model.embed_images(base_images) if base_images is not None else None
    if train_emb is None and train_images is not None:
        train_emb = model.embed_images(train_images)
    judged = None
    if judges is not None:
        if train_dino_emb is None and train_images is not None:
            train_dino_emb = judges.reference(train_images)
        judged = judges.inputs(items, images, image_emb, train_dino_emb)
    return suite_metrics(items, image_emb, text_emb, base_emb, train_emb, weights, scale, judged)


def _embed_unique(model: ClipModel, texts: list[str]) -> torch.Tensor:
    unique = list(dict.fromkeys(texts))
    emb = model.embed_texts(unique)
    where = {p: i for i, p in enumerate(unique)}
    return emb[[where[p] for p in texts]]
