"""CLIP score as pure functions of embeddings (no model), so that the math is tested alone.

CLIP-T (text-image CLIP score) of image i with its prompt i is `scale * max(cos(img_i, txt_i), 0)`:
- scale 100 (default) is torchmetrics' `CLIPScore`, the convention of most diffusion papers and
  of the DreamBooth/LoRA evaluations this project reproduces (typical SD values: 25-35);
- scale 2.5 (`HESSEL_SCALE`) is the original CLIPScore of Hessel et al. (2021), which
  stretches the usual cosine range of ~0-0.4 towards 0-1.
The clamp at 0 comes from both definitions: an image that is "anti-aligned" with its prompt
scores no worse than an unrelated one.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from evaluator.defaults import TORCHMETRICS_SCALE  # 100: torchmetrics' CLIPScore
from evaluator.suites import KINDS

HESSEL_SCALE = 2.5


def _as_matrix(x: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    # np.ascontiguousarray: torch refuses views with negative strides (e.g. a[::-1]).
    t = torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x)
    if t.ndim != 2:
        raise ValueError(f"{what} must be 2-D (N, D), got shape {tuple(t.shape)}")
    if not (t.is_floating_point()):
        raise ValueError(f"{what} must be floating point, got {t.dtype}")
    t = t.detach().to("cpu", torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return t


def clip_t(image_emb: torch.Tensor | np.ndarray, text_emb: torch.Tensor | np.ndarray,
           scale: float = TORCHMETRICS_SCALE) -> torch.Tensor:
    """Per-image CLIP score of image i against text i: `scale * max(cos, 0)`, float32 (N,).

    Inputs are (N, D) tensors or arrays; they are L2-normalized here whatever the caller did,
    so raw model features work too.
    """
    img = _as_matrix(image_emb, "image_emb")
    txt = _as_matrix(text_emb, "text_emb")
    if img.shape[0] != txt.shape[0]:
        raise ValueError(f"need one text per image: got {img.shape[0]} image embeddings "
                         f"and {txt.shape[0]} text embeddings")
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"embedding sizes differ: images {img.shape[1]}, texts {txt.shape[1]} "
                         "(from different CLIP models?)")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    img = torch.nn.functional.normalize(img, dim=-1)
    txt = torch.nn.functional.normalize(txt, dim=-1)
    cos = (img * txt).sum(dim=-1)
    return scale * cos.clamp(min=0.0)


def mean_clip_t(image_emb: torch.Tensor | np.ndarray, text_emb: torch.Tensor | np.ndarray,
                scale: float = TORCHMETRICS_SCALE) -> float:
    """Mean of `clip_t` over the images (the number a sweep optimizes)."""
    return float(clip_t(image_emb, text_emb, scale).mean())


# ---------------------------------------------------------------- image-image metrics
#
# CLIP-I and prior preservation are mean cosines in [-1, 1] (no scale, no clamp), as DreamBooth
# (Ruiz et al., 2023) reports CLIP-I; typical values for the same subject are 0.7-0.9.

def _unit(x: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    return torch.nn.functional.normalize(_as_matrix(x, what), dim=-1)


def _same_width(a: torch.Tensor, b: torch.Tensor, what_a: str, what_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding sizes differ: {what_a} {a.shape[1]}, {what_b} {b.shape[1]} "
                         "(from different CLIP models?)")


def clip_i_per_image(generated_emb: torch.Tensor | np.ndarray,
                     reference_emb: torch.Tensor | np.ndarray) -> torch.Tensor:
    """CLIP-I of each generated image: its mean cosine to every reference (training) image, (N,).

    Subject fidelity of DreamBooth: every generated image is compared with every training image
    of the subject (not one-to-one: the generations show the subject in other settings).
    """
    gen = _unit(generated_emb, "generated_emb")
    ref = _unit(reference_emb, "reference_emb")
    _same_width(gen, ref, "generated", "reference")
    return (gen @ ref.T).mean(dim=1)


def clip_i(generated_emb: torch.Tensor | np.ndarray,
           reference_emb: torch.Tensor | np.ndarray) -> float:
    """CLIP-I: mean cosine over all (generated, training image) pairs, in [-1, 1]."""
    return float(clip_i_per_image(generated_emb, reference_emb).mean())


def paired_cosine(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Cosine of a[i] with b[i], float32 (N,)."""
    x, y = _unit(a, "lora_emb"), _unit(b, "base_emb")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"need one base-model image per LoRA image (same prompt and seed): "
                         f"got {x.shape[0]} LoRA and {y.shape[0]} base-model embeddings")
    _same_width(x, y, "LoRA images", "base-model images")
    return (x * y).sum(dim=-1)


def prior_preservation(lora_emb: torch.Tensor | np.ndarray,
                       base_emb: torch.Tensor | np.ndarray) -> float:
    """Prior preservation on no-concept prompts: cosine between the LoRA's image and the base
    model's image at the same prompt and seed, per pair, then the mean. 1.0 = the LoRA left the
    prompt's picture unchanged; lower = it leaked into (or broke) unrelated prompts."""
    return float(paired_cosine(lora_emb, base_emb).mean())


def trigger_effect(with_scores: torch.Tensor | np.ndarray | list[float],
                   without_scores: torch.Tensor | np.ndarray | list[float]) -> float:
    """Trigger-word effect: mean CLIP-T of the images made with the trigger word minus the mean
    CLIP-T of the images made without it (same prompts otherwise, same seeds, both scored
    against the same text), in CLIP-T points. > 0: the trigger word brings the concept in."""
    w = torch.as_tensor(with_scores, dtype=torch.float32).reshape(-1)
    wo = torch.as_tensor(without_scores, dtype=torch.float32).reshape(-1)
    if w.numel() == 0 or w.numel() != wo.numel():
        raise ValueError(f"trigger test needs the same non-zero number of images with and without "
                         f"the trigger word: got {w.numel()} and {wo.numel()}")
    return float(w.mean() - wo.mean())


# ---------------------------------------------------------------- composite objective

# Default weight of each component (per unit of that component). CLIP-T and the trigger effect
# are in CLIP-T points (cosine x 100); CLIP-I and prior preservation are cosines, so a weight of
# 10 makes a 0.1 cosine change (a clearly visible one) count like 1 CLIP-T point. The trigger
# effect half-counts because it overlaps with the concept prompts' CLIP-T.
DEFAULT_OBJECTIVE_WEIGHTS: dict[str, float] = {
    "clip_score": 1.0,
    "clip_i": 10.0,
    "prior_preservation": 10.0,
    "trigger_effect": 0.5,
}
OBJECTIVE_COMPONENTS = tuple(DEFAULT_OBJECTIVE_WEIGHTS)
# The concept images against the training images and across seeds (`evaluator.distribution_metrics`):
# reported beside the objective, never in it.
DISTRIBUTION_METRICS = ("cmmd", "clip_fd", "clip_kid", "diversity")
# The scalar metrics scoring reports (`evaluator.score`): CLIP-T over every prompt, per suite
# kind, each objective component, the objective and the distribution metrics. A sweep's objective
# may name any of them.
REPORTED_METRICS = ("clip_score", *(f"clip_score_{kind}" for kind in KINDS), *OBJECTIVE_COMPONENTS[1:], "objective",
                    *DISTRIBUTION_METRICS)
# The direction that is better, for the metrics that have one whatever the sweep: the objective and
# its components by construction, the distances between distributions. Not the per-kind CLIP-T
# (trigger_off's text lacks the concept) nor diversity (noise is diverse too).
GOOD_DIRECTION = {**dict.fromkeys(("clip_score", *OBJECTIVE_COMPONENTS[1:], "objective"), "max"),
                  **dict.fromkeys(("cmmd", "clip_fd", "clip_kid"), "min")}


class ObjectiveWeights(BaseModel):
    """The weights as a typed config, for a sweep spec to embed (`objective.weights:`); every
    component is higher-is-better, so weights are >= 0 (0 drops the term)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    clip_score: float = Field(DEFAULT_OBJECTIVE_WEIGHTS["clip_score"], ge=0,
                              description="Per CLIP-T point (mean over the three prompt kinds).")
    clip_i: float = Field(DEFAULT_OBJECTIVE_WEIGHTS["clip_i"], ge=0,
                          description="Per unit of cosine to the training images.")
    prior_preservation: float = Field(DEFAULT_OBJECTIVE_WEIGHTS["prior_preservation"], ge=0,
                                      description="Per unit of cosine to the base model's images.")
    trigger_effect: float = Field(DEFAULT_OBJECTIVE_WEIGHTS["trigger_effect"], ge=0,
                                  description="Per CLIP-T point gained by the trigger word.")

    def as_dict(self) -> dict[str, float]:
        return self.model_dump()


def composite_objective(components: dict[str, float | None],
                        weights: dict[str, float] | ObjectiveWeights | None = None) -> dict:
    """Weighted sum of metric components (higher is better for every component).

    components: e.g. {"clip_score": 31.2, "clip_i": 0.78, "prior_preservation": 0.91,
        "trigger_effect": 2.4}; None marks a component that could not be computed (no training
        images, no base-model images, no trigger test), whose term is left out and listed.
    weights: per component; None = `DEFAULT_OBJECTIVE_WEIGHTS`. A weight of 0 drops a term.

    Returns {"objective": float, "components": the raw values (for multi-objective search),
    "terms": weight x value per used component, "skipped": components with a weight but no
    value}. The same suite and references give every trial of a sweep the same terms.
    """
    if isinstance(weights, ObjectiveWeights):
        weights = weights.as_dict()
    weights = dict(DEFAULT_OBJECTIVE_WEIGHTS if weights is None else weights)
    unknown = sorted(set(weights) - set(OBJECTIVE_COMPONENTS))
    if unknown:
        raise ValueError(f"unknown objective component(s) {unknown}; "
                         f"known: {list(OBJECTIVE_COMPONENTS)}")
    for key, w in weights.items():
        if not np.isfinite(w):
            raise ValueError(f"objective weight {key!r} must be a finite number, got {w}")
    terms, skipped = {}, []
    for key, w in weights.items():
        if w == 0:
            continue
        value = components.get(key)
        if value is None:
            skipped.append(key)
            continue
        terms[key] = float(w) * float(value)
    if not terms:
        raise ValueError(f"objective has no computable term: weights {weights}, components "
                         f"{components} (give the missing references or change the weights)")
    return {"objective": float(sum(terms.values())), "components": dict(components),
            "terms": terms, "skipped": skipped}
