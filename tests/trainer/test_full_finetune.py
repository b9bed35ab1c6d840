"""method: full with EMA: the base weights train, evaluation uses the EMA, resume is exact (2N == N +
restore + N), the checkpoint holds only what changes, and both exports give the trainer's images."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

from trainer.checkpoint import STATE_FILE, load_checkpoint, save_checkpoint
from trainer.config import TrainConfigError, build_train_config
from trainer.full_export import checkpoint_weights, export_checkpoint, export_trainer
from trainer.loop import LoraTrainer
from trainer.model_loading import load_sd_components
from trainer.sampling import sample_images

pytestmark = pytest.mark.slow  # each test trains the tiny model (seconds on an idle 2-core machine)

N = 3  # steps before and after the checkpoint
PROMPTS, SEEDS = ["a lswsks circle", "a red square"], [0, 1]


def _cfg(tiny_sd_dir, demo_dataset, **over):
    # The seed project's settings scaled down: EMA, accumulation, flips, clipping, constant lr;
    # a cosine warm-up and a trained text encoder put state in the schedule and a second group.
    return build_train_config({**dict(
        base_model=str(tiny_sd_dir), dataset=str(demo_dataset), resolution=64, train_batch_size=2,
        gradient_accumulation_steps=2, max_train_steps=2 * N, learning_rate=1e-3, method="full",
        use_ema=True, ema_decay=0.9, ema_update_interval=1, train_text_encoder=True, random_flip=True,
        lr_scheduler="cosine", lr_warmup_steps=2, noise_offset=0.05, snr_gamma=5.0, seed=3,
        sampling={"steps": 4}), **over})


@pytest.fixture(scope="module")
def straight(tiny_sd_dir, demo_dataset):
    trainer = LoraTrainer.build(_cfg(tiny_sd_dir, demo_dataset), device="cpu")
    return trainer, trainer.train(2 * N)


@pytest.fixture(scope="module")
def halfway(tiny_sd_dir, demo_dataset, tmp_path_factory):
    trainer = LoraTrainer.build(_cfg(tiny_sd_dir, demo_dataset), device="cpu")
    first = trainer.train(N)
    trainer.sample(PROMPTS[:1], SEEDS[:1])  # an evaluation in between swaps the EMA in and out
    return first, save_checkpoint(trainer, tmp_path_factory.mktemp("ckpt") / f"step-{N}")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_base_weights_train_and_the_vae_does_not(straight, tiny_sd_dir):
    trainer, history = straight
    base = load_sd_components(str(tiny_sd_dir))
    trained = trainer.trained_weights()
    assert set(trained) == {"unet", "text_encoder"}
    assert _max_diff(trained["unet"], dict(base.unet.named_parameters())) > 1e-4
    assert _max_diff(trained["text_encoder"], dict(base.text_encoder.named_parameters())) > 1e-5
    assert _max_diff(dict(trainer.models.vae.named_parameters()), dict(base.vae.named_parameters())) == 0
    assert all(np.isfinite(h["loss"]) for h in history) and "ema_decay" in history[-1]


def test_ema_follows_diffusers_decay_rule(tiny_sd_dir, demo_dataset, tmp_path):
    """Every second step, with decay fixed at 0.5 by ema_min_decay: the first update copies the weights
    (EMAModel's rule), each later one averages half-half. A frozen text encoder stays out of the
    checkpoint."""
    cfg = _cfg(tiny_sd_dir, demo_dataset, train_text_encoder=False, ema_decay=0.5, ema_min_decay=0.5,
               ema_update_interval=2, max_train_steps=4, gradient_accumulation_steps=1)
    trainer = LoraTrainer.build(cfg, device="cpu")
    expected = None
    for step in range(1, 5):
        trainer.step()
        if step % 2 == 0:
            now = trainer.trained_weights()["unet"]
            expected = now if expected is None else {k: 0.5 * expected[k] + 0.5 * now[k] for k in now}
    shadow = {k.removeprefix("unet."): v for k, v in trainer.ema.shadow().items()}
    assert _max_diff(shadow, expected) < 1e-6
    assert trainer.ema.ema.optimization_step == 2
    with safe_open(str(save_checkpoint(trainer, tmp_path / "c") / STATE_FILE), framework="pt") as f:
        assert not [k for k in f.keys() if "text_encoder" in k]


def test_evaluation_uses_the_ema_weights_and_restores_the_trained_ones(straight):
    trainer, _ = straight
    before = trainer.trained_weights()
    ema_images = trainer.sample(PROMPTS, SEEDS)
    assert _max_diff(trainer.trained_weights()["unet"], before["unet"]) == 0  # swapped back exactly
    ema, trainer.ema = trainer.ema, None
    try:
        raw_images = trainer.sample(PROMPTS, SEEDS)
    finally:
        trainer.ema = ema
    assert np.abs(ema_images.astype(int) - raw_images.astype(int)).max() > 0


def test_resume_reproduces_the_uninterrupted_run(straight, halfway, tiny_sd_dir, demo_dataset):
    trainer, full_history = straight
    first, folder = halfway
    torch.manual_seed(12345)
    np.random.seed(54321)
    resumed = LoraTrainer.build(_cfg(tiny_sd_dir, demo_dataset), device="cpu")
    load_checkpoint(resumed, folder)
    second = resumed.train(N)
    assert np.allclose([h["loss"] for h in first + second], [h["loss"] for h in full_history], rtol=0, atol=1e-6)
    for module in ("unet", "text_encoder"):
        assert _max_diff(resumed.trained_weights()[module], trainer.trained_weights()[module]) < 1e-6
    assert _max_diff(resumed.ema.shadow(), trainer.ema.shadow()) < 1e-6


def test_checkpoint_holds_only_what_changes(halfway):
    _, folder = halfway
    with safe_open(str(folder / STATE_FILE), framework="pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "vae" in k.lower()]
    assert any(k.startswith("/full/unet/") for k in keys) and any(k.startswith("/full/text_encoder/") for k in keys)
    assert any(k.startswith("/ema/shadow/unet.") for k in keys)


def test_checkpoint_of_another_method_is_rejected(halfway, tiny_sd_dir, demo_dataset):
    from trainer.checkpoint import CheckpointError

    _, folder = halfway
    lora = LoraTrainer.build(_cfg(tiny_sd_dir, demo_dataset, method="lora", use_ema=False), device="cpu")
    with pytest.raises(CheckpointError, match="does not fit this trainer"):
        load_checkpoint(lora, folder)


def _images(models, cfg):
    return sample_images(models, PROMPTS, SEEDS, cfg.clip_skip, cfg.resolution, cfg.sampling)


def test_both_exports_give_the_trainers_images(straight, tmp_path):
    """The diffusers folder and the single-file checkpoint load back (diffusers' own loaders) and give the
    trainer's evaluation images (EMA weights) at the same seeds."""
    trainer, _ = straight
    expected = trainer.sample(PROMPTS, SEEDS)
    export_trainer(trainer, tmp_path / "model", tmp_path / "model.safetensors", metadata={"lorasweep_step": "6"})
    folder = load_sd_components(str(tmp_path / "model"))
    np.testing.assert_array_equal(_images(folder, trainer.cfg), expected)
    single = load_sd_components(str(tmp_path / "model.safetensors"), config=tmp_path / "model")
    np.testing.assert_array_equal(_images(single, trainer.cfg), expected)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["lorasweep_step"] == "6"
        assert any(k.startswith("model.diffusion_model.") for k in f.keys())


def test_export_from_a_checkpoint_equals_the_live_export(halfway, tiny_sd_dir, demo_dataset, tmp_path):
    _, folder = halfway
    resumed = LoraTrainer.build(_cfg(tiny_sd_dir, demo_dataset), device="cpu")
    load_checkpoint(resumed, folder)
    expected = resumed.sample(PROMPTS, SEEDS)
    weights = checkpoint_weights(folder)
    assert _max_diff(weights["unet"], {k.removeprefix("unet."): v for k, v in resumed.ema.shadow().items()
                                       if k.startswith("unet.")}) == 0
    export_checkpoint(str(tiny_sd_dir), folder, single_file=tmp_path / "m.safetensors")
    single = load_sd_components(str(tmp_path / "m.safetensors"), config=tiny_sd_dir)
    np.testing.assert_array_equal(_images(single, resumed.cfg), expected)


def test_ema_values_are_checked(tiny_sd_dir, demo_dataset):
    with pytest.raises(TrainConfigError, match="ema_min_decay: 0.99 exceeds ema_decay 0.9"):
        _cfg(tiny_sd_dir, demo_dataset, ema_min_decay=0.99)
    with pytest.raises(TrainConfigError, match="ema_decay"):
        _cfg(tiny_sd_dir, demo_dataset, ema_decay=1.0)
    with pytest.raises(TrainConfigError, match="method"):
        _cfg(tiny_sd_dir, demo_dataset, method="dreambooth")


def test_cli_exports_a_full_finetune_as_single_file_and_folder(tiny_sd_dir, demo_dataset, tmp_path):
    from trainer.__main__ import OutputOptions, train_and_export

    cfg = _cfg(tiny_sd_dir, demo_dataset, max_train_steps=1, lr_scheduler="constant", lr_warmup_steps=0,
               train_text_encoder=False)
    written = train_and_export(cfg, OutputOptions(dir=str(tmp_path), name="ft", format="both"))
    assert written == [tmp_path / "diffusers", tmp_path / "ft.safetensors"]
    with safe_open(str(tmp_path / "ft.safetensors"), framework="pt") as f:
        assert f.metadata()["lorasweep_step"] == "1" and any(k.startswith("model.diffusion_model.") for k in f.keys())
    assert (tmp_path / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
