"""Pretrain the built-in tiny SD on the toy world without its held-out colour.

    python -m pretrain.tiny_sd --out toyworld/weights/tiny-sd     # the shipped recipe (~35 CPU-min)

The recipe (every number below, the seed and the world) is written next to the weights as
`recipe.json`, with the sha256 of each weight file. Two phases, as SD was made:
1. the VAE learns to reconstruct the whole world's pictures, the held-out colour included (MSE +
   a small KL term): like SD's, it is a generic codec; one that never saw the held-out colour
   cannot decode it, which would make the LoRA task impossible;
2. the UNet and the text encoder learn to denoise the VAE's latents jointly (epsilon
   prediction, min-SNR weighting, caption dropout so that classifier-free guidance works),
   with an EMA of both; the EMA weights are shipped. The text encoder is frozen afterwards,
   for LoRA training, as in SD.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from common.files import sha256_file
from toyworld.world import HELD_OUT_COLOR, KNOWN_COLORS, render_world
from trainer.text_encoding import encode_token_ids, tokenize
from trainer.tiny import SD15_SCHEDULER_CONFIG, build_tiny_sd_pipeline

log = logging.getLogger("pretrain.tiny_sd")

RECIPE_VERSION = "toy-sd-2"
RECIPE = {
    "version": RECIPE_VERSION,
    "seed": 0,
    "world": {"images": 6000, "seed": 101, "colors": list(KNOWN_COLORS), "held_out": HELD_OUT_COLOR,
              "background_in_caption": 0.5, "color_dropped_from_caption": 0.1},
    "vae": {"steps": 5000, "batch": 16, "lr": 2e-3, "kl_weight": 1e-6, "warmup": 50, "images": 6000, "seed": 202},
    "unet": {"steps": 5000, "batch": 64, "lr": 1e-3, "text_encoder_lr": 5e-4, "warmup": 100,
             "caption_dropout": 0.1, "snr_gamma": 5.0, "ema_decay": 0.999, "final_lr_fraction": 0.1},
}


def _lr_lambda(warmup: int, steps: int, final: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def _pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], as the VAE takes them."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def world_data(recipe: dict) -> tuple[torch.Tensor, list[str]]:
    """Pixels in [-1, 1] (NCHW) and captions of the pretraining world."""
    w = recipe["world"]
    images, captions, scenes = render_world(w["images"], w["seed"], tuple(w["colors"]),
                                            background_in_caption=w["background_in_caption"])
    rng = np.random.default_rng(w["seed"] + 1)
    # A few captions without their colour ("a circle"), so a prompt whose colour word the model
    # does not know still draws the asked shape in some known colour.
    captions = [c.replace(f" {s.color} ", " ", 1) if rng.random() < w["color_dropped_from_caption"] else c
                for c, s in zip(captions, scenes)]
    return _pixels(images), captions


def train_vae(vae, pixels: torch.Tensor, cfg: dict, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg["warmup"], cfg["steps"], 0.05))
    losses = []
    for step in range(cfg["steps"]):
        x = pixels[torch.randint(0, len(pixels), (cfg["batch"],), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + cfg["kl_weight"] * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == cfg["steps"] - 1:
            log.info("vae step %d/%d loss %.4f", step, cfg["steps"], np.mean(losses[-100:]))
    vae.eval().requires_grad_(False)
    return losses


def whole_world_pixels(cfg: dict) -> torch.Tensor:
    images, _, _ = render_world(cfg["images"], cfg["seed"])  # every colour, the held-out one included
    return _pixels(images)


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(pixels[i:i + batch]).latent_dist.mean for i in range(0, len(pixels), batch)])


def train_unet(pipe, latents: torch.Tensor, captions: list[str], cfg: dict, seed: int,
               log_every: int = 100, on_snapshot=None, snapshot_every: int = 0) -> tuple[list[float], dict, dict]:
    """Joint UNet + text-encoder denoising training; returns losses and the EMA state dicts.
    `on_snapshot(step, ema_unet, ema_te)` is called every `snapshot_every` steps (to look early)."""
    unet, te, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    gen = torch.Generator().manual_seed(seed)
    noise_sched = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    vocab = sorted(set(captions)) + [""]
    ids = tokenize(tok, vocab)
    cap_index = torch.tensor([vocab.index(c) for c in captions])
    empty = len(vocab) - 1
    unet.train().requires_grad_(True)
    te.train().requires_grad_(True)
    emb = te.get_input_embeddings().weight
    other_te = [p for p in te.parameters() if p is not emb]
    opt = torch.optim.AdamW([
        {"params": list(unet.parameters()), "lr": cfg["lr"], "weight_decay": 1e-2},
        {"params": other_te, "lr": cfg["text_encoder_lr"], "weight_decay": 1e-2},
        # No decay on the token table: rows of words the world never uses keep their init.
        {"params": [emb], "lr": cfg["text_encoder_lr"], "weight_decay": 0.0},
    ])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(cfg["warmup"], cfg["steps"], cfg["final_lr_fraction"]))
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    ema_unet.requires_grad_(False)
    ema_te.requires_grad_(False)
    pairs = [(list(ema_unet.parameters()), list(unet.parameters())),
             (list(ema_te.parameters()), list(te.parameters()))]
    losses = []
    for step in range(cfg["steps"]):
        pick = torch.randint(0, len(latents), (cfg["batch"],), generator=gen)
        drop = torch.rand(cfg["batch"], generator=gen) < cfg["caption_dropout"]
        cond = encode_token_ids(te, ids[torch.where(drop, empty, cap_index[pick])])
        x0 = latents[pick]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg["batch"],), generator=gen)
        pred = unet(noise_sched.add_noise(x0, noise, t), t, cond).sample
        snr = compute_snr(noise_sched, t)
        weight = torch.clamp(snr, max=cfg["snr_gamma"]) / snr  # min-SNR-gamma, epsilon target
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        decay = min(cfg["ema_decay"], (1 + step) / (10 + step))  # warm-up, as diffusers' EMAModel
        with torch.no_grad():
            for ema, live in pairs:
                torch._foreach_lerp_(ema, live, 1 - decay)
        losses.append(loss.item())
        if step % log_every == 0 or step == cfg["steps"] - 1:
            log.info("unet step %d/%d loss %.4f", step, cfg["steps"], np.mean(losses[-log_every:]))
        if on_snapshot and snapshot_every and (step + 1) % snapshot_every == 0:
            on_snapshot(step + 1, ema_unet, ema_te)
    unet.eval().requires_grad_(False)
    te.eval().requires_grad_(False)
    return losses, ema_unet.state_dict(), ema_te.state_dict()


WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors")


def _save(pipe, out: Path) -> None:
    pipe = copy.deepcopy(pipe).to(torch.float16)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder"):
        getattr(pipe, name).save_pretrained(out / name, safe_serialization=True)


def pretrain(out: Path, recipe: dict = RECIPE, threads: int | None = None, snapshot_every: int = 0) -> dict:
    """Run the recipe and save the pipeline's weights and configs (fp16) under `out`."""
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    torch.manual_seed(recipe["seed"])
    pixels, captions = world_data(recipe)
    pipe = build_tiny_sd_pipeline(seed=recipe["seed"])
    vae_losses = train_vae(pipe.vae, whole_world_pixels(recipe["vae"]), recipe["vae"], recipe["seed"] + 1)
    vae_min = (time.perf_counter() - start) / 60
    latents = encode_latents(pipe.vae, pixels)
    # As SD did: scale latents to unit variance for the diffusion model.
    pipe.vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    latents = latents * pipe.vae.config.scaling_factor

    def snapshot(step, ema_unet, ema_te):
        snap = copy.deepcopy(pipe)
        snap.unet.load_state_dict(ema_unet.state_dict())
        snap.text_encoder.load_state_dict(ema_te.state_dict())
        _save(snap, out / "snapshots" / f"step_{step}")

    unet_losses, ema_unet, ema_te = train_unet(pipe, latents, captions, recipe["unet"], recipe["seed"] + 2,
                                               on_snapshot=snapshot, snapshot_every=snapshot_every)
    pipe.unet.load_state_dict(ema_unet)
    pipe.text_encoder.load_state_dict(ema_te)
    minutes = (time.perf_counter() - start) / 60
    _save(pipe, out)
    info = {
        "recipe": recipe,
        "wall_minutes": round(minutes, 1),
        "vae_wall_minutes": round(vae_min, 1),
        "threads": torch.get_num_threads(),
        "vae_final_loss": float(np.mean(vae_losses[-100:])),
        "unet_final_loss": float(np.mean(unet_losses[-100:])),
        "sha256": {f: sha256_file(out / f) for f in WEIGHT_FILES},
    }
    (out / "recipe.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the weights and recipe.json")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--snapshot-every", type=int, default=0, help="save EMA weights every N UNet steps")
    p.add_argument("--vae-steps", type=int, default=None, help="override the recipe (for a quick try)")
    p.add_argument("--unet-steps", type=int, default=None, help="override the recipe (for a quick try)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    recipe = copy.deepcopy(RECIPE)
    if args.vae_steps is not None:
        recipe["vae"]["steps"] = args.vae_steps
    if args.unet_steps is not None:
        recipe["unet"]["steps"] = args.unet_steps
    info = pretrain(args.out, recipe, args.threads, args.snapshot_every)
    print(json.dumps({k: v for k, v in info.items() if k != "recipe"}, indent=2))


if __name__ == "__main__":
    main()
