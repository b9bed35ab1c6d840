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

TORCHMETRICS_SCALE = 100.0
HESSEL_SCALE = 2.5


def _as_matrix(x: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    t = torch.as_tensor(x)
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
