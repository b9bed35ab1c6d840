import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from trainer.config import TrainConfigError, build_train_config
from trainer.export import save_lora_diffusers
from trainer.loop import LoraTrainer, TrainingDiverged


def _cfg(tiny_sd_dir, demo_dataset, **over):
    values = dict(
        base_model=str(tiny_sd_dir), dataset=str(demo_dataset), resolution=64, train_batch_size=4,
        max_train_steps=60, learning_rate=1e-2, rank=4, seed=0,
    )
    values.update(over)
    return build_train_config(values)


@pytest.fixture(scope="module")
def trained(tiny_sd_dir, demo_dataset):
    trainer = LoraTrainer.build(_cfg(tiny_sd_dir, demo_dataset))
    before = trainer.lora_state_dict()
    seen = []
    history = trainer.train(callback=seen.append)
    return trainer, before, history, seen


def test_training_changes_lora_and_lowers_loss(trained):
    trainer, before, history, seen = trained
    after = trainer.lora_state_dict()
    assert before.keys() == after.keys() and len(after) > 0
    changed = [k for k in after if not torch.equal(before[k], after[k])]
    assert any("lora_B" in k for k in changed), "the LoRA up-projections must have moved"
    losses = [h["loss"] for h in history]
    assert len(losses) == 60 and all(math.isfinite(x) for x in losses)
    first, last = np.mean(losses[:15]), np.mean(losses[-15:])
    assert last < first, f"mean loss of the last steps {last:.4f} not below the first {first:.4f}"
    assert seen == history, "every step's metrics go through the callback"
    assert {"step", "loss", "lr", "grad_norm", "images_per_sec"} <= set(history[0])


def test_exported_lora_loads_in_diffusers_and_changes_output(trained, tiny_sd_dir, tmp_path):
    trainer, *_ = trained
    path = save_lora_diffusers(trainer.models.unet, tmp_path / "lora.safetensors")

    sampling = trainer.cfg.sampling

    def render(with_lora: bool) -> np.ndarray:
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if with_lora:
            pipe.load_lora_weights(str(path))
        # With clip skip 1 the pipeline's own prompt encoding equals the trainer's.
        return pipe("lswsks, a red circle", num_inference_steps=sampling.steps, guidance_scale=sampling.guidance_scale,
                    height=64, width=64, generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    base, lora = render(False), render(True)
    assert np.abs(base - lora).mean() > 1e-3, "the LoRA must change the image at the same seed"
    ours = trainer.sample(["lswsks, a red circle"], [0])[0].astype(np.float32) / 255
    assert np.abs(ours - lora).max() < 3 / 255, "the exported LoRA must reproduce the trained model's samples"


def test_nan_loss_stops_with_reason(tiny_sd_dir, demo_dataset):
    trainer = LoraTrainer.build(_cfg(tiny_sd_dir, demo_dataset, max_train_steps=2, learning_rate=1e-3))
    with torch.no_grad():
        for name, p in trainer.models.unet.named_parameters():
            if "lora_A" in name:
                p.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        trainer.step()


def test_config_errors_name_fields(tiny_sd_dir, demo_dataset):
    with pytest.raises(TrainConfigError) as err:
        build_train_config(dict(base_model="x", dataset="y", rank=0, learning_rate=-1, bogus=1))
    text = str(err.value)
    assert "rank:" in text and "learning_rate:" in text and "bogus: unknown key" in text


def test_evaluate_renders_validation_prompts_at_their_seeds(trained):
    trainer, *_ = trained
    sampling = trainer.cfg.sampling.model_copy(update={"prompts": ["lswsks, a red circle", "a blue square"], "seeds": [0, 7]})
    trainer.cfg = trainer.cfg.model_copy(update={"sampling": sampling})
    images = trainer.evaluate()
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    alone = trainer.sample(["a blue square"], [7])[0]
    # Batched vs alone differs by float rounding only (at most one uint8 level).
    assert np.abs(images[1].astype(int) - alone.astype(int)).max() <= 1


def test_the_constructor_is_cheap_and_setup_does_the_work():
    from trainer.model_loading import BaseModelNotFoundError

    cfg = build_train_config({"base_model": "/nonexistent/model", "dataset": "/nonexistent/data"})
    trainer = LoraTrainer(cfg, device="cpu")  # nothing is loaded or read yet
    assert trainer.models is None and trainer.prepared is None and trainer.cfg is cfg
    with pytest.raises(BaseModelNotFoundError):
        trainer.setup()
