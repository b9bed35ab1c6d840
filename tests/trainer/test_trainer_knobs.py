"""The trainer's knobs on the tiny model: text-encoder LoRA, prior preservation,
epochs, precision, attention, checkpointing, exact in-memory resume."""

import copy
import math

import pytest
import torch
from PIL import Image

from trainer.config import TrainConfigError, build_train_config
from trainer.loop import LoraTrainer


def _cfg(tiny_sd_dir, dataset, tmp_path, **over):
    values = dict(
        base_model=str(tiny_sd_dir), dataset=str(dataset), resolution=64, train_batch_size=2,
        max_train_steps=4, learning_rate=1e-3, rank=2, seed=0, cache_dir=str(tmp_path / "cache"),
    )
    values.update(over)
    return build_train_config(values)


# --- config combinations ------------------------------------------------------------------------


def test_config_combinations_name_fields(tiny_sd_dir, demo_dataset, tmp_path):
    with pytest.raises(TrainConfigError) as err:
        _cfg(tiny_sd_dir, demo_dataset, tmp_path, with_prior_preservation=True, max_train_epochs=2,
             optimizer="adamw8bit", center_crop=False, enable_bucket=True, min_bucket_reso=96)
    text = str(err.value)
    for needle in ("class_prompt: required", "class_data_dir: required", "max_train_epochs: set either",
                   "optimizer: adamw8bit needs bitsandbytes", "pip install bitsandbytes",
                   "cache_latents: random crops", "min_bucket_reso: 96 exceeds resolution"):
        assert needle in text, text
    with pytest.raises(TrainConfigError, match="mixed_precision: fp16 needs a CUDA device"):
        LoraTrainer.build(_cfg(tiny_sd_dir, demo_dataset, tmp_path, mixed_precision="fp16"), device="cpu")


# --- the loop -----------------------------------------------------------------------------------


def _dog_data(tmp_path, n=2):
    inst = tmp_path / "instance"
    inst.mkdir()
    for i in range(n):
        im = Image.new("RGB", (64, 64), (30 * i, 90, 160))
        im.paste((220, 200, 20), (10 + 8 * i, 10, 40 + 8 * i, 50))
        im.save(inst / f"dog_{i}.png")
    return inst


@pytest.mark.slow
def test_prior_preservation_text_encoder_and_exact_resume(tiny_sd_dir, tmp_path):
    """DreamBooth + generated class images + text-encoder LoRA (own lr) + dropout + flips; 4 steps
    in one go equal 2 steps, state_dict, a fresh trainer, load_state_dict, 2 steps."""
    inst = _dog_data(tmp_path)
    cfg = _cfg(tiny_sd_dir, inst, tmp_path, dataset_type="auto", instance_prompt="a photo of sks dog",
               with_prior_preservation=True, class_prompt="a photo of a dog", class_data_dir=str(tmp_path / "class"),
               num_class_images=2, train_text_encoder=True, text_encoder_lr=5e-4, caption_dropout_rate=0.5,
               random_flip=True, sampling={"steps": 2}, class_sampling={"steps": 2})
    a = LoraTrainer.build(cfg, device="cpu")
    made = sorted(p.name for p in (tmp_path / "class").glob("*.png"))
    assert made == ["class_00000.png", "class_00001.png"], "missing class images are generated and kept"
    stamp = (tmp_path / "class" / made[0]).stat().st_mtime_ns
    assert "default" in a.models.text_encoder.peft_config
    assert [g["lr"] for g in a.optimizer.param_groups] == [1e-3, 5e-4]
    te_before = a.text_encoder_lora_state_dict()
    full = a.train()
    assert len(full) == 4 and all(math.isfinite(h["loss"]) and "prior_loss" in h for h in full)
    assert full[0]["lr_text_encoder"] == 5e-4
    te_after = a.text_encoder_lora_state_dict()
    assert any(not torch.equal(te_before[k], te_after[k]) for k in te_after if "lora_B" in k), "text-encoder LoRA trains"

    b = LoraTrainer.build(cfg, device="cpu")
    assert (tmp_path / "class" / made[0]).stat().st_mtime_ns == stamp, "class images are reused, not regenerated"
    first = b.train(2)
    state = copy.deepcopy(b.state_dict())
    b.train(1)  # move on, then restore into a fresh trainer
    c = LoraTrainer.build(cfg, device="cpu")
    c.load_state_dict(state)
    second = c.train(2)
    assert [h["loss"] for h in first + second] == [h["loss"] for h in full]
    for k, v in c.text_encoder_lora_state_dict().items():
        torch.testing.assert_close(v, te_after[k], rtol=0, atol=0)


def test_epochs_decide_length(tiny_sd_dir, demo_dataset, tmp_path):
    cfg = _cfg(tiny_sd_dir, demo_dataset, tmp_path, max_train_steps=1, num_repeats=1,
               train_batch_size=4, gradient_accumulation_steps=2)
    cfg = build_train_config({**cfg.model_dump(exclude={"max_train_steps"}), "max_train_epochs": 1})
    t = LoraTrainer.build(cfg, device="cpu")
    # 33 demo images (18 of the concept, 15 of known colours) once each, batches of 4 -> 9
    # micro-batches per epoch, 2 per step -> 5 steps.
    assert t.sampler.batches_per_epoch == 9 and t.max_train_steps == 5
    assert t.cfg is cfg, "the config passed in is kept as it is"
    history = t.train()
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5] and history[-1]["epoch"] == 1


@pytest.mark.slow
def test_checkpointing_attention_and_bf16_keep_the_loss(tiny_sd_dir, demo_dataset, tmp_path):
    base = dict(max_train_steps=2, train_batch_size=1)
    ref = LoraTrainer.build(_cfg(tiny_sd_dir, demo_dataset, tmp_path, **base), device="cpu").train()
    ckpt = LoraTrainer.build(_cfg(tiny_sd_dir, demo_dataset, tmp_path, gradient_checkpointing=True, attention="default",
                            snr_gamma=5.0, **base), device="cpu")
    assert ckpt.models.unet.is_gradient_checkpointing
    ckpt_loss = ckpt.step()
    plain = LoraTrainer.build(_cfg(tiny_sd_dir, demo_dataset, tmp_path, snr_gamma=5.0, **base), device="cpu").step()
    assert ckpt_loss["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert ckpt_loss["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)
    bf16 = LoraTrainer.build(_cfg(tiny_sd_dir, demo_dataset, tmp_path, mixed_precision="bf16", **base), device="cpu").train()
    assert all(math.isfinite(h["loss"]) for h in bf16)
    assert bf16[0]["loss"] == pytest.approx(ref[0]["loss"], rel=0.1), "bf16 autocast stays near fp32"
    v = LoraTrainer.build(_cfg(tiny_sd_dir, demo_dataset, tmp_path, prediction_type="v_prediction", noise_offset=0.1, **base),
                    device="cpu")
    assert v.models.noise_scheduler.config.prediction_type == "v_prediction"
    assert math.isfinite(v.step()["loss"])


def test_bucketed_training_runs(tiny_sd_dir, tmp_path):
    sub = tmp_path / "data" / "2_sks thing"
    sub.mkdir(parents=True)
    for name, size in (("wide.png", (128, 64)), ("tall.png", (64, 128))):
        Image.new("RGB", size, (200, 40, 40)).save(sub / name)
    cfg = _cfg(tiny_sd_dir, tmp_path / "data", tmp_path, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
               bucket_reso_steps=32, max_train_steps=2)
    t = LoraTrainer.build(cfg, device="cpu")
    assert sorted(set(t.target_sizes.values())) == [(32, 96), (96, 32)]
    assert all(math.isfinite(h["loss"]) for h in t.train())


def test_caption_dropout_is_seeded_and_has_its_rate(tiny_sd_dir, demo_dataset, tmp_path, monkeypatch):
    t = LoraTrainer.build(_cfg(tiny_sd_dir, demo_dataset, tmp_path, caption_dropout_rate=0.25, cache_latents=False), device="cpu")
    seen = []
    monkeypatch.setattr(t, "_latents", lambda examples, flips: None)  # only the captions matter here
    monkeypatch.setattr(t, "_cond", lambda captions: seen.append(captions))
    state = copy.deepcopy(t.caption_rng.bit_generator.state)
    batch = t.data.examples[:8]
    for _ in range(50):
        t._inputs(batch, dropout=True)
    first = [c for caps in seen for c in caps]
    assert 0.15 < first.count("") / len(first) < 0.35
    seen.clear()
    t.caption_rng.bit_generator.state = state
    for _ in range(50):
        t._inputs(batch, dropout=True)
    assert [c for caps in seen for c in caps] == first, "the dropout RNG state decides the captions"
    seen.clear()
    t._inputs(batch, dropout=False)
    assert "" not in seen[0], "class captions (prior preservation) are never dropped"
