"""The built-in tiny Stable Diffusion 1.x model, for tests and CPU demos.

No weights can be downloaded here, so the real loading paths (diffusers folder, single-file
LDM checkpoint) are exercised on a model with SD 1.5's layout and vocabulary but a few million
parameters: 64 px images, 8x8 latents, a 4-layer CLIP text encoder (so clip skip 2 is
meaningful) and SD 1.5's real BPE tokenizer, rebuilt from the vocabulary that ships in open_clip.

`builtin:tiny-sd` is that architecture pretrained on the toy world (`toyworld/`) by
`python -m pretrain.tiny_sd`: its VAE saw every colour, its UNet and text encoder never the
held-out one; its fp16 weights ship in `trainer/weights/`
with their recipe and sha256 (`recipe.json`). `builtin:tiny-sd-random` is the same architecture,
random-init and seeded, for tests that need only shapes and speed.

The artifacts live under `<cache_root>/models/` and are assembled once; several processes (Ray
workers) may ask at the same time, so builds go to a temporary path under an exclusive lock and
are renamed into place.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from common.cache_dir import cache_root
from common.files import atomic_folder, atomic_write, file_lock, remove_leftovers, sha256_bytes, sha256_file
from trainer.ldm_conversion import diffusers_folder_to_ldm_state_dict

log = logging.getLogger(__name__)

TINY_SD_ID = "builtin:tiny-sd"
TINY_SD_FILE_ID = "builtin:tiny-sd-file"
TINY_SD_RANDOM_ID = "builtin:tiny-sd-random"

# Bump when build_tiny_sd_pipeline, the assembly or the LDM conversion changes: cached copies are
# then rebuilt. The shipped weights' hashes are part of the key as well.
TINY_SD_RECIPE = "tiny-sd-v2/1"
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights" / "tiny-sd"
_WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors")
_FOLDER, _RANDOM_FOLDER = "tiny-sd-toy", "tiny-sd-random"
_SINGLE_FILE = "tiny-sd-toy.safetensors"
_MARKER = "lorasweep_complete.json"

# open_clip's SimpleTokenizer keeps the first 49152 - 256 - 2 merges: with the 512 byte tokens
# and 2 specials that gives CLIP's 49408-token vocabulary (SD 1.5's tokenizer).
_N_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# SD 1.5's scheduler_config.json, plus the keys DDPM/DDIM read (clip_sample off, as SD trains).
SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "timestep_spacing": "leading",
    "trained_betas": None,
}


def _models_dir(root: Path | str | None) -> Path:
    models = (Path(root).expanduser() if root is not None else cache_root()) / "models"
    models.mkdir(parents=True, exist_ok=True)
    return models


# --------------------------------------------------------------------------- tokenizer


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points
    from 256 up, so that every byte is a visible character the BPE merges can refer to."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table  # insertion order = token id order: printable bytes first, then the rest


def _open_clip_bpe_path() -> Path:
    # Located without importing open_clip (it pulls in torchvision and timm).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip is not installed; it ships the CLIP BPE vocabulary the tiny model uses")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def write_clip_bpe_files(dest: Path | str) -> None:
    """Write `vocab.json` + `merges.txt` in the HF CLIP layout, ids as open_clip assigns them."""
    with gzip.open(_open_clip_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
    byte_chars = list(_byte_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / "vocab.json", "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(tokens)}, f, ensure_ascii=False)
    with open(dest / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def build_clip_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_bpe_files(tmp)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77, pad_token=EOS)


# --------------------------------------------------------------------------- models


def build_tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Random-init SD 1.x pipeline; the same seed gives bit-identical weights."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,  # latents, = 64 px / vae scale 8
        in_channels=4,
        out_channels=4,
        # SD 1.5's pattern in small: 2 resnets per level, cross-attention on every level but the
        # deepest, upsamplers after attention; every path of the LDM block numbering is used.
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,  # SD 1.x configs use this field as the head count
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # SD 1.5's VAE layout at 1/16 of its widths: 3 downsamples (scale factor 8) and two
        # ResNets per level (three per decoder level), so that encoding costs about what SD's
        # does next to its UNet (1.4x one UNet forward) and the LDM key numbering is SD's.
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,  # pooled output is read at the eos id (not the legacy argmax)
            pad_token_id=49407,
            projection_dim=32,
            hidden_act="quick_gelu",
        )
    )
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=build_clip_tokenizer(),
        unet=unet.eval(),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def shipped_weights_info() -> dict:
    """The shipped weights' `recipe.json`, after checking every file against its sha256."""
    info_path = SHIPPED_WEIGHTS / "recipe.json"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as err:
        raise RuntimeError(f"the built-in tiny SD's weights are missing or broken ({info_path}: {err}); "
                           "reinstall lorasweep, or rebuild them with `python -m pretrain.tiny_sd "
                           f"--out {SHIPPED_WEIGHTS}`") from None
    for name in _WEIGHT_FILES:
        got = sha256_file(SHIPPED_WEIGHTS / name)
        if got != info["sha256"][name]:
            raise RuntimeError(f"{SHIPPED_WEIGHTS / name}: sha256 {got} does not match recipe.json "
                               f"({info['sha256'][name]}); the file is damaged or was replaced")
    return info


def load_toy_sd_pipeline(weights: Path | None = None) -> StableDiffusionPipeline:
    """The pretrained toy-world SD from the shipped (fp16, hash-checked) weights, in fp32; or from
    another folder of `pretrain.tiny_sd` output (unchecked), e.g. a snapshot taken mid-training."""
    if weights is None:
        shipped_weights_info()
        weights = SHIPPED_WEIGHTS
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(weights / "vae", torch_dtype=torch.float32).eval(),
        text_encoder=CLIPTextModel.from_pretrained(weights / "text_encoder", torch_dtype=torch.float32).eval(),
        tokenizer=build_clip_tokenizer(),
        unet=UNet2DConditionModel.from_pretrained(weights / "unet", torch_dtype=torch.float32).eval(),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# --------------------------------------------------------------------------- cache


def _recipe_key(pretrained: bool) -> str:
    if not pretrained:
        return f"{TINY_SD_RECIPE}/random-seed-0"
    # The recorded hashes (checked against the files when the folder is assembled) name the weights.
    try:
        info = json.loads((SHIPPED_WEIGHTS / "recipe.json").read_text())
    except (OSError, ValueError):
        info = shipped_weights_info()  # raises, saying what is missing and how to rebuild it
    digest = sha256_bytes(json.dumps(info["sha256"], sort_keys=True).encode())[:16]
    return f"{TINY_SD_RECIPE}/{info['recipe']['version']}/{digest}"


def _folder_is_current(folder: Path, key: str) -> bool:
    try:
        return json.loads((folder / _MARKER).read_text()).get("recipe") == key
    except (OSError, ValueError):
        return False


def ensure_tiny_sd(root: Path | str | None = None, pretrained: bool = True) -> Path:
    """`<root>/models/tiny-sd-toy/` (the pretrained toy-world model) or, with pretrained=False,
    `tiny-sd-random/`, as a diffusers pipeline folder, assembled first if missing or stale."""
    models = _models_dir(root)
    name = _FOLDER if pretrained else _RANDOM_FOLDER
    folder = models / name
    key = _recipe_key(pretrained)
    if _folder_is_current(folder, key):
        return folder
    with file_lock(models / f"{name}.lock"):
        if _folder_is_current(folder, key):  # another process built it while we waited
            return folder
        remove_leftovers(models, name)  # a killed build's; only lock holders make them
        with atomic_folder(folder) as tmp:
            pipe = load_toy_sd_pipeline() if pretrained else build_tiny_sd_pipeline()
            pipe.save_pretrained(tmp, safe_serialization=True)
            # Also the classic tokenizer files, as SD 1.5's folder has them (older loaders need them).
            write_clip_bpe_files(tmp / "tokenizer")
            (tmp / _MARKER).write_text(json.dumps({"recipe": key}))
        log.info("assembled the tiny SD pipeline at %s", folder)
    return folder


def _file_is_current(path: Path, key: str) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("lorasweep_recipe") == key
    except Exception:  # missing, truncated or not safetensors: rebuild
        return False


def ensure_tiny_sd_single_file(root: Path | str | None = None) -> Path:
    """`<root>/models/tiny-sd-toy.safetensors`: the pretrained folder's weights as ONE original-SD (LDM)
    checkpoint, the layout of `v1-5-pruned-emaonly.safetensors`. Load it with
    `from_single_file(path, config=ensure_tiny_sd(root))`."""
    folder = ensure_tiny_sd(root)  # takes (and releases) the folder's lock first
    path = folder.parent / _SINGLE_FILE
    key = _recipe_key(True)
    if _file_is_current(path, key):
        return path
    with file_lock(folder.parent / f"{_SINGLE_FILE}.lock"):
        if _file_is_current(path, key):
            return path
        remove_leftovers(folder.parent, _SINGLE_FILE)
        state = diffusers_folder_to_ldm_state_dict(folder)
        atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt", "lorasweep_recipe": key}))
        log.info("wrote the tiny SD single-file checkpoint %s", path)
    return path
