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
from datetime import UTC, datetime

import torch
from diffusers.utils import convert_state_dict_to_kohya
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from common.files import sha256_file
from trainer.config import TrainConfig
from trainer.model_loading import base_model_weights_file
from trainer.preparation import Prepared
from trainer.train_data import dataset_summary, load_train_data

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
        "modelspec.date": datetime.now(UTC).strftime("%Y-%m-%d"),
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
        "ss_training_finished_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        **modelspec(cfg, output_name),
    }
    for key, value in extra.items():
        meta[key if key.startswith(KEPT_PREFIXES) else f"ss_{key}"] = value
    return {k: _string(v) for k, v in meta.items()}
