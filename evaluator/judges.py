"""`Judges`: the optional judges beside an evaluator's CLIP model, a DINO/DINOv2 model
(`evaluator.dino`) and a LAION aesthetic head (`evaluator.aesthetic`), loaded once per evaluator
(the Ray actor or a trial's in-process scorer); `judge_problems` checks their paths cheaply,
before any training. The metrics themselves are pure (`evaluator.judge_metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from evaluator.aesthetic import AestheticError, AestheticHead, head_format, read_head_state, width_mismatch
from evaluator.dino import DinoEmbedder, dino_folder_problem
from evaluator.judge_metrics import JudgeInputs, concept_indices
from evaluator.suites import SuiteItem

if TYPE_CHECKING:  # open_clip is loaded by whoever made the ClipModel; the spec checks need none
    from evaluator.clip_model import ClipModel


@dataclass
class Judges:
    """The loaded judges; either may be None (not configured)."""

    dino: DinoEmbedder | None = None
    aesthetic: AestheticHead | None = None

    @classmethod
    def load(cls, dino: str | None, aesthetic: str | None, clip: ClipModel) -> Judges | None:
        """The configured judges (None when neither is), DINO on the CLIP model's device. The
        aesthetic head must take `clip`'s embedding width (AestheticError naming both otherwise)."""
        if not dino and not aesthetic:
            return None
        head = AestheticHead.load(aesthetic, clip_width(clip), clip.name) if aesthetic else None
        return cls(DinoEmbedder.load(dino, device=str(clip.device)) if dino else None, head)

    @property
    def config(self) -> dict[str, str | None]:
        return {"dino": self.dino.path if self.dino else None,
                "aesthetic": self.aesthetic.path if self.aesthetic else None}

    def reference(self, images: np.ndarray) -> torch.Tensor | None:
        """DINO embeddings of reference (training) images, to compute once per reference like CLIP-I's."""
        return self.dino.embed_images(images) if self.dino is not None else None

    def inputs(self, items: list[SuiteItem], images: np.ndarray, image_emb: torch.Tensor,
               train_dino_emb: torch.Tensor | None) -> JudgeInputs:
        """What `judge_metrics` needs for one suite's images: DINO embeddings of the concept items
        only (the others never meet the training images) and the head's score of every item."""
        dino_emb = None
        if self.dino is not None:
            where = concept_indices(items)
            dino_emb = (self.dino.embed_images(images[where]) if where
                        else torch.zeros((0, self.dino.model.config.hidden_size)))
        scores = self.aesthetic(image_emb) if self.aesthetic is not None else None
        return JudgeInputs(dino_emb, train_dino_emb, scores)


def clip_width(clip: ClipModel) -> int:
    """The width of `clip`'s embeddings (image and text share it), from one text: cheap and works for
    every open_clip model, whatever its config calls the width."""
    return int(clip.embed_texts(["x"]).shape[1])


def config_width(model: str) -> int | None:
    """The embedding width of CLIP `model` from its open_clip config, without loading it; None when
    only loading tells (hf-hub:, local-dir:) or the name is unknown (reported elsewhere)."""
    from evaluator.tiny import TINY_CLIP_CONFIG, TINY_CLIP_ID

    if model == TINY_CLIP_ID:
        return int(TINY_CLIP_CONFIG["embed_dim"])
    if model.startswith(("hf-hub:", "local-dir:", "builtin:")):
        return None
    import open_clip

    config = open_clip.get_model_config(model.replace("/", "-"))
    return int(config["embed_dim"]) if config else None


def judge_problems(dino: str | None, aesthetic: str | None, clip_model: str) -> dict[str, str]:
    """{"dino" or "aesthetic": what is wrong} for configured judges, read without loading a model:
    the DINO folder's config and weights header, the head file's keys and (when `clip_model`'s
    config tells it) its width against the CLIP model's."""
    out = {}
    if dino:
        problem = dino_folder_problem(dino)
        if problem:
            out["dino"] = problem
    if aesthetic:
        try:
            state = read_head_state(aesthetic)
            kind = head_format(state, str(aesthetic))
            width = int(state["layers.0.weight" if kind == "mlp" else "weight"].shape[1])
            clip = config_width(clip_model)
            if clip is not None and clip != width:
                out["aesthetic"] = width_mismatch(aesthetic, width, clip, clip_model)
        except AestheticError as err:
            out["aesthetic"] = str(err)
    return out
