"""Base-model loading: one entry point for every way a user names an SD 1.x model.

`base_model` may be a builtin tiny model, a local diffusers folder, a single-file original-SD
checkpoint (`.safetensors` only: pickled `.ckpt` files can run code when loaded), or a Hugging
Face Hub id. Every failure becomes a `BaseModelError` that says what was tried and what to pass
instead, because on a cluster without hub access the hub id is the usual first mistake.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    SchedulerMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from trainer.tiny import TINY_SD_FILE_ID, TINY_SD_ID, TINY_SD_RANDOM_ID, ensure_tiny_sd, ensure_tiny_sd_single_file

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = (".safetensors",)
# What diffusers' from_single_file fetches configs from for an SD 1.x checkpoint given no config.
SD1_DEFAULT_CONFIG_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class _DropEmptyFp32Warning(logging.Filter):
    # diffusers 0.42 ModelMixin.to() warns "should be kept in float32: []" on every dtype cast,
    # even for models that keep nothing in fp32 (from_single_file casts after loading).
    def filter(self, record: logging.LogRecord) -> bool:
        return "kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_DropEmptyFp32Warning())


class BaseModelError(ValueError):
    """The base model could not be resolved or loaded; the message says what to do instead."""


class BaseModelNotFoundError(BaseModelError, FileNotFoundError):
    """A path that is clearly meant to be local does not exist."""


@dataclass
class SDComponents:
    """The parts of an SD 1.x pipeline that training needs, frozen and in eval mode."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler  # training noise schedule, from the model's own scheduler config
    source: str  # what was actually loaded: a folder, a file, or a hub id
    base_model: str = ""  # the name as the user gave it (e.g. "builtin:tiny-sd"), for metadata

    def to_pipeline(self, scheduler: SchedulerMixin | None = None) -> StableDiffusionPipeline:
        """A pipeline sharing these modules (LoRA layers included). Default sampler: DDIM on the
        model's noise schedule, deterministic for a given seed."""
        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler or DDIMScheduler.from_config(self.noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def load_sd_components(
    base_model: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: str | os.PathLike | None = None,
) -> SDComponents:
    """Load tokenizer, text encoder, VAE, UNet and a DDPM noise scheduler for `base_model`.

    `config` is only used for single-file checkpoints: a local diffusers folder (or hub id) that
    holds the pipeline's configs and tokenizer. Without it diffusers guesses the model type and
    fetches that type's configs from the hub.
    """
    name = str(base_model)
    kind, target = resolve_base_model(name)
    if kind == "single_file":
        if name == TINY_SD_FILE_ID:
            config = ensure_tiny_sd()
        comps = _load_single_file(target, config, dtype, name)
    elif kind == "hub":
        comps = _load_diffusers_layout(target, dtype, name, is_hub=True, hub_problem=_probe_hub(target))
    else:
        comps = _load_diffusers_layout(target, dtype, name, is_hub=False)
    for model in (comps.text_encoder, comps.vae, comps.unet):
        model.to(device)  # dtype was applied while loading
        model.eval()
        model.requires_grad_(False)  # the trainer adds (trainable) LoRA layers afterwards
    return comps


def resolve_base_model(name: str) -> tuple[str, str]:
    """Classify `name` as ("folder" | "single_file" | "hub", location), building builtins.

    Raises `BaseModelError` for pickle checkpoints, folders without `model_index.json`, unknown
    file types and unknown builtins; `BaseModelNotFoundError` for missing local-looking paths.
    """
    if name == TINY_SD_ID:
        return "folder", str(ensure_tiny_sd())
    if name == TINY_SD_RANDOM_ID:
        return "folder", str(ensure_tiny_sd(pretrained=False))
    if name == TINY_SD_FILE_ID:
        return "single_file", str(ensure_tiny_sd_single_file())
    if name.startswith("builtin:"):
        raise BaseModelError(f"unknown builtin base model {name!r}; known: {TINY_SD_ID}, {TINY_SD_FILE_ID}, "
                             f"{TINY_SD_RANDOM_ID}")
    path = Path(name).expanduser()
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise BaseModelError(
            f"refusing to load {name!r}: {suffix} checkpoints are Python pickles, which can run code "
            "when loaded. Convert it to .safetensors once, in a place you trust (e.g. "
            "safetensors.torch.save_file(torch.load(path, weights_only=True)['state_dict'], "
            "'model.safetensors')), and pass the .safetensors file."
        )
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BaseModelError(
                f"{name!r} is a folder but not a diffusers pipeline (no model_index.json in {path}); "
                "pass the folder that holds model_index.json, unet/, vae/, text_encoder/, tokenizer/ "
                "and scheduler/, or a single-file .safetensors checkpoint."
            )
        return "folder", str(path.resolve())
    if path.is_file():
        if suffix not in SINGLE_FILE_SUFFIXES:
            raise BaseModelError(f"{name!r}: unsupported file type {suffix!r}; expected a .safetensors file")
        return "single_file", str(path.resolve())
    if _looks_local(name):
        raise BaseModelNotFoundError(f"base model not found: {name!r} ({path}) is no file or folder")
    return "hub", name


def base_model_weights_file(base_model: str) -> Path | None:
    """The file that identifies the base model: a single-file checkpoint itself, or a diffusers
    folder's UNet weights. None for a hub id that is not in the local HF cache."""
    kind, target = resolve_base_model(base_model)
    if kind == "single_file":
        return Path(target)
    if kind == "folder":
        path = Path(target) / "unet" / "diffusion_pytorch_model.safetensors"
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(target, "unet/diffusion_pytorch_model.safetensors")
    return Path(hit) if isinstance(hit, str) else None


def _looks_local(name: str) -> bool:
    # Hub ids are "owner/name": one slash, no leading "/", "." or "~", no file extension.
    return (
        name.startswith(("/", ".", "~", "\\"))
        or name.count("/") > 1
        or "\\" in name
        or Path(name).suffix.lower() in SINGLE_FILE_SUFFIXES + PICKLE_SUFFIXES
    )


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _probe_hub(repo_id: str) -> str | None:
    """None if the hub answers for `repo_id`, else why not, in one line.

    One request without retries: huggingface_hub retries every file download with backoff, which
    makes an unreachable hub fail after ~30 s per file (~5 min for a pipeline, measured).
    """
    from huggingface_hub import constants, model_info

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        model_info(repo_id, timeout=10)
    except Exception as err:
        return _one_line(err)
    return None


def _cached_snapshot(repo_id: str) -> str | None:
    """The local HF-cache folder of `repo_id` (a diffusers repo), if it was downloaded before."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "model_index.json")
    return str(Path(hit).parent) if isinstance(hit, str) else None


def _load_diffusers_layout(
    source: str, dtype: torch.dtype, name: str, is_hub: bool, hub_problem: str | None = None
) -> SDComponents:
    """Each component from its subfolder, so a hub repo downloads only what training uses
    (no safety checker, no EMA or fp16 duplicates). `hub_problem` set: the hub cannot be used,
    so only the local Hugging Face cache is tried."""
    offline = {"local_files_only": True} if hub_problem else {}
    try:
        return SDComponents(
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **offline),
            text_encoder=CLIPTextModel.from_pretrained(
                source, subfolder="text_encoder", dtype=dtype, use_safetensors=True, **offline
            ),
            vae=AutoencoderKL.from_pretrained(
                source, subfolder="vae", dtype=dtype, use_safetensors=True, **offline
            ),
            unet=UNet2DConditionModel.from_pretrained(
                source, subfolder="unet", dtype=dtype, use_safetensors=True, **offline
            ),
            noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", **offline),
            source=source,
            base_model=name,
        )
    except Exception as err:
        if not is_hub:
            raise BaseModelError(f"could not load the diffusers folder {source!r}: {_one_line(err)}") from err
        tried = f"the hub could not be used ({hub_problem}) and the local HF cache" if hub_problem else "that"
        raise BaseModelError(
            f"could not load base model {name!r}: it is not a local folder or file, so it was tried as "
            f"a Hugging Face Hub id; {tried} failed ({_one_line(err)}). Machines without hub access "
            "need a local copy: point base_model at a local diffusers folder (the one holding "
            "model_index.json, e.g. downloaded elsewhere with `hf download "
            f"{name} --local-dir <dir>`), or at a single-file .safetensors checkpoint together with "
            "config=<local diffusers folder>."
        ) from err


def _load_single_file(
    path: str, config: str | os.PathLike | None, dtype: torch.dtype, name: str
) -> SDComponents:
    """An original-SD (LDM) checkpoint via diffusers' from_single_file. With a local `config`
    folder nothing is fetched: models take their configs from it and their weights from the file;
    the tokenizer and scheduler come from the folder. A hub `config` (or none: diffusers then
    picks the SD 1.5 repo) needs the hub, or a copy of that repo in the local HF cache."""
    if config is not None and Path(config).expanduser().is_dir():
        config_dir = str(Path(config).expanduser().resolve())
    else:
        repo = str(config or SD1_DEFAULT_CONFIG_REPO)
        why = _probe_hub(repo)
        config_dir = None if why is None else _cached_snapshot(repo)
        if why is not None and config_dir is None:
            # Left to diffusers, this retries config downloads for minutes (it even drops
            # local_files_only when the configs are not cached).
            raise BaseModelError(
                f"could not load the single-file checkpoint {path!r}: its pipeline configs ({repo!r} "
                f"on the hub) are out of reach ({why}) and not in the local HF cache. Pass "
                "config=<local diffusers SD 1.x folder> (model_index.json, tokenizer/ and the component "
                "configs; its weights are not used)."
            )
    if config_dir:
        where = {"config": config_dir, "local_files_only": True}
    else:
        where = {"config": str(config)} if config else {}
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            path,
            **where,
            dtype=dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except Exception as err:
        how = (
            f"with config={str(config)!r}"
            if config
            else "without config=, so diffusers guessed the model type and fetched its configs from the hub"
        )
        raise BaseModelError(
            f"could not load the single-file checkpoint {path!r} {how}: {_one_line(err)}. Pass "
            "config=<local diffusers SD 1.x folder> (model_index.json, tokenizer/ and the component "
            "configs; its weights are not used)."
        ) from err
    return SDComponents(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        unet=pipe.unet,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        source=path,
        base_model=name,
    )
