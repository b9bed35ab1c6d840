"""Latent / text-embedding caches: exact same loss as without them, keyed invalidation, concurrent builders."""

import multiprocessing as mp
import os

import numpy as np
import pytest
import torch
from builders import small_kohya_dataset
from PIL import Image
from safetensors.torch import load_file

from trainer.cache import LATENTS_FILE, TEXT_FILE, ensure_latent_cache, ensure_text_cache, module_fingerprint
from trainer.config import build_train_config
from trainer.images import load_image
from trainer.loop import LoraTrainer
from trainer.model_loading import load_sd_components
from trainer.preparation import prepare
from trainer.train_data import load_train_data


def _cfg(tiny_sd_dir, dataset, cache, **over):
    values = dict(base_model=str(tiny_sd_dir), dataset=str(dataset), resolution=64, train_batch_size=2,
                  max_train_steps=3, learning_rate=1e-3, rank=2, seed=3, cache_dir=str(cache))
    values.update(over)
    return build_train_config(values)


@pytest.fixture(scope="module")
def models(tiny_sd_dir):
    return load_sd_components(str(tiny_sd_dir))


@pytest.fixture(scope="module")
def fingerprints(models):
    return module_fingerprint(models.vae), module_fingerprint(models.text_encoder)


def test_loss_with_and_without_cache_agree(tiny_sd_dir, tmp_path):
    data = small_kohya_dataset(tmp_path / "data")
    knobs = dict(random_flip=True, caption_dropout_rate=0.3, clip_skip=2)
    cached = LoraTrainer.build(_cfg(tiny_sd_dir, data, tmp_path / "c", **knobs), device="cpu")
    assert cached.latent_cache is not None and cached.text_cache is not None
    plain = LoraTrainer.build(_cfg(tiny_sd_dir, data, tmp_path / "c", cache_latents=False, cache_text_embeddings=False, **knobs),
                        device="cpu")
    assert plain.latent_cache is None and plain.text_cache is None
    a, b = cached.train(), plain.train()
    np.testing.assert_allclose([h["loss"] for h in a], [h["loss"] for h in b], rtol=1e-4)
    for k, v in cached.lora_state_dict().items():
        torch.testing.assert_close(v, plain.lora_state_dict()[k], rtol=1e-3, atol=1e-5)


def test_cache_holds_the_vae_moments_and_embeddings(tiny_sd_dir, tmp_path, models, fingerprints):
    vae_fp, te_fp = fingerprints
    data_dir = small_kohya_dataset(tmp_path / "data", n=2)
    cfg = _cfg(tiny_sd_dir, data_dir, tmp_path / "c", random_flip=True)
    data = load_train_data(cfg)
    cache = ensure_latent_cache(cfg, models.vae, data, vae_fp)
    path = data.unique_images()[0]
    pixels = load_image(path, 64, True, True, np.random.default_rng(0))[None]
    with torch.no_grad():
        dist = models.vae.encode(pixels).latent_dist
    mean, std = cache.moments(path, True)
    torch.testing.assert_close(mean, dist.mean[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, dist.std[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mean, cache.moments(path, False)[0]), "flip variants are cached separately"
    text = ensure_text_cache(cfg, models.tokenizer, models.text_encoder, data.captions(), 1, te_fp)
    assert "" in text and data.captions()[0] in text


def test_changes_invalidate(tiny_sd_dir, tmp_path, models, fingerprints):
    vae_fp, te_fp = fingerprints
    data_dir = small_kohya_dataset(tmp_path / "data", n=2)
    cfg = _cfg(tiny_sd_dir, data_dir, tmp_path / "c")
    data = load_train_data(cfg)
    first = ensure_latent_cache(cfg, models.vae, data, vae_fp)
    base = first.folder
    assert ensure_latent_cache(cfg, models.vae, load_train_data(cfg), vae_fp).folder == base, "same inputs, same cache"
    cfg32 = _cfg(tiny_sd_dir, data_dir, tmp_path / "c", resolution=32)
    assert ensure_latent_cache(cfg32, models.vae, data, vae_fp).folder != base, "data read once serves other sizes"
    flip = _cfg(tiny_sd_dir, data_dir, tmp_path / "c", random_flip=True)
    assert ensure_latent_cache(flip, models.vae, load_train_data(flip), vae_fp).folder != base
    img = data.unique_images()[0]
    Image.new("RGB", (64, 64), (1, 2, 3)).save(img)
    os.utime(img, ns=(1, 1))  # a different mtime too, whatever the clock resolution
    changed = ensure_latent_cache(cfg, models.vae, load_train_data(cfg), vae_fp)
    assert changed.folder != base
    assert not torch.allclose(changed.moments(img, False)[0], first.moments(img, False)[0])
    captions = data.captions()
    t1 = ensure_text_cache(cfg, models.tokenizer, models.text_encoder, captions, 1, te_fp).folder
    assert ensure_text_cache(cfg, models.tokenizer, models.text_encoder, captions, 2, te_fp).folder != t1
    assert ensure_text_cache(cfg, models.tokenizer, models.text_encoder, captions + ["new"], 1, te_fp).folder != t1
    other = load_sd_components(str(tiny_sd_dir)).vae
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert module_fingerprint(other) != module_fingerprint(models.vae), "changed weights change the model hash"


def _build(cfg_values: dict, out: str) -> None:
    torch.set_num_threads(1)
    prepared = prepare(build_train_config(cfg_values), device="cpu")
    with open(out, "w") as fh:
        fh.write(prepared.vae_fingerprint + prepared.text_encoder_fingerprint)


@pytest.mark.slow
def test_two_processes_build_one_valid_cache(tiny_sd_dir, tmp_path):
    data_dir = small_kohya_dataset(tmp_path / "data")
    values = _cfg(tiny_sd_dir, data_dir, tmp_path / "c", random_flip=True).model_dump()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_build, args=(values, str(tmp_path / f"out{i}"))) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
        assert p.exitcode == 0
    assert len({(tmp_path / f"out{i}").read_text() for i in range(2)}) == 1, "both fingerprinted the same models"
    latents = list((tmp_path / "c").glob(f"latents-*/{LATENTS_FILE}"))
    texts = list((tmp_path / "c").glob(f"text-*/{TEXT_FILE}"))
    assert len(latents) == 1 and len(texts) == 1, "both processes used one cache of each kind"
    assert not list((tmp_path / "c").glob("*/*.tmp")), "no temporary files left behind"
    assert len(load_file(str(latents[0]))) == 3 * 2 * 2  # images x flips x (mean, std)
    # The trainer then finds it instead of building its own.
    t = LoraTrainer.build(build_train_config(values), device="cpu")
    assert t.latent_cache.folder == latents[0].parent and t.text_cache.folder == texts[0].parent


def test_tokenizer_fingerprint_is_kept_per_tokenizer_and_follows_added_tokens(tiny_sd_dir):
    from transformers import CLIPTokenizer

    from trainer.cache import _tokenizer_fingerprint

    first = CLIPTokenizer.from_pretrained(tiny_sd_dir, subfolder="tokenizer")
    second = CLIPTokenizer.from_pretrained(tiny_sd_dir, subfolder="tokenizer")
    before = _tokenizer_fingerprint(first)
    assert _tokenizer_fingerprint(first) == before == _tokenizer_fingerprint(second)
    first.add_tokens(["<lswsks-embedding>"])  # a textual-inversion token: another vocabulary
    assert _tokenizer_fingerprint(first) != before
    assert _tokenizer_fingerprint(second) == before
