"""diffusers SD 1.x weights -> one original-SD (LDM) checkpoint, the layout of
`v1-5-pruned-emaonly.safetensors` that AUTOMATIC1111 and ComfyUI load.

Used to export a fused LoRA or a full fine-tune as a single-file checkpoint and to build the tiny
SD's single-file variant. diffusers converts only the other way (`from_single_file`), so the key
map is ours. It follows the diffusers config (levels, layers per block, which levels attend), so
any SD 1.x UNet converts, SD 1.5's own 4-level layout included; VAE folders saved by older
diffusers (`query`/`key`/`value`/`proj_attn` attention names) convert too. Tests check SD 1.5's
key names and the round trip through diffusers' own loader.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

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
# Attention names of the VAE's mid block, current diffusers and (before 0.14) legacy.
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
             "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


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
    attn = "|".join(re.escape(name) for name in _VAE_ATTN)
    if m := re.fullmatch(rf"(encoder|decoder)\.mid_block\.attentions\.0\.({attn})\.(.+)", key):
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


def modules_to_ldm_state_dict(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """The loaded models (diffusers UNet and AutoencoderKL, transformers CLIPTextModel) as one SD 1.x
    checkpoint state dict: what a full fine-tune exports, without writing a diffusers folder first."""
    return diffusers_to_ldm_state_dict(
        unet=unet.state_dict(), vae=vae.state_dict(), text_encoder=text_encoder.state_dict(),
        unet_config=dict(unet.config), vae_config=dict(vae.config),
    )


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
