"""The optional judges' metrics as pure functions of embeddings and scores (no model), tested alone.

- `dino_i`: DreamBooth's DINO score (Ruiz et al., 2023, sec. 4.1), which it defines as the average
  pairwise cosine similarity between the (ViT-S/16) DINO embeddings of generated and real images.
  Here: the CLS embeddings of the concept images (`CONCEPT_KINDS`) against every training image,
  every pair counted once, in [-1, 1]. DreamBooth prefers it to CLIP-I for subject fidelity:
  DINO's self-supervised objective keeps what tells two subjects of one class apart (two dogs),
  which CLIP, trained to match captions, largely ignores.
- `aesthetic`: the mean predicted LAION aesthetic score of the prompt-kind images (`PROMPT_KINDS`,
  the images `clip_score` averages), on the head's scale (about 1-10).

Both are higher-is-better and reported only when their judge is configured (`evaluator.dino`,
`evaluator.aesthetic`); they are no part of the composite objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evaluator.metrics import clip_i
from evaluator.suites import CONCEPT_KINDS, PROMPT_KINDS, SuiteItem

JUDGE_METRICS = ("dino_i", "aesthetic")


@dataclass(frozen=True)
class JudgeInputs:
    """What the judges measured on one suite's images (None: that judge is not configured).

    dino_emb: DINO embeddings of the concept items' images, in item order (like base_emb for
    the no_concept items); train_dino_emb: of the training images; aesthetic_scores: the head's
    score of every item's image, in item order."""

    dino_emb: torch.Tensor | None = None
    train_dino_emb: torch.Tensor | None = None
    aesthetic_scores: torch.Tensor | None = None


def concept_indices(items: list[SuiteItem]) -> list[int]:
    """The items whose images should show the concept: the ones DINO compares with the training images."""
    return [i for i, it in enumerate(items) if it[0] in CONCEPT_KINDS]


def judge_metrics(items: list[SuiteItem], inputs: JudgeInputs | None) -> dict:
    """{"dino_i": ..., "aesthetic": ...} for the judges that measured (the key absent for one that
    did not; None when its images or references are missing, as clip_i)."""
    if inputs is None:
        return {}
    out: dict = {}
    if inputs.dino_emb is not None:
        n = len(concept_indices(items))
        if inputs.dino_emb.shape[0] != n:
            raise ValueError(f"need one DINO embedding per concept item: got {inputs.dino_emb.shape[0]} for {n} items")
        have = n and inputs.train_dino_emb is not None and len(inputs.train_dino_emb)
        out["dino_i"] = clip_i(inputs.dino_emb, inputs.train_dino_emb) if have else None
    if inputs.aesthetic_scores is not None:
        scores = torch.as_tensor(inputs.aesthetic_scores, dtype=torch.float32).reshape(-1)
        if scores.numel() != len(items):
            raise ValueError(f"need one aesthetic score per item: got {scores.numel()} for {len(items)} items")
        main = [i for i, it in enumerate(items) if it[0] in PROMPT_KINDS] or list(range(len(items)))
        out["aesthetic"] = float(scores[main].mean())
    return out
