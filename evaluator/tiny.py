"""A tiny open_clip model that the project builds itself, for tests and CPU demos.

No weights can be downloaded here, so the evaluator's real loading path (open_clip config name +
checkpoint file) is exercised on a ~2 M parameter CLIP in open_clip's own format. It is trained
contrastively on the whole toy world (`toyworld.world`, its held-out colour included), so that
its scores mean something: "a cyan circle" scores higher on a cyan circle than "a blue square".

The trained weights ship in `evaluator/weights/` (fp16, made by `python -m pretrain.tiny_clip`,
sha256 in `tiny-clip.json`) and are copied into the cache; a cache whose recipe no shipped file
matches is built here instead (same code, a few CPU-minutes).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from safetensors import safe_open
from safetensors.torch import load, save_file

from common.cache_dir import cache_root
from common.files import atomic_write, atomic_write_text, file_lock, sha256_bytes
from toyworld.world import all_classes, caption, render_shapes

log = logging.getLogger(__name__)

TINY_CLIP_ID = "builtin:tiny-clip"
TINY_CLIP_NAME = "lorasweep-tiny-clip"  # the open_clip model-config name it is registered under
TINY_CLIP_FILE = "tiny-clip.safetensors"

# open_clip model-config format (same keys as open_clip/model_configs/ViT-B-16-quickgelu.json).
TINY_CLIP_CONFIG: dict = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "patch_size": 4, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}

# Bump when the config, the data or the training recipe changes: a cached file with another
# recipe is rebuilt instead of failing a strict state-dict load later.
TINY_CLIP_RECIPE = "2"
_SEED = 20240611
_STEPS = 3000
_LR = 3e-3  # AdamW peak; linear warm-up then cosine decay
_WARMUP = 20  # steps
_POOL_PER_CLASS = 150  # drawn training images per (colour, shape) class
_IMAGES_PER_CLASS = 2  # per step; more images per step learn shapes faster but cost time

_META_KEY = "lorasweep_tiny_clip"  # safetensors metadata entry describing the build
SHIPPED_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED_FILE = SHIPPED_DIR / TINY_CLIP_FILE
SHIPPED_INFO = SHIPPED_DIR / "tiny-clip.json"

_registered: set[Path] = set()


def _models_dir(root: Path | str | None) -> Path:
    return (Path(root).expanduser() if root is not None else cache_root()) / "models"


def register_tiny_clip(root: Path | str | None = None) -> Path:
    """Write the tiny config as `<root>/models/lorasweep-tiny-clip.json` and register it.

    open_clip names a config after its file stem, and `add_model_config` is its public way to
    add one; writing the file (rather than poking `open_clip.factory._MODEL_CONFIGS`) keeps us
    on that public API. Idempotent per process.
    """
    models = _models_dir(root)
    path = models / f"{TINY_CLIP_NAME}.json"
    text = json.dumps(TINY_CLIP_CONFIG, indent=2, sort_keys=True) + "\n"
    if not path.is_file() or path.read_text() != text:
        models.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text, fsync=False)
    if path not in _registered or TINY_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(path)
        _registered.add(path)
    return path


def _is_current(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
    except Exception:  # unreadable, truncated or foreign: rebuild
        return False
    return meta.get("recipe") == TINY_CLIP_RECIPE


def ensure_tiny_clip(root: Path | str | None = None) -> Path:
    """Path of `<root>/models/tiny-clip.safetensors`, built first if missing or stale.

    Several processes (Ray workers) may call this at once: an exclusive lock on a side file
    makes one of them build while the others wait, then find the file in place.
    """
    register_tiny_clip(root)
    models = _models_dir(root)
    path = models / TINY_CLIP_FILE
    if _is_current(path):
        return path
    with file_lock(models / f"{TINY_CLIP_FILE}.lock"):
        if not _is_current(path):
            start = time.perf_counter()
            state = shipped_tiny_clip_state()
            if state is None:
                state = build_tiny_clip_state()
            atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=tiny_clip_metadata()))
            log.info("wrote %s in %.1f s", path, time.perf_counter() - start)
    return path


def tiny_clip_metadata() -> dict[str, str]:
    # One metadata entry holding sorted JSON: safetensors writes several entries in hash-map
    # order, which would make identical builds differ byte for byte.
    return {_META_KEY: json.dumps({
        "recipe": TINY_CLIP_RECIPE, "open_clip_name": TINY_CLIP_NAME,
        "model_cfg": TINY_CLIP_CONFIG, "seed": _SEED, "steps": _STEPS}, sort_keys=True)}


def shipped_tiny_clip_state() -> dict[str, torch.Tensor] | None:
    """The shipped weights in fp32 when they are this recipe's (and match their sha256), else None."""
    try:
        info = json.loads(SHIPPED_INFO.read_text())
    except (OSError, ValueError):
        return None
    if info.get("recipe") != TINY_CLIP_RECIPE or not _is_current(SHIPPED_FILE):
        return None
    data = SHIPPED_FILE.read_bytes()
    if sha256_bytes(data) != info.get("sha256"):
        log.warning("%s does not match its recorded sha256; building the tiny CLIP instead", SHIPPED_FILE)
        return None
    return {k: v.float().contiguous() for k, v in load(data).items()}


def build_tiny_clip_state(seed: int = _SEED, steps: int = _STEPS) -> dict[str, torch.Tensor]:
    """Seeded init + contrastive training; returns a contiguous fp32 state dict.

    One intra-op thread and a forked RNG make the result bit-identical across runs on one
    machine whatever its core count, and leave the caller's RNG and thread count as they were.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
            _train_contrastive(model, seed, steps)
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}


def _normalize(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC at the model's size -> normalized NCHW, as open_clip's preprocess would."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _train_contrastive(model: torch.nn.Module, seed: int, steps: int) -> None:
    """CLIP-style contrastive training on the drawn shapes.

    Each batch holds `_IMAGES_PER_CLASS` images of every class and each class caption once, so
    repeated captions never act as false negatives (see `_multi_positive_clip_loss`).
    """
    classes = all_classes()
    k, m = len(classes), _IMAGES_PER_CLASS
    size = TINY_CLIP_CONFIG["vision_cfg"]["image_size"]
    images, captions = render_shapes(k * _POOL_PER_CLASS, seed=seed, size=size)
    pixels = _normalize(images)
    pool = {c: [] for c in (caption(*cls) for cls in classes)}
    for i, c in enumerate(captions):
        pool[c].append(i)
    index = torch.tensor([pool[caption(*cls)] for cls in classes])  # (k, pool size)
    tokens = open_clip.get_tokenizer(TINY_CLIP_NAME)([caption(*cls) for cls in classes])
    labels = torch.arange(k).repeat_interleave(m)

    # The 49408 x 32 token table is most of the parameters but only ~10 of its rows are ever
    # used: freezing it (random rows are distinct enough) makes each step much cheaper.
    model.token_embedding.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=_LR, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        cols = torch.randint(0, index.shape[1], (k, m), generator=gen)
        pick = index.gather(1, cols).reshape(-1)  # class-major, matching `labels`
        img_f, txt_f, logit_scale = model(pixels[pick], tokens)
        loss = _multi_positive_clip_loss(logit_scale * img_f @ txt_f.T, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log.debug("tiny CLIP step loss %.3f", loss.item())
    model.eval()


def _multi_positive_clip_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE for (images, captions) logits where several images share a caption.

    Image -> text is plain cross-entropy. Text -> image maximises the softmax mass on all of the
    caption's images. With one image per caption this is exactly open_clip's `ClipLoss`.
    """
    image_loss = torch.nn.functional.cross_entropy(logits, labels)
    per_text = logits.T.log_softmax(dim=1)  # (captions, images)
    positive = labels[None, :] == torch.arange(logits.shape[1])[:, None]
    text_loss = -per_text.masked_fill(~positive, float("-inf")).logsumexp(dim=1).mean()
    return (image_loss + text_loss) / 2


def _lr_factor(step: int, steps: int) -> float:
    if step < _WARMUP:
        return (step + 1) / _WARMUP
    progress = (step - _WARMUP) / max(1, steps - _WARMUP)
    return 0.5 * (1.0 + float(np.cos(np.pi * progress)))
