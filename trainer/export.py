"""LoRA export as .safetensors, written atomically (temporary file + rename)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def save_lora_diffusers(unet, path: str | Path) -> Path:
    """The UNet LoRA in diffusers' layout, loadable by `pipe.load_lora_weights(path)`.

    The peft config (rank, alpha, targets) goes into the file's metadata so that diffusers
    rebuilds the same scale alpha / rank on load, whatever the alpha.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    metadata = unet.peft_config["default"].to_dict()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".lora-") as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=layers,
            weight_name=path.name,
            unet_lora_adapter_metadata=metadata,
        )
        os.replace(Path(tmp) / path.name, path)
    return path
