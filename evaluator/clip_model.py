"""`ClipModel`: one open_clip model, its tokenizer and its preprocessing, for inference only.

Images arrive as uint8 NHWC numpy arrays (what samplers hand back) and are preprocessed as
tensors on the model's device: resize (bicubic, antialiased), centre-crop, normalize. That is
open_clip's own eval transform done batched instead of one PIL image at a time; tests check
that both agree. Configs whose transform the tensor path does not reproduce fall back to
open_clip's PIL transform.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from evaluator.defaults import DEFAULT_MODEL, DEFAULT_PRETRAINED
from evaluator.image_checks import image_batches, validate_images
from evaluator.tiny import TINY_CLIP_ID, TINY_CLIP_NAME, ensure_tiny_clip, register_tiny_clip

_SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip reads config and weights from these itself
_INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


def _validate_texts(texts: object) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError("no texts to embed: got an empty list")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a string, got {type(t).__name__}")
    return list(texts)


def _resolve(model: str, pretrained: str | None) -> tuple[str, str | None]:
    """(open_clip model name, checkpoint tag or path) for a user's `model`/`pretrained` pair."""
    if model.startswith("builtin:"):
        if model != TINY_CLIP_ID:
            raise ValueError(f"unknown builtin CLIP model {model!r}; "
                             f"the only builtin is {TINY_CLIP_ID!r}")
        if pretrained is None or pretrained == DEFAULT_PRETRAINED:
            return TINY_CLIP_NAME, str(ensure_tiny_clip())
        if os.path.isfile(os.path.expanduser(pretrained)):
            register_tiny_clip()
            return TINY_CLIP_NAME, os.path.expanduser(pretrained)
        raise ValueError(f"{TINY_CLIP_ID} takes no pretrained tag ({pretrained!r}): pass None "
                         "to use the built weights, or the path of a checkpoint file")
    if model.startswith(_SCHEMAS):
        return model, None
    name = model.replace("/", "-")  # open_clip accepts "ViT-L/14" for "ViT-L-14"
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        maybe = f" Did you mean {close}?" if close else ""
        raise ValueError(f"unknown CLIP model {model!r}: not an open_clip model config "
                         f"(see open_clip.list_models()) nor the builtin {TINY_CLIP_ID!r}.{maybe}")
    if pretrained is None:
        return name, None
    if os.path.isfile(os.path.expanduser(pretrained)):
        return name, os.path.expanduser(pretrained)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ValueError(f"pretrained {pretrained!r} for CLIP model {name!r} is neither a file nor "
                         f"a known tag; tags: {tags}")
    return name, pretrained


class ClipModel:
    """An open_clip model in eval mode without gradients: fp16 on CUDA, fp32 on CPU."""

    def __init__(self, model: torch.nn.Module, tokenizer, pil_preprocess, name: str,
                 pretrained: str | None, device: torch.device, precision: str):
        self.model = model
        self.tokenizer = tokenizer
        self.pil_preprocess = pil_preprocess  # open_clip's own eval transform (PIL in, tensor out)
        self.name = name  # as the caller gave it, e.g. "builtin:tiny-clip"
        self.pretrained = pretrained  # the tag or checkpoint path actually loaded
        self.device = device
        self.input_dtype = open_clip.get_input_dtype(precision) or torch.float32
        self.preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))

    @classmethod
    def load(cls, model: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED,
             device: str | None = None) -> ClipModel:
        """Load `model` with `pretrained` weights.

        model: an open_clip config name (`open_clip.list_models()`), `hf-hub:org/repo`,
            `local-dir:/path`, or `builtin:tiny-clip` (the project's tiny CLIP, built on first use).
        pretrained: an open_clip tag for that model (e.g. "openai"), the path of a checkpoint
            file (.safetensors preferred), or None for random weights. Ignored for `hf-hub:` and
            `local-dir:`; for the builtin only None/"openai" (built weights) or a path.
        device: "cuda", "cpu", ...; default CUDA when available.
        """
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        name, weights = _resolve(model, pretrained)
        # fp16 (open_clip's OpenAI-style mixed precision) halves GPU memory and time; CPUs lack
        # fast fp16 kernels.
        precision = "fp16" if dev.type == "cuda" else "fp32"
        net, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=weights, precision=precision, device=dev)
        net.eval().requires_grad_(False)
        tokenizer = open_clip.get_tokenizer(name)
        return cls(net, tokenizer, preprocess, model, weights, dev, precision)

    def __repr__(self) -> str:
        return (f"ClipModel({self.name!r}, pretrained={self.pretrained!r}, "
                f"device={str(self.device)!r})")

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.preprocess_cfg["size"]
        return (size, size) if isinstance(size, int) else tuple(size)

    def _tensor_path_ok(self) -> bool:
        cfg = self.preprocess_cfg
        h, w = self.image_size
        square_shortest = cfg.get("resize_mode") == "shortest" and h == w
        return (square_shortest or cfg.get("resize_mode") == "squash") and \
            cfg.get("interpolation") in _INTERPOLATIONS

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 NHWC -> normalized float NCHW on the model's device, in the model's input dtype."""
        validate_images(images)
        if not self._tensor_path_ok():
            x = torch.stack([self.pil_preprocess(Image.fromarray(im)) for im in images])
            return x.to(self.device, self.input_dtype)
        cfg = self.preprocess_cfg
        h, w = self.image_size
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
        mode = _INTERPOLATIONS[cfg["interpolation"]]
        # Resize while still uint8, as PIL does: torchvision's antialiased kernels follow PIL's
        # filters, and the results agree within 1-2 levels (tests/evaluator/test_evaluator.py).
        if cfg["resize_mode"] == "squash":
            x = TF.resize(x, [h, w], interpolation=mode, antialias=True)
        else:
            x = TF.center_crop(TF.resize(x, [h], interpolation=mode, antialias=True), [h, w])
        x = TF.normalize(x.float() / 255.0, mean=list(cfg["mean"]), std=list(cfg["std"]))
        return x.to(self.input_dtype)

    @torch.inference_mode()
    def embed_images(self, images: np.ndarray, batch_size: int = 32) -> torch.Tensor:
        """L2-normalized float32 image embeddings on CPU, shape (N, D)."""
        return torch.cat([self._normalized(self.model.encode_image(self.preprocess(batch)))
                          for batch in image_batches(images, batch_size)])

    @torch.inference_mode()
    def embed_image_list(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Embed several uint8 NHWC arrays (their sizes may differ) in ONE forward pass: each is
        preprocessed to the model's size, then all rows go through the model together.
        Returns one L2-normalized float32 CPU tensor per array. The caller bounds the total."""
        for a in arrays:
            validate_images(a)
        x = torch.cat([self.preprocess(a) for a in arrays])
        emb = self._normalized(self.model.encode_image(x))
        return list(torch.split(emb, [len(a) for a in arrays]))

    @torch.inference_mode()
    def embed_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalized float32 text embeddings on CPU, shape (N, D). Texts longer than the
        model's context (77 tokens for CLIP) are truncated by open_clip's tokenizer."""
        texts = _validate_texts(texts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[start:start + batch_size]).to(self.device)
            out.append(self._normalized(self.model.encode_text(tokens)))
        return torch.cat(out)

    @staticmethod
    def _normalized(features: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32: fp16 norms of 768-d vectors lose ~3 digits.
        return F.normalize(features.float(), dim=-1).cpu()
