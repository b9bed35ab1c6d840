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

import contextlib
import fcntl
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from trainer.checkpoint import sha256_file

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


def cache_root() -> Path:
    return Path(os.environ.get("LORASWEEP_CACHE", "~/.cache/lorasweep")).expanduser()


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


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    # flock conflicts between open file descriptions even within one process: never nest two
    # _exclusive() on the same path.
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_leftovers(models: Path, prefix: str) -> None:
    # Temporary builds of a killed process; only lock holders create them, so none is in use.
    for stale in models.glob(prefix + "*"):
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()


def _recipe_key(pretrained: bool) -> str:
    if not pretrained:
        return f"{TINY_SD_RECIPE}/random-seed-0"
    # The recorded hashes (checked against the files when the folder is assembled) name the weights.
    try:
        info = json.loads((SHIPPED_WEIGHTS / "recipe.json").read_text())
    except (OSError, ValueError):
        info = shipped_weights_info()  # raises, saying what is missing and how to rebuild it
    digest = hashlib.sha256(json.dumps(info["sha256"], sort_keys=True).encode()).hexdigest()[:16]
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
    with _exclusive(models / f"{name}.lock"):
        if _folder_is_current(folder, key):  # another process built it while we waited
            return folder
        _remove_leftovers(models, f".{name}.tmp-")
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            pipe = load_toy_sd_pipeline() if pretrained else build_tiny_sd_pipeline()
            pipe.save_pretrained(tmp, safe_serialization=True)
            # Also the classic tokenizer files, as SD 1.5's folder has them (older loaders need them).
            write_clip_bpe_files(tmp / "tokenizer")
            (tmp / _MARKER).write_text(json.dumps({"recipe": key}))
            if folder.exists():  # an older recipe's build
                shutil.rmtree(folder)
            os.replace(tmp, folder)
            log.info("assembled the tiny SD pipeline at %s", folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
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
    with _exclusive(folder.parent / f"{_SINGLE_FILE}.lock"):
        if _file_is_current(path, key):
            return path
        _remove_leftovers(folder.parent, f".{_SINGLE_FILE}.tmp-")
        state = diffusers_folder_to_ldm_state_dict(folder)
        fd, tmp = tempfile.mkstemp(prefix=f".{_SINGLE_FILE}.tmp-", dir=folder.parent)
        os.close(fd)
        os.chmod(tmp, 0o644)
        try:
            save_file(state, tmp, metadata={"format": "pt", "lorasweep_recipe": key})
            os.replace(tmp, path)
            log.info("wrote the tiny SD single-file checkpoint %s", path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


# --------------------------------------------------------------------------- diffusers -> LDM

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_resnet(rest: str, table: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def unet_key_to_ldm(key: str, layers_per_block: int, up_blocks_with_attn: set[int]) -> str:
    """One diffusers UNet key -> its name under `model.diffusion_model.` in an SD 1.x checkpoint.

    LDM numbers blocks flat: input_blocks[0] is conv_in, then per level `layers_per_block`
    (resnet, attention) pairs and one downsampler; output_blocks have one more pair per level
    and put the upsampler after the attention (index 2) or, with none, after the resnet (1).
    """
    n = layers_per_block + 1
    for prefix, ldm in _UNET_FIXED.items():
        if key.startswith(prefix + "."):
            return ldm + key[len(prefix) :]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"input_blocks.{1 + b * n + j}.0.{_rename_resnet(rest, _UNET_RESNET)}"
        return f"input_blocks.{1 + b * n + j}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * n + layers_per_block}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename_resnet(m[2], _UNET_RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"output_blocks.{b * n + j}.0.{_rename_resnet(rest, _UNET_RESNET)}"
        return f"output_blocks.{b * n + j}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        return f"output_blocks.{b * n + layers_per_block}.{2 if b in up_blocks_with_attn else 1}.conv.{m[2]}"
    raise KeyError(f"no SD 1.x (LDM) name for UNet key {key!r}")


def vae_key_to_ldm(key: str, num_blocks: int) -> str:
    """One diffusers AutoencoderKL key -> its name under `first_stage_model.`. The LDM decoder
    numbers its levels from the bottom, diffusers from the top: up_blocks.i is up.(n-1-i)."""
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_rename_resnet(m[3], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        level = num_blocks - 1 - int(m[1])
        return f"decoder.up.{level}.block.{m[2]}.{_rename_resnet(m[3], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename_resnet(m[3], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_[qkv]|to_out\.0)\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\..+|(post_)?quant_conv\..+", key):
        return key
    raise KeyError(f"no SD 1.x (LDM) name for VAE key {key!r}")


def diffusers_to_ldm_state_dict(
    unet: dict[str, torch.Tensor],
    vae: dict[str, torch.Tensor],
    text_encoder: dict[str, torch.Tensor],
    unet_config: dict,
    vae_config: dict,
) -> dict[str, torch.Tensor]:
    """Three diffusers/transformers state dicts -> one SD 1.x checkpoint state dict."""
    lpb = unet_config["layers_per_block"]
    n_up = len(unet_config["up_block_types"])
    with_attn = {i for i, t in enumerate(unet_config["up_block_types"]) if "CrossAttn" in t}
    if not isinstance(lpb, int) or n_up != len(unet_config["down_block_types"]):
        raise ValueError("only SD 1.x-style UNets (one int layers_per_block, symmetric blocks) convert")
    out: dict[str, torch.Tensor] = {}
    for k, v in unet.items():
        out["model.diffusion_model." + unet_key_to_ldm(k, lpb, with_attn)] = v
    n_vae = len(vae_config["block_out_channels"])
    for k, v in vae.items():
        name = vae_key_to_ldm(k, n_vae)
        # LDM's VAE attention uses 1x1 convolutions where diffusers uses linear layers.
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", name) and v.ndim == 2:
            v = v[:, :, None, None]
        out["first_stage_model." + name] = v
    for k, v in text_encoder.items():
        if k.endswith("position_ids"):  # a buffer, recomputed by transformers
            continue
        # transformers 5 saves CLIPTextModel flattened; checkpoints keep the 4.x `text_model.` level.
        out["cond_stage_model.transformer.text_model." + k.removeprefix("text_model.")] = v
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def diffusers_folder_to_ldm_state_dict(folder: Path | str) -> dict[str, torch.Tensor]:
    """Read the safetensors of a diffusers SD 1.x folder and convert them (no model is built)."""
    folder = Path(folder)
    return diffusers_to_ldm_state_dict(
        unet=load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"),
        vae=load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"),
        text_encoder=load_file(folder / "text_encoder" / "model.safetensors"),
        unet_config=json.loads((folder / "unet" / "config.json").read_text()),
        vae_config=json.loads((folder / "vae" / "config.json").read_text()),
    )
