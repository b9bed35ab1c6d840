"""`DinoEmbedder`: a DINO or DINOv2 vision transformer from a local Hugging Face folder, for the
DreamBooth DINO score (`evaluator.judge_metrics.dino_i`).

The folder is what `save_pretrained` writes: `config.json` (model_type `vit` for DINO such as
facebook/dino-vits16, `dinov2` for DINOv2) and `model.safetensors`, optionally with the
`preprocessor_config.json` of its image processor. The image embedding is the CLS token of the
last layer (after the final layer norm), the feature DINO's own evaluations and DreamBooth use.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from evaluator.image_checks import image_batches, validate_images

MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers")
WEIGHTS = "model.safetensors"
SHARDED_WEIGHTS = "model.safetensors.index.json"
PREPROCESSOR = "preprocessor_config.json"
# What DINO and DINOv2 were trained with, used when the folder has no preprocessor config.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FIX = ("give the folder of a local Hugging Face DINO/DINOv2 model (config.json + model.safetensors), e.g. "
       "AutoModel.from_pretrained('facebook/dinov2-small').save_pretrained(DIR) on a machine with hub access "
       "(the same for facebook/dino-vits16, DreamBooth's DINO)")


class DinoError(ValueError):
    """A DINO folder that cannot be used; the message names the path and the fix."""


def dino_folder_problem(path: str | Path) -> str | None:
    """What is wrong with a DINO model folder, read without loading the model (None: usable).

    Checks the folder, its config (JSON, a supported model_type) and that the weights are a
    readable safetensors file (its header only). Pickle weights (pytorch_model.bin) are refused,
    as the base model's are.
    """
    from safetensors import safe_open

    folder = Path(path).expanduser()
    if not folder.is_dir():
        what = "is a file, not a model folder" if folder.exists() else "not found"
        return f"{folder}: {what}; {FIX}"
    config = folder / "config.json"
    if not config.is_file():
        return f"{folder}: no config.json; {FIX}"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        return f"{config}: unreadable ({err}); {FIX}"
    if model_type not in MODEL_TYPES:
        return (f"{config}: model_type {model_type!r} is not a DINO model (expected one of {', '.join(MODEL_TYPES)}); "
                f"{FIX}")
    if (folder / SHARDED_WEIGHTS).is_file():
        return None
    weights = folder / WEIGHTS
    if not weights.is_file():
        pickle = " (pytorch_model.bin is a pickle, refused: load it once and save_pretrained it again)" \
            if (folder / "pytorch_model.bin").is_file() else ""
        return f"{folder}: no {WEIGHTS}{pickle}; {FIX}"
    try:
        with safe_open(str(weights), framework="pt"):
            pass
    except Exception as err:  # truncated, not safetensors at all: say so before any training
        return f"{weights}: unreadable safetensors file ({err}); {FIX}"
    return None


class DinoEmbedder:
    """A DINO/DINOv2 model in eval mode without gradients: fp16 on CUDA, fp32 on CPU."""

    def __init__(self, model: torch.nn.Module, processor, path: str, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.processor = processor  # the folder's image processor, or None: ImageNet normalisation
        self.path = path
        self.device = device
        self.dtype = dtype
        self.image_size = _square(model.config.image_size)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> DinoEmbedder:
        """Load the model folder at `path` (see `dino_folder_problem`); raises DinoError when unusable."""
        from transformers import AutoImageProcessor, AutoModel

        problem = dino_folder_problem(path)
        if problem:
            raise DinoError(problem)
        folder = Path(path).expanduser().resolve()
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model_type = json.loads((folder / "config.json").read_text())["model_type"]
        # ViTModel adds a pooler (dense + tanh) that DINO never trained; the score reads the CLS token.
        extra = {"add_pooling_layer": False} if model_type == "vit" else {}
        model = AutoModel.from_pretrained(folder, **extra)
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
        model.to(dev, dtype).eval().requires_grad_(False)
        processor = AutoImageProcessor.from_pretrained(folder) if (folder / PREPROCESSOR).is_file() else None
        return cls(model, processor, str(folder), dev, dtype)

    def __repr__(self) -> str:
        return f"DinoEmbedder({self.path!r}, device={str(self.device)!r})"

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 NHWC -> normalized float NCHW on the model's device, in its dtype."""
        validate_images(images)
        if self.processor is not None:
            x = self.processor(images=list(images), return_tensors="pt", input_data_format="channels_last")
            return x["pixel_values"].to(self.device, self.dtype)
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        h, w = self.image_size
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
        # Shortest side to the model's size, then the centre crop: ImageNet eval preprocessing.
        x = TF.center_crop(TF.resize(x, [min(h, w)], interpolation=InterpolationMode.BICUBIC, antialias=True), [h, w])
        x = TF.normalize(x.float() / 255.0, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
        return x.to(self.dtype)

    @torch.inference_mode()
    def embed_images(self, images: np.ndarray, batch_size: int = 32) -> torch.Tensor:
        """L2-normalized float32 CLS embeddings on CPU, shape (N, hidden size)."""
        out = []
        for batch in image_batches(images, batch_size):
            hidden = self.model(pixel_values=self.preprocess(batch)).last_hidden_state
            # Normalize in fp32: fp16 norms of long vectors lose digits.
            out.append(F.normalize(hidden[:, 0].float(), dim=-1).cpu())
        return torch.cat(out)


def _square(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)
