"""The kohya LoRA layout that AUTOMATIC1111, ComfyUI and kohya sd-scripts load, and its metadata.

Keys are `lora_unet_<module path with _>` and `lora_te_text_model_<...>`, each with
`.lora_down.weight`, `.lora_up.weight` and a 0-dim `.alpha`; metadata is `ss_*` strings plus a
Stability AI modelspec block. diffusers' `convert_state_dict_to_kohya` does the renaming, but it
(a) needs `unet.`/`text_encoder.` prefixes on peft keys, (b) writes `alpha = rank` whatever the
trained alpha (a LoRA trained with alpha != rank then loads at the wrong strength), and (c) names
SD 1.x text-encoder keys `lora_te1_` (the SDXL convention; A1111 expects `lora_te_` for SD 1.x) and
without the `text_model_` level that transformers 5 no longer has. This module wraps it and fixes
all three.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers.utils import convert_state_dict_to_kohya
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from common.files import sha256_file
from trainer.config import TrainConfig
from trainer.dataset_layouts import Example
from trainer.train_data import TrainData, load_train_data

if TYPE_CHECKING:  # preparation imports this module for dataset_summary
    from trainer.preparation import Prepared

ADAPTER = "default"
UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
KEPT_PREFIXES = ("ss_", "modelspec.", "lorasweep_")  # extra metadata keys not renamed to ss_<key>
# kohya records the optimizer's class path.
_OPTIMIZER_NAMES = {"adamw": "torch.optim.AdamW", "adamw8bit": "bitsandbytes.optim.AdamW8bit"}


class KohyaExportError(ValueError):
    """A model whose LoRA cannot be written in the kohya layout; the message says why."""


# --------------------------------------------------------------------------- weights


def kohya_module_name(prefix: str, module_path: str) -> str:
    """`down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in`."""
    return prefix + module_path.replace(".", "_")


def _real_alphas(model: torch.nn.Module, prefix: str) -> dict[str, float]:
    """Kohya module name -> the alpha that gives the module's actual scale as alpha / rank.

    rsLoRA scales by alpha / sqrt(rank); kohya only knows alpha / rank, so it gets the
    equivalent alpha * sqrt(rank).
    """
    alphas = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_alpha:
            alpha = float(module.lora_alpha[ADAPTER])
            if module.use_rslora.get(ADAPTER, False):
                alpha *= math.sqrt(module.r[ADAPTER])
            alphas[kohya_module_name(prefix, path)] = alpha
    return alphas


def _lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    if ADAPTER not in getattr(model, "peft_config", {}):
        raise KohyaExportError(f"{type(model).__name__} has no LoRA adapter named {ADAPTER!r} to export")
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    extra = [k for k in state if ".lora_A." not in k and ".lora_B." not in k]
    if extra:
        # DoRA magnitudes, trained biases, ...: A1111's plain LoRA loader would drop them silently.
        raise KohyaExportError(f"the kohya LoRA layout holds only lora_A/lora_B weights; cannot export {extra[:3]}")
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def kohya_state_dict(
    unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None, scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """The kohya-layout tensors of the UNet (and text-encoder) LoRA, up weights times `scale`."""
    prefixed = {f"unet.{k}": v for k, v in _lora_weights(unet).items()}
    alphas = _real_alphas(unet, UNET_PREFIX)
    te_has_text_model = False
    if text_encoder is not None:
        prefixed.update({f"text_encoder.{k}": v for k, v in _lora_weights(text_encoder).items()})
        te_has_text_model = hasattr(text_encoder, "text_model")
        # transformers 5 flattened CLIPTextModel: `encoder.layers.0...`; A1111 wants `text_model_encoder_...`.
        te_prefix = TE_PREFIX if te_has_text_model else TE_PREFIX + "text_model_"
        alphas.update(_real_alphas(text_encoder, te_prefix))
    converted = convert_state_dict_to_kohya(prefixed)
    out: dict[str, torch.Tensor] = {}
    for key, value in converted.items():
        if key.startswith("lora_te1_"):
            key = TE_PREFIX + ("" if te_has_text_model else "text_model_") + key.removeprefix("lora_te1_")
        name, _, kind = key.partition(".")
        if kind == "alpha":
            if name not in alphas:
                raise KohyaExportError(f"no LoRA layer found for {name}; the peft model and its state dict disagree")
            value = torch.tensor(alphas[name], dtype=torch.float32)  # 0-dim, the trained alpha
        elif kind == "lora_up.weight" and scale != 1.0:
            value = value * scale
        out[key] = value.contiguous()
    missing = set(alphas) - {k.partition(".")[0] for k in out}
    if missing:
        raise KohyaExportError(f"LoRA layers without exported weights: {sorted(missing)[:3]}")
    return out


# --------------------------------------------------------------------------- metadata


def base_model_weights_file(base_model: str) -> Path | None:
    """The file that identifies the base model: a single-file checkpoint itself, or a diffusers
    folder's UNet weights. None for a hub id that is not in the local HF cache."""
    from trainer.model_loading import resolve_base_model

    kind, target = resolve_base_model(base_model)
    if kind == "single_file":
        return Path(target)
    if kind == "folder":
        path = Path(target) / "unet" / "diffusion_pytorch_model.safetensors"
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(target, "unet/diffusion_pytorch_model.safetensors")
    return Path(hit) if isinstance(hit, str) else None


def dataset_summary(data: TrainData) -> dict:
    """kohya's `ss_dataset_dirs` ({dir: {n_repeats, img_count}}) and `ss_tag_frequency` ({dir:
    {tag: images carrying it}}) of the instance examples, as {"dirs": ..., "tag_frequency": ...}.
    A kohya dataset has one dir per `<repeats>_<name>/` folder; other layouts one, the dataset's."""
    groups: dict[str, list[Example]] = {}
    for e in data.examples:
        name = e.image_path.parent.name if data.kind == "kohya" else data.root.name
        groups.setdefault(name, []).append(e)
    dirs, tags = {}, {}
    for name in sorted(groups):
        captions = {e.image_path: e.caption for e in groups[name]}  # one per image, repeats collapsed
        dirs[name] = {"n_repeats": len(groups[name]) // len(captions), "img_count": len(captions)}
        counts = Counter(t.strip() for c in captions.values() for t in set(c.split(",")) if t.strip())
        tags[name] = dict(sorted(counts.items()))
    return {"dirs": dirs, "tag_frequency": tags}


def _string(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def modelspec(cfg: TrainConfig, title: str) -> dict[str, str]:
    """The Stability AI model-spec block (`modelspec.*`) that UIs read to classify the file."""
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "modelspec.prediction_type": "v" if cfg.prediction_type == "v_prediction" else "epsilon",
    }
    if cfg.trigger_word:
        spec["modelspec.trigger_phrase"] = cfg.trigger_word
    return spec


def _summary_and_model_hash(cfg: TrainConfig, prepared: Prepared | None) -> tuple[dict, str | None]:
    if prepared is not None:
        return prepared.dataset_summary, prepared.base_model_sha256
    weights = base_model_weights_file(cfg.base_model)
    return dataset_summary(load_train_data(cfg, verify=False)), sha256_file(weights) if weights else None


def kohya_metadata(cfg: TrainConfig, prepared: Prepared | None = None, **extra) -> dict[str, str]:
    """kohya `ss_*` metadata and a modelspec block for a LoRA trained with `cfg`.

    The base model's hash and the dataset summary come from `prepared` (see
    `trainer.preparation.prepare`); without it the base model file is hashed and the dataset
    listed here.

    `extra` adds or overrides keys: `steps=1200` becomes `ss_steps`, `output_name="x"` sets
    `ss_output_name` and the modelspec title; keys already starting with `ss_`, `modelspec.` or
    `lorasweep_` are kept as given. Dicts and lists become JSON. Every value is a string, as
    safetensors needs.
    """
    summary, model_hash = _summary_and_model_hash(cfg, prepared)
    full_hash = model_hash or "unknown"
    dirs = summary["dirs"]
    train_te = cfg.train_text_encoder
    output_name = str(extra.get("output_name", "lora"))
    network_args = {"target_modules": cfg.target_modules}
    if cfg.target_modules == "all":
        network_args.update(conv_dim=str(cfg.rank), conv_alpha=str(cfg.lora_alpha))
    meta = {
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_network_module": "networks.lora",
        "ss_network_dim": cfg.rank,
        "ss_network_alpha": cfg.lora_alpha,
        "ss_network_dropout": cfg.lora_dropout,
        "ss_network_args": network_args,
        "ss_network_train_unet_only": not train_te,
        "ss_clip_skip": cfg.clip_skip,  # AUTOMATIC1111 convention: 1 = off, 2 = penultimate layer
        "ss_learning_rate": cfg.learning_rate,
        "ss_unet_lr": cfg.learning_rate,
        "ss_text_encoder_lr": cfg.te_lr if train_te else 0.0,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": cfg.lr_warmup_steps,
        "ss_max_train_steps": cfg.max_train_steps,
        "ss_steps": cfg.max_train_steps,
        "ss_batch_size_per_device": cfg.train_batch_size,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_optimizer": _OPTIMIZER_NAMES[cfg.optimizer],
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_noise_offset": cfg.noise_offset,
        "ss_min_snr_gamma": cfg.snr_gamma,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_seed": cfg.seed,
        "ss_num_train_images": sum(d["img_count"] * d["n_repeats"] for d in dirs.values()),
        "ss_dataset_dirs": dirs,
        "ss_tag_frequency": summary["tag_frequency"],
        "ss_sd_model_name": cfg.base_model,
        "ss_sd_model_hash": full_hash[:10],  # A1111's short hash: first 10 hex digits of sha256
        "ss_new_sd_model_hash": full_hash,
        "ss_output_name": output_name,
        "ss_training_finished_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        **modelspec(cfg, output_name),
    }
    for key, value in extra.items():
        meta[key if key.startswith(KEPT_PREFIXES) else f"ss_{key}"] = value
    return {k: _string(v) for k, v in meta.items()}
