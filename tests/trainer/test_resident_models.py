"""A warm trial worker: the base model stays loaded across trials, reset completely in between.

Trials here are short (2 steps of the tiny SD); a warm trial must equal the same trial run in a
fresh process bit for bit, whatever trial the worker ran before.
"""

import gc
import json
import os
import pickle
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from resident_trials import assert_same_trial, config, run_trial

from trainer.preparation import prepare
from trainer.resident_models import ResidentModels, reset_components, structure, unet_dtype, weights_identity

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def base(tiny_sd_dir, demo_dataset, tmp_path_factory):
    return dict(base_model=str(tiny_sd_dir), dataset=str(demo_dataset), resolution=64, train_batch_size=2,
                max_train_steps=10, learning_rate=1e-2, rank=2, seed=3, validation_timesteps=1,
                sampling={"steps": 2}, cache_dir=str(tmp_path_factory.mktemp("resident-cache")))


@pytest.fixture(scope="module")
def prepared(base):
    return prepare(config(base, "plain"), clip_skips=[2], device="cpu")  # text caches for clip skip 1 and 2


def _fresh_process(cfg, prepared, folder: Path) -> dict:
    """The trial in a new Python process: nothing of this one's models or state is there."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    (folder / "prepared.pkl").write_bytes(pickle.dumps(prepared))
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, str(root / "tests/trainer/resident_trials.py"), str(folder / "config.json"),
                    str(folder / "prepared.pkl"), str(folder)], check=True, env=env, timeout=600)
    return pickle.loads((folder / "outcome.pkl").read_bytes())


@pytest.fixture(scope="module")
def fresh(base, prepared, tmp_path_factory):
    """Each target trial's outcome in a fresh process, computed once."""
    outcomes = {}

    def get(variant: str) -> dict:
        if variant not in outcomes:
            folder = tmp_path_factory.mktemp(f"fresh-{variant}")
            outcomes[variant] = _fresh_process(config(base, variant), prepared, folder / "run")
        return outcomes[variant]

    return get


@pytest.mark.slow
@pytest.mark.parametrize(("previous", "target"), [
    ("text_encoder_lora", "plain"),
    ("clip_skip_2", "plain"),
    ("v_prediction", "plain"),
    ("diverged", "plain"),
    ("plain", "text_encoder_lora"),  # text-encoder training after a frozen one
    ("v_prediction", "clip_skip_2"),
])
def test_a_warm_trial_equals_the_same_trial_in_a_fresh_process(previous, target, base, prepared, fresh, tmp_path):
    workers = ResidentModels()
    first = run_trial(config(base, previous), prepared, workers, tmp_path / "previous", diverge=previous == "diverged")
    assert not first["warm"]
    warm = run_trial(config(base, target), prepared, workers, tmp_path / "target")
    assert warm["warm"], "the second trial must reuse the resident base model"
    assert_same_trial(warm, fresh(target))


def test_the_reset_brings_back_the_freshly_loaded_model(base, prepared, tmp_path):
    workers = ResidentModels()
    run_trial(config(base, "text_encoder_lora"), prepared, workers, tmp_path)  # LoRA in both, checkpointing on
    resident = workers._resident
    models = resident.components
    assert any("lora" in n for n, _ in models.text_encoder.named_modules())
    assert hasattr(models.text_encoder, "_require_grads_hook")
    reset = reset_components(models, resident.scheduler_config)
    assert structure(reset) == resident.structure
    for module in (reset.unet, reset.text_encoder, reset.vae):
        assert not any("lora" in n for n, _ in module.named_modules())
        assert not any(p.requires_grad or p.grad is not None for p in module.parameters())
        assert not module.training
    assert not reset.text_encoder.is_activation_checkpointing
    assert reset.noise_scheduler is not models.noise_scheduler


def test_the_next_config_sets_prediction_type_and_attention(base, prepared, tmp_path):
    workers = ResidentModels()
    run_trial(config(base, "v_prediction"), prepared, workers, tmp_path)
    got = workers.acquire(config(base, "plain"), CPU, prepared)
    assert got.warm
    assert got.components.noise_scheduler.config.prediction_type == "epsilon"  # the model's own, not v
    got = workers.acquire(config(base, "plain").model_copy(update={"attention": "default"}), CPU, prepared)
    assert not got.warm and "attention" in got.reload_reason
    assert {type(p).__name__ for p in got.components.unet.attn_processors.values()} == {"AttnProcessor"}


def test_another_base_model_or_a_replaced_weights_file_reloads(base, prepared, tmp_path, tiny_sd_dir):
    workers = ResidentModels()
    cfg = config(base, "plain")
    first = workers.acquire(cfg, CPU, prepared)
    copy = shutil.copytree(tiny_sd_dir, tmp_path / "copy")
    other = workers.acquire(cfg.model_copy(update={"base_model": str(copy)}), CPU)
    assert not other.warm and "source" in other.reload_reason
    assert other.components.unet is not first.components.unet
    assert workers.acquire(cfg.model_copy(update={"base_model": str(copy)}), CPU).warm
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten on disk
    again = workers.acquire(cfg.model_copy(update={"base_model": str(copy)}), CPU)
    assert not again.warm and "weights_file" in again.reload_reason


def test_the_unet_is_held_in_the_dtype_the_trainer_trains_it_in(base):
    cfg = config(base, "plain")
    assert unet_dtype(cfg, CPU) == torch.float32
    assert unet_dtype(cfg.model_copy(update={"mixed_precision": "bf16"}), CPU) == torch.float32
    assert unet_dtype(cfg.model_copy(update={"mixed_precision": "fp16"}), torch.device("cuda")) == torch.float16
    assert unet_dtype(cfg.model_copy(update={"mixed_precision": "bf16"}), torch.device("cuda")) == torch.bfloat16


def test_a_trial_that_changed_base_weights_is_never_reused(base, prepared):
    """A full fine-tune (or anything writing into a base tensor) leaves weights that are no longer
    the base model's: the next trial must get the model from disk again."""
    workers = ResidentModels()
    cfg = config(base, "plain")
    models = workers.acquire(cfg, CPU, prepared).components
    pristine = {k: v.clone() for k, v in models.unet.state_dict().items()}
    models.unet.requires_grad_(True)  # as a full fine-tune trains the UNet itself
    optimizer = torch.optim.SGD(models.unet.parameters(), lr=0.1)
    for p in models.unet.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    again = workers.acquire(cfg, CPU, prepared)
    assert not again.warm and again.reload_reason == "the previous trial modified the base weights"
    assert again.components.unet is not models.unet
    assert all(torch.equal(v, pristine[k]) for k, v in again.components.unet.state_dict().items())
    # A replaced tensor (a cast, a reassigned .data) is a change too, even with equal values.
    p = next(again.components.text_encoder.parameters())
    p.data = p.data.clone()
    assert not workers.acquire(cfg, CPU, prepared).warm
    assert weights_identity(workers._resident.components) == workers._resident.weights


def _live_tensors() -> tuple[int, int]:
    gc.collect()
    tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return len(tensors), sum(t.untyped_storage().nbytes() for t in tensors if t.device.type != "meta")


@pytest.mark.slow
def test_memory_stays_bounded_over_ten_trials(base, prepared, tmp_path):
    workers = ResidentModels()
    order = ["plain", "text_encoder_lora", "clip_skip_2", "v_prediction", "diverged"] * 2
    live = []
    for i, variant in enumerate(order):
        run_trial(config(base, variant), prepared, workers, tmp_path / str(i), diverge=variant == "diverged")
        workers.acquire(config(base, "plain"), CPU, prepared)  # the reset a next trial does
        live.append(_live_tensors())
    assert all(n == live[0] for n in live), f"live tensors (count, bytes) per trial: {live}"
    unet = weakref.ref(workers._resident.components.unet)
    workers.release()
    gc.collect()
    assert unet() is None, "release() must drop the resident model"

