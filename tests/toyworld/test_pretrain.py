"""The pretraining script of the built-in tiny SD: its world, and that its phases learn."""

import copy

import numpy as np
import torch

from pretrain.tiny_sd import RECIPE, encode_latents, train_unet, train_vae, world_data
from toyworld.world import HELD_OUT_COLOR
from trainer.tiny import build_tiny_sd_pipeline


def test_pretraining_world_leaves_out_the_held_out_colour():
    recipe = copy.deepcopy(RECIPE)
    recipe["world"]["images"] = 300
    pixels, captions = world_data(recipe)
    assert pixels.shape == (300, 3, 64, 64) and -1 <= pixels.min() and pixels.max() <= 1
    assert not any(HELD_OUT_COLOR in c for c in captions)
    assert HELD_OUT_COLOR not in recipe["world"]["colors"]
    colourless = [c for c in captions if not any(k in c for k in recipe["world"]["colors"])]
    assert 0 < len(colourless) < 0.25 * len(captions)  # some captions name only the shape


def test_a_few_steps_of_each_phase_lower_the_loss():
    torch.manual_seed(0)
    recipe = copy.deepcopy(RECIPE)
    recipe["world"]["images"] = 64
    pixels, captions = world_data(recipe)
    pipe = build_tiny_sd_pipeline()
    vae_losses = train_vae(pipe.vae, pixels, {**recipe["vae"], "steps": 40, "warmup": 5}, seed=1)
    assert np.mean(vae_losses[-5:]) < 0.9 * np.mean(vae_losses[:5])
    latents = encode_latents(pipe.vae, pixels)
    latents = latents / latents.std()
    before = pipe.unet.conv_in.weight.detach().clone()
    losses, ema_unet, _ = train_unet(pipe, latents, captions, {**recipe["unet"], "steps": 40, "batch": 16,
                                                                  "warmup": 5}, seed=2)
    assert np.mean(losses[-8:]) < 0.9 * np.mean(losses[:8])
    # The EMA follows the trained weights without being them.
    ema = ema_unet["conv_in.weight"]
    assert not torch.equal(ema, before) and not torch.equal(ema, pipe.unet.conv_in.weight)
