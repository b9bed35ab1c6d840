"""On-disk caches shared by every trial of a sweep: VAE latent moments and text embeddings.

Latents: for each image and flip variant, the mean and std of the VAE's latent distribution,
so the trainer draws `mean + std * randn(generator)` exactly as `latent_dist.sample(generator)`
does and the loss curve does not depend on whether the cache is used. Text embeddings: one per
(caption, clip skip), used only while the text encoder is frozen.

Each cache is a folder named by a hash of what it depends on: the model weights and configs, the
data (image paths, sizes, mtimes; the captions) and the preprocessing (target size per image,
crop, flip variants, clip skip). Any change makes a new folder. Files are safetensors written to
a temporary name and renamed under an fcntl lock, so concurrent builders never corrupt them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trainer.config import TrainConfig
from common.files import atomic_write, file_lock
from trainer.data import load_image
from trainer.datasets import TrainData, ensure_class_images, load_train_data
from trainer.text_encoding import encode_prompts
from common.cache_dir import cache_root

CACHE_VERSION = "lorasweep-cache-1"  # bump when the stored layout or the preprocessing code changes
LATENTS_FILE = "latents.safetensors"
TEXT_FILE = "text_embeddings.safetensors"


def default_cache_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root() / "train_cache"


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's config and every tensor of its state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        cfg_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        h.update(json.dumps(cfg_dict, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _tokenizer_fingerprint(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), separators=(",", ":"))
    return hashlib.sha256(f"{vocab}|{tokenizer.model_max_length}".encode()).hexdigest()


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def flip_variants(cfg: TrainConfig) -> list[bool]:
    return [False, True] if cfg.random_flip else [False]


def latent_cache_key(cfg: TrainConfig, vae, data: TrainData, vae_hash: str | None = None) -> str:
    images = []
    for p in data.unique_images():
        st = p.stat()
        images.append([str(p.resolve()), st.st_size, st.st_mtime_ns, list(data.target_sizes[p])])
    return _key({
        "version": CACHE_VERSION, "vae": vae_hash or module_fingerprint(vae), "images": images,
        "resolution": cfg.resolution, "center_crop": cfg.center_crop, "flips": flip_variants(cfg),
        "bucket": [cfg.enable_bucket, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps],
    })


def text_cache_key(tokenizer, text_encoder, captions: list[str], clip_skip: int, te_hash: str | None = None) -> str:
    return _key({
        "version": CACHE_VERSION, "text_encoder": te_hash or module_fingerprint(text_encoder),
        "tokenizer": _tokenizer_fingerprint(tokenizer), "captions": sorted(set(captions)), "clip_skip": clip_skip,
    })


def _load_or_build(folder: Path, filename: str, build) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load `folder/filename`, building it first (once, under a lock) if it is not there."""
    target = folder / filename
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with file_lock(folder / ".lock"):
            if not target.is_file():  # another process may have built it while we waited
                tensors, metadata = build()
                atomic_write(target, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), fsync=False)
    from safetensors import safe_open

    with safe_open(str(target), framework="pt") as fh:
        metadata = fh.metadata() or {}
    return load_file(str(target)), metadata


class LatentCache:
    """Latent moments (mean, std), CPU float32, per (image path, flip)."""

    def __init__(self, folder: Path, tensors: dict[str, torch.Tensor], images: list[str]):
        self.folder = folder
        self._tensors = tensors
        self._index = {p: i for i, p in enumerate(images)}

    def moments(self, path: Path, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._index[str(path.resolve())]
        return self._tensors[f"{i}.{int(flip)}.mean"], self._tensors[f"{i}.{int(flip)}.std"]


class TextCache:
    """Prompt embeddings, CPU float32, per caption (for one clip skip)."""

    def __init__(self, folder: Path, tensors: dict[str, torch.Tensor], captions: list[str]):
        self.folder = folder
        self._tensors = tensors
        self._index = {c: i for i, c in enumerate(captions)}

    def __contains__(self, caption: str) -> bool:
        return caption in self._index

    def embeddings(self, captions: list[str]) -> torch.Tensor:
        return torch.stack([self._tensors[str(self._index[c])] for c in captions])


@torch.no_grad()
def encode_moments(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE latent distribution (before the scaling factor)."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean, dist.std


def ensure_latent_cache(cfg: TrainConfig, vae, data: TrainData, vae_hash: str | None = None) -> LatentCache:
    folder = default_cache_dir(cfg) / f"latents-{latent_cache_key(cfg, vae, data, vae_hash)}"
    images = [str(p.resolve()) for p in data.unique_images()]

    def build():
        tensors = {}
        for i, path in enumerate(data.unique_images()):
            flips = flip_variants(cfg)
            pixels = torch.stack([load_image(path, data.target_sizes[path], True, f, np.random.default_rng(0)) for f in flips])
            mean, std = encode_moments(vae, pixels)
            for j, f in enumerate(flips):
                tensors[f"{i}.{int(f)}.mean"] = mean[j].float().cpu().contiguous()
                tensors[f"{i}.{int(f)}.std"] = std[j].float().cpu().contiguous()
        return tensors, {"images": json.dumps(images), "format": CACHE_VERSION}

    tensors, metadata = _load_or_build(folder, LATENTS_FILE, build)
    return LatentCache(folder, tensors, json.loads(metadata["images"]))


def ensure_text_cache(cfg: TrainConfig, tokenizer, text_encoder, captions: list[str], clip_skip: int,
                      te_hash: str | None = None, chunk: int = 16) -> TextCache:
    captions = sorted(set(captions) | {""})  # "" for caption dropout and unconditional use
    key = text_cache_key(tokenizer, text_encoder, captions, clip_skip, te_hash)
    folder = default_cache_dir(cfg) / f"text-{key}"

    @torch.no_grad()
    def build():
        tensors = {}
        for start in range(0, len(captions), chunk):
            emb = encode_prompts(tokenizer, text_encoder, captions[start : start + chunk], clip_skip)
            for j, e in enumerate(emb):
                tensors[str(start + j)] = e.float().cpu().contiguous()
        return tensors, {"captions": json.dumps(captions), "format": CACHE_VERSION}

    tensors, metadata = _load_or_build(folder, TEXT_FILE, build)
    return TextCache(folder, tensors, json.loads(metadata["captions"]))


def build_caches(cfg: TrainConfig, clip_skips: list[int] | None = None, components=None,
                 device: str | None = None) -> Path:
    """Build every cache `cfg` uses (once per sweep, before trials): class images for prior
    preservation, latents, and text embeddings for cfg.clip_skip plus any `clip_skips` a sweep
    searches. Returns the cache folder. Safe to call from several processes at once."""
    from trainer.model_loading import load_sd_components

    models = components or load_sd_components(cfg.base_model)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for module in (models.vae, models.text_encoder, models.unet):
        module.to(dev)
    ensure_class_images(cfg, models)
    data = load_train_data(cfg)
    if cfg.cache_latents:
        ensure_latent_cache(cfg, models.vae, data)
    if cfg.cache_text_embeddings and not cfg.train_text_encoder:
        te_hash = module_fingerprint(models.text_encoder)
        for skip in sorted({cfg.clip_skip, *(clip_skips or [])}):
            ensure_text_cache(cfg, models.tokenizer, models.text_encoder, data.captions(), skip, te_hash)
    return default_cache_dir(cfg)
