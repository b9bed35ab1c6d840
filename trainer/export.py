"""LoRA export as .safetensors in the diffusers and kohya layouts, and fusing into a full model.

Every file is written atomically (a temporary file in the same folder, then os.replace), so a
reader never sees half a file and a crash leaves the previous export in place.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from common.files import atomic_folder, atomic_write
from trainer.kohya_lora_format import ADAPTER, kohya_metadata, kohya_state_dict

__all__ = ["save_lora_diffusers", "save_lora_kohya", "kohya_metadata", "fuse_lora_into_checkpoint", "restamp_lora_file"]

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# The up (B) projection of each layout: kohya's, diffusers' `save_lora_weights`, peft's own.
UP_WEIGHT_SUFFIXES = ("lora_up.weight", ".up.weight", "lora_B.weight")


def save_lora_diffusers(unet, path: str | Path, text_encoder=None) -> Path:
    """The UNet (and text-encoder) LoRA in diffusers' layout, loadable by `pipe.load_lora_weights(path)`.

    Each model's peft config (rank, alpha, targets) goes into the file's metadata so that
    diffusers rebuilds the same scale alpha / rank on load, whatever the alpha.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER))
    te_layers = te_meta = None
    if text_encoder is not None:
        te_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder, adapter_name=ADAPTER))
        te_meta = adapter_metadata(text_encoder)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".lora-") as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=layers,
            text_encoder_lora_layers=te_layers,
            weight_name=path.name,
            unet_lora_adapter_metadata=adapter_metadata(unet),
            text_encoder_lora_adapter_metadata=te_meta,
        )
        os.replace(Path(tmp) / path.name, path)
    return path


def adapter_metadata(model) -> dict:
    """The model's peft config as file metadata, with sets sorted: diffusers writes a set in its
    iteration order, which string-hash randomisation changes from process to process, so the same
    trial's file would differ between two runs."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in model.peft_config[ADAPTER].to_dict().items()}


def save_lora_kohya(
    unet,
    path: str | Path,
    text_encoder=None,
    metadata: dict[str, str] | None = None,
    scale: float = 1.0,
) -> Path:
    """The LoRA in the kohya layout (AUTOMATIC1111, ComfyUI, kohya sd-scripts; diffusers loads it too).

    `scale` multiplies every up weight, so the file applies the LoRA at that strength when a UI
    uses weight 1. `metadata` (e.g. from `kohya_metadata(cfg)`) must map strings to strings.
    """
    if not (isinstance(scale, (int, float)) and scale == scale and abs(scale) != float("inf")):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    bad = [k for k, v in (metadata or {}).items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; not so for {bad[:5]} (use kohya_metadata)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = kohya_state_dict(unet, text_encoder, float(scale))
    meta = dict(metadata or {})
    if scale != 1.0:
        meta["lorasweep_export_scale"] = str(float(scale))
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def restamp_lora_file(path: str | Path, scale: float = 1.0, metadata: dict[str, str] | None = None) -> Path:
    """Rewrite a LoRA file of either layout in place (atomically): every up weight x `scale` (so a
    UI's weight 1 applies it at that strength, recorded as `lorasweep_export_scale`) and `metadata`
    added to the file's own. The down weights and alphas are left as they are."""
    if not (isinstance(scale, (int, float)) and 0 < scale < float("inf")):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    path = Path(path)
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if scale != 1.0:
        ups = [k for k in tensors if k.endswith(UP_WEIGHT_SUFFIXES)]
        if not ups:
            raise ValueError(f"{path}: no LoRA up weights ({', '.join(UP_WEIGHT_SUFFIXES)}) to scale")
        for k in ups:
            tensors[k] = (tensors[k] * scale).contiguous()
        meta["lorasweep_export_scale"] = str(float(scale))
    meta.update(metadata or {})
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def _load_base_pipeline(base_model: str | Path) -> StableDiffusionPipeline:
    """The full base pipeline (its own scheduler included) for a folder, builtin or single file."""
    from trainer.model_loading import load_sd_components, resolve_base_model

    kind, target = resolve_base_model(str(base_model))
    if kind == "folder":
        return StableDiffusionPipeline.from_pretrained(
            target, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    from diffusers import PNDMScheduler

    comps = load_sd_components(str(base_model))
    # SD 1.x ships PNDM as the pipeline scheduler; the noise schedule itself comes from the model.
    return comps.to_pipeline(PNDMScheduler.from_config(comps.noise_scheduler.config))


def fuse_lora_into_checkpoint(
    base_model_dir: str | Path, lora_path: str | Path, out_path: str | Path, scale: float = 1.0
) -> Path:
    """Write the base model with the LoRA (either layout) merged into its weights at `scale`.

    `out_path` ending in `.safetensors` gives one original-SD (LDM layout) checkpoint file, as
    A1111 and ComfyUI load; any other path gives a diffusers pipeline folder.
    """
    from trainer.ldm_conversion import diffusers_folder_to_ldm_state_dict

    out_path = Path(out_path)
    lora_path = Path(lora_path)
    if not lora_path.is_file():
        raise FileNotFoundError(f"LoRA file {lora_path} does not exist")
    pipe = _load_base_pipeline(base_model_dir)
    pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name, adapter_name="fuse")
    pipe.fuse_lora(lora_scale=float(scale), adapter_names=["fuse"])
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    if out_path.suffix != ".safetensors":
        with atomic_folder(out_path) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
        return out_path
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=f".{out_path.name}.") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        state = diffusers_folder_to_ldm_state_dict(tmp)
    atomic_write(out_path, lambda f: save_file(state, str(f), metadata={"format": "pt", "lorasweep_fused_lora": lora_path.name}))
    return out_path

