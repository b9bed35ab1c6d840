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
import weakref
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from common.cache_dir import cache_root
from common.files import atomic_write, file_lock
from trainer.config import TrainConfig
from trainer.images import load_image
from trainer.text_encoding import encode_prompts
from trainer.train_data import TrainData

CACHE_VERSION = "lorasweep-cache-1"  # bump when the stored layout or the preprocessing code changes
LATENTS_FILE = "latents.safetensors"
TEXT_FILE = "text_embeddings.safetensors"


def default_cache_dir(cfg: TrainConfig) -> Path:
    return cache_dir_for(cfg.cache_dir)


def cache_dir_for(cache_dir: str | None) -> Path:
    """The caches' folder for a `cache_dir` value (None: <LORASWEEP_CACHE>/train_cache on this machine)."""
    return Path(cache_dir).expanduser() if cache_dir else cache_root() / "train_cache"


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


# A resident tokenizer (trainer.resident_models) serves every trial of its worker: hashing its
# 49k-entry vocabulary again was a quarter of a warm trial's start-up. A vocabulary changes only
# by added tokens, which change its length: the memo is kept per tokenizer, length and max length.
_TOKENIZER_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_fingerprint(tokenizer) -> str:
    shape = (len(tokenizer), tokenizer.model_max_length)
    memo = _TOKENIZER_FINGERPRINTS.get(tokenizer)
    if memo is not None and memo[0] == shape:
        return memo[1]
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), separators=(",", ":"))
    fingerprint = hashlib.sha256(f"{vocab}|{tokenizer.model_max_length}".encode()).hexdigest()
    _TOKENIZER_FINGERPRINTS[tokenizer] = (shape, fingerprint)
    return fingerprint


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def flip_variants(cfg: TrainConfig) -> list[bool]:
    return [False, True] if cfg.random_flip else [False]


def latent_cache_key(cfg: TrainConfig, data: TrainData, vae_fingerprint: str) -> str:
    """From the file versions recorded when the data was checked, so that finding a cache built
    by a sweep's driver needs no access to the dataset."""
    sizes = data.target_sizes(cfg)
    images = []
    for p in data.unique_images():
        info = data.images[p]
        images.append([str(p.resolve()), info.file_bytes, info.mtime_ns, list(sizes[p])])
    return _key({
        "version": CACHE_VERSION, "vae": vae_fingerprint, "images": images,
        "resolution": cfg.resolution, "center_crop": cfg.center_crop, "flips": flip_variants(cfg),
        "bucket": [cfg.enable_bucket, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps],
    })


def text_cache_key(tokenizer, captions: list[str], clip_skip: int, text_encoder_fingerprint: str) -> str:
    return _key({
        "version": CACHE_VERSION, "text_encoder": text_encoder_fingerprint,
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


def ensure_latent_cache(cfg: TrainConfig, vae, data: TrainData, vae_fingerprint: str) -> LatentCache:
    folder = default_cache_dir(cfg) / f"latents-{latent_cache_key(cfg, data, vae_fingerprint)}"
    images = [str(p.resolve()) for p in data.unique_images()]

    def build():
        tensors = {}
        sizes = data.target_sizes(cfg)
        for i, path in enumerate(data.unique_images()):
            flips = flip_variants(cfg)
            pixels = torch.stack([load_image(path, sizes[path], True, f, np.random.default_rng(0)) for f in flips])
            mean, std = encode_moments(vae, pixels)
            for j, f in enumerate(flips):
                tensors[f"{i}.{int(f)}.mean"] = mean[j].float().cpu().contiguous()
                tensors[f"{i}.{int(f)}.std"] = std[j].float().cpu().contiguous()
        return tensors, {"images": json.dumps(images), "format": CACHE_VERSION}

    tensors, metadata = _load_or_build(folder, LATENTS_FILE, build)
    return LatentCache(folder, tensors, json.loads(metadata["images"]))


def ensure_text_cache(cfg: TrainConfig, tokenizer, text_encoder, captions: list[str], clip_skip: int,
                      text_encoder_fingerprint: str, chunk: int = 16) -> TextCache:
    captions = sorted(set(captions) | {""})  # "" for caption dropout and unconditional use
    key = text_cache_key(tokenizer, captions, clip_skip, text_encoder_fingerprint)
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
