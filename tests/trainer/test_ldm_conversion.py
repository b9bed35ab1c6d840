"""The diffusers -> LDM (single-file) converter on SD 1.5's own block layout, not only the tiny one:
SD 1.5's key names come out, and diffusers' own single-file converter turns them back unchanged."""

import re

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

from trainer.ldm_conversion import diffusers_to_ldm_state_dict, vae_key_to_ldm


def _sd15_shaped_unet() -> UNet2DConditionModel:
    """SD 1.5's UNet config (4 levels, 2 resnets each, attention on the first 3) at tiny widths."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 8, 16, 16), layers_per_block=2, cross_attention_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=2, norm_num_groups=4,
    )


def _vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(4, 8, 8, 8), layers_per_block=2, norm_num_groups=4, latent_channels=4)


def _convert(unet, vae):
    return diffusers_to_ldm_state_dict(unet.state_dict(), vae.state_dict(), {}, dict(unet.config), dict(vae.config))


def test_sd15_layout_gives_sd15_key_names_and_round_trips():
    unet, vae = _sd15_shaped_unet(), _vae()
    ldm = _convert(unet, vae)
    blocks = {kind: {int(m[1]) for k in ldm if (m := re.match(rf"model\.diffusion_model\.{kind}\.(\d+)\.", k))}
              for kind in ("input_blocks", "output_blocks", "middle_block")}
    assert blocks == {"input_blocks": set(range(12)), "output_blocks": set(range(12)), "middle_block": {0, 1, 2}}
    # Where SD 1.5's v1-5-pruned-emaonly.safetensors has its down- and upsamplers.
    for key in ("input_blocks.3.0.op.weight", "input_blocks.6.0.op.weight", "input_blocks.9.0.op.weight",
                "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
                "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "output_blocks.11.1.proj_out.weight",
                "time_embed.0.weight", "out.2.weight", "middle_block.1.proj_in.weight"):
        assert "model.diffusion_model." + key in ldm, key
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    original = unet.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    vae_back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    vae_original = vae.state_dict()
    assert vae_back.keys() == vae_original.keys()
    assert all(torch.equal(vae_back[k].reshape(vae_original[k].shape), vae_original[k]) for k in vae_original)


def test_legacy_vae_attention_names_convert_alike():
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for new, old in legacy.items():
        for coder in ("encoder", "decoder"):
            assert (vae_key_to_ldm(f"{coder}.mid_block.attentions.0.{old}.weight", 4)
                    == vae_key_to_ldm(f"{coder}.mid_block.attentions.0.{new}.weight", 4))
