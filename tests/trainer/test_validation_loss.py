"""val_loss: deterministic, restored with a checkpoint, invisible to training, on images never trained on."""

import shutil

import pytest
import torch

from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.config import TrainConfigError, build_train_config
from trainer.loop import LoraTrainer
from trainer.train_data import load_train_data
from trainer.validation import VALIDATION_METRICS, fixed_timesteps


def _cfg(tiny_sd_dir, demo_dataset, **over):
    values = dict(base_model=str(tiny_sd_dir), dataset=str(demo_dataset), resolution=64, train_batch_size=4,
                  max_train_steps=40, learning_rate=1e-2, rank=4, seed=0)
    values.update(over)
    return build_train_config(values)


def _build(cfg):
    torch.set_num_threads(2)
    return LoraTrainer.build(cfg, device="cpu")


def test_fixed_timesteps_spread_over_the_schedule():
    assert fixed_timesteps(1000, 4) == [125, 375, 625, 875]
    assert VALIDATION_METRICS == ("val_loss",)


@pytest.mark.slow  # ~12 s: trains and restores
def test_val_loss_is_bit_identical_on_rerun_and_after_a_checkpoint_restore(tiny_sd_dir, demo_dataset, tmp_path):
    cfg = _cfg(tiny_sd_dir, demo_dataset, snr_gamma=5.0)
    trainer = _build(cfg)
    trainer.train(3)
    value = trainer.validation_loss()
    assert value == trainer.validation_loss(), "the same LoRA gives the same val_loss"
    trainer.train(1)
    moved = trainer.validation_loss()
    assert moved != value, "a changed LoRA changes val_loss"
    folder = save_checkpoint(trainer, tmp_path / "ckpt")
    torch.manual_seed(999)  # a disturbed global RNG must not matter
    restored = _build(cfg)
    load_checkpoint(restored, folder)
    assert restored.validation_loss() == moved, "a restored trainer gives the val_loss of the one it was saved from"


@pytest.mark.slow  # ~25 s: two full training runs
def test_computing_val_loss_leaves_training_bit_identical(tiny_sd_dir, demo_dataset):
    # Uncached latents and text (np_rng, the VAE), random flips, caption dropout, LoRA dropout (the
    # global RNG in train mode) and a trained text encoder: every RNG and mode val_loss could disturb.
    cfg = _cfg(tiny_sd_dir, demo_dataset, cache_latents=False, cache_text_embeddings=False, random_flip=True,
               caption_dropout_rate=0.3, lora_dropout=0.1, train_text_encoder=True, train_batch_size=2)
    # One after the other: LoRA dropout draws from the global RNG, which setup() seeds.
    plain = _build(cfg)
    plain_losses = [h["loss"] for h in plain.train(4)]
    probed = _build(cfg)
    probed_losses = []
    for _ in range(2):
        probed.validation_loss()
        probed_losses += [h["loss"] for h in probed.train(2)]
    assert probed_losses == plain_losses
    for a, b in ((plain.lora_state_dict(), probed.lora_state_dict()),
                 (plain.text_encoder_lora_state_dict(), probed.text_encoder_lora_state_dict())):
        assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)
    assert probed.models.unet.training and probed.models.text_encoder.training, "train mode is restored"


def test_held_out_images_leave_the_training_examples(tiny_sd_dir, demo_dataset):
    default = load_train_data(_cfg(tiny_sd_dir, demo_dataset))
    assert default.validation_examples == [], "by default no image is held out"
    images = {e.image_path for e in default.examples}
    assert [e.image_path for e in default.validation_set()] == sorted(images), "default: each training image once"

    data = load_train_data(_cfg(tiny_sd_dir, demo_dataset, validation_fraction=0.2))
    held = {e.image_path for e in data.validation_examples}
    assert len(held) == round(0.2 * len(images)) == len(data.validation_examples)
    assert not held & {e.image_path for e in data.examples}, "no repeat of a held-out image stays"
    assert held | {e.image_path for e in data.examples} == images
    assert set(data.unique_images()) == images, "the caches still hold the held-out images"
    again = load_train_data(_cfg(tiny_sd_dir, demo_dataset, validation_fraction=0.2, seed=7))
    assert {e.image_path for e in again.validation_examples} == held, "the same images for every seed"

    trainer = _build(_cfg(tiny_sd_dir, demo_dataset, validation_fraction=0.2))
    trained_on = set()
    for _ in range(trainer.sampler.batches_per_epoch):
        trained_on |= {trainer.data.examples[i].image_path for i in trainer.sampler.next_batch()}
    assert trained_on == images - held, "an epoch draws every training image and no held-out one"
    assert {e.image_path for e in trainer.prepared.data.validation_set()} == held
    assert trainer.validation_loss() > 0

    with pytest.raises(TrainConfigError, match="validation_dir"):
        _cfg(tiny_sd_dir, demo_dataset, validation_fraction=0.2, validation_dir="/x")


def test_validation_dir_is_read_and_never_trained_on(tiny_sd_dir, demo_dataset, tmp_path):
    source = next(p for p in sorted(demo_dataset.iterdir()) if p.is_dir())
    folder = tmp_path / "val" / source.name
    folder.mkdir(parents=True)
    names = sorted(p.name for p in source.glob("*.png"))[:2]
    for name in names:
        for f in source.glob(name.removesuffix(".png") + ".*"):
            shutil.copy(f, folder / f.name)
    trainer = _build(_cfg(tiny_sd_dir, demo_dataset, validation_dir=str(tmp_path / "val")))
    val = trainer.data.validation_set()
    assert sorted(e.image_path.name for e in val) == names
    assert all(e.image_path.parent == folder for e in val)
    assert not {e.image_path for e in val} & {e.image_path for e in trainer.data.examples}
    assert trainer.validation_loss() > 0  # its latents and captions came from the caches


@pytest.mark.slow  # ~13 s: 30 training steps
def test_training_lowers_val_loss_on_the_training_images(tiny_sd_dir, demo_dataset):
    trainer = _build(_cfg(tiny_sd_dir, demo_dataset))
    untrained = trainer.validation_loss()
    trainer.train(30)
    trained = trainer.validation_loss()
    assert trained < 0.9 * untrained, (untrained, trained)
