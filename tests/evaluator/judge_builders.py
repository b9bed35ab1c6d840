"""Tiny judges that the judge tests build themselves (imported by them; not a test module): a
DINO/DINOv2 model folder as `save_pretrained` writes it, and LAION aesthetic heads in both
published layouts, with what it takes to compute their scores by hand."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import BitImageProcessor, Dinov2Config, Dinov2Model, ViTConfig, ViTImageProcessor, ViTModel

IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
DINO_SIZE = 32  # the tiny models' image size


def tiny_dino(folder: Path, kind: str = "dinov2", processor: bool = True, seed: int = 0):
    """A random tiny `Dinov2Model` (kind dinov2) or DINO `ViTModel` (kind vit) saved into `folder`,
    with the image processor its real counterpart ships (facebook/dinov2-*: BitImageProcessor,
    shortest edge then centre crop; facebook/dino-vits16: ViTImageProcessor, a square resize)
    unless `processor` is False. Returns (folder, the model in eval mode, the processor)."""
    torch.manual_seed(seed)
    if kind == "dinov2":
        model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         image_size=DINO_SIZE, patch_size=8))
        proc = BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": DINO_SIZE, "width": DINO_SIZE},
                                 **IMAGENET)
    else:
        model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   image_size=DINO_SIZE, patch_size=8), add_pooling_layer=False)
        proc = ViTImageProcessor(size={"height": DINO_SIZE, "width": DINO_SIZE}, **IMAGENET)
    model.save_pretrained(folder)
    if processor:
        proc.save_pretrained(folder)
    return folder, model.eval(), proc


MLP_SHAPES = {0: 1024, 2: 128, 4: 64, 6: 16, 7: 1}  # improved-aesthetic-predictor: layer index -> out width


def tiny_head(path: Path, kind: str, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random aesthetic head state dict in the published key layout, saved to `path` (`.pth` with
    torch.save, `.safetensors` with safetensors); returns the state dict."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    if kind == "linear":
        state = {"weight": torch.randn(1, width, generator=g), "bias": torch.randn(1, generator=g)}
    else:
        inp = width
        for i, out in MLP_SHAPES.items():
            state[f"layers.{i}.weight"] = torch.randn(out, inp, generator=g) / inp ** 0.5
            state[f"layers.{i}.bias"] = torch.randn(out, generator=g)
            inp = out
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


def head_by_hand(state: dict[str, torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
    """The head's score of each row: L2-normalise, then each Linear as x @ W.T + b in turn (the
    published MLP has no activations; dropout is off at inference)."""
    x = emb.double() / emb.double().norm(dim=-1, keepdim=True)
    names = ["weight"] if "weight" in state else [f"layers.{i}.weight" for i in MLP_SHAPES]
    for name in names:
        x = x @ state[name].double().T + state[name.replace("weight", "bias")].double()
    return x.reshape(-1)


def dino_cls(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Unit-length CLS embeddings straight from the transformers model."""
    with torch.no_grad():
        cls = model(pixel_values=pixel_values).last_hidden_state[:, 0].double()
    return cls / cls.norm(dim=-1, keepdim=True)
