"""The export of LoRA strengths: the best of eval.lora_scales recorded in the files' metadata and in
best.json, and export.scale baked into the files (sweeps.export_strength, trainer.export.restamp_lora_file)."""

import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from ray import cloudpickle, tune
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sweeps.export import export_sweep
from sweeps.export_strength import lora_scale_record
from sweeps.spec import load_spec
from sweeps.trainable import LORA_DIFFUSERS, LORA_KOHYA, SAMPLES_FILE, TRIAL_INFO, save_grid
from sweeps.tuner import run_sweep
from trainer.export import restamp_lora_file

ROOT = Path(__file__).resolve().parents[2]
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this module by name
KOHYA = {"lora_unet_down_blocks_0_attn.lora_down.weight": torch.full((4, 8), 0.5),
         "lora_unet_down_blocks_0_attn.lora_up.weight": torch.full((8, 4), 0.25),
         "lora_unet_down_blocks_0_attn.alpha": torch.tensor(4.0)}
DIFFUSERS = {"unet.down_blocks.0.attn.lora.down.weight": torch.full((4, 8), 0.5),
             "unet.down_blocks.0.attn.lora.up.weight": torch.full((8, 4), 0.25)}


def _spec(tmp_path, *sets):
    return load_spec(ROOT / "examples" / "demo.yaml", [f"storage={tmp_path}", *sets])


def test_the_best_strength_follows_the_primary_objective_and_its_mode(tmp_path):
    metrics = {"objective": 5.0, "objective@lora_scale=0.6": 4.0, "objective@lora_scale=0.85": 6.0,
               "objective@lora_scale=1": 5.0, "clip_score@lora_scale=0.6": 30.0, "clip_score@lora_scale=0.85": 20.0,
               "clip_score@lora_scale=1": 25.0}
    spec = _spec(tmp_path, "eval.lora_scales=[0.6, 0.85, 1.0]", "objective={metric: objective, mode: max}")
    assert lora_scale_record(spec, metrics) == {
        "best": 0.85, "metric": "objective", "mode": "max", "file_scale": 1.0,
        "values": {"0.6": 4.0, "0.85": 6.0, "1": 5.0}}
    by_clip = lora_scale_record(_spec(tmp_path, "eval.lora_scales=[0.6, 0.85, 1.0]",
                                      "objective={metric: clip_score, mode: max}", "export.scale=best"), metrics)
    assert (by_clip["best"], by_clip["metric"], by_clip["file_scale"]) == (0.6, "clip_score", 0.6)
    # A primary that is not reported per strength (the loss) leaves the choice to the objective.
    by_loss = lora_scale_record(_spec(tmp_path, "eval.lora_scales=[0.6, 0.85, 1.0]",
                                      "objective={metric: loss, mode: min}"), metrics)
    assert (by_loss["best"], by_loss["metric"]) == (0.85, "objective")
    assert lora_scale_record(_spec(tmp_path), metrics) is None  # nothing asked: the files are copied as they are
    fixed = lora_scale_record(_spec(tmp_path, "export.scale=0.7"), metrics)
    assert fixed["best"] is None and fixed["file_scale"] == 0.7


def test_restamp_scales_the_up_weights_of_either_layout_and_adds_metadata(tmp_path):
    for name, tensors in (("kohya", KOHYA), ("diffusers", DIFFUSERS)):
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={"ss_network_dim": "4"})
        restamp_lora_file(path, 0.5, {"lorasweep_best_lora_scale": "0.85"})
        out = load_file(str(path))
        for key, value in tensors.items():
            expected = value * 0.5 if key.endswith("up.weight") else value
            assert torch.equal(out[key], expected), key
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == {"ss_network_dim": "4", "lorasweep_best_lora_scale": "0.85",
                                    "lorasweep_export_scale": "0.5"}
    with pytest.raises(ValueError, match="no LoRA up weights"):
        save_file({"x.lora_down.weight": torch.ones(2, 2)}, str(tmp_path / "down.safetensors"))
        restamp_lora_file(tmp_path / "down.safetensors", 2.0)
    with pytest.raises(ValueError, match="finite number > 0"):
        restamp_lora_file(tmp_path / "kohya.safetensors", 0.0)


def strength_trial(config: dict) -> None:
    """Reports clip_score per LoRA strength: best at 0.6 for every trial, whose clip_score ranks it."""
    base = 1000.0 * config["learning_rate"]
    metrics = {"step": 10, "max_train_steps": 10, "clip_score": base, "loss": 1.0,
               "clip_score@lora_scale=0.6": base + 1.0, "clip_score@lora_scale=1": base - 1.0}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_file(KOHYA, str(folder / LORA_KOHYA), metadata={"ss_network_dim": "4"})
        save_file(DIFFUSERS, str(folder / LORA_DIFFUSERS))
        save_grid(torch.zeros(1, 8, 8, 3, dtype=torch.uint8).numpy(), folder / SAMPLES_FILE)
        (folder / TRIAL_INFO).write_text(json.dumps({"params": config, "metrics": metrics, "prompts": ["p"], "seeds": [0]}))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


@pytest.mark.slow
@pytest.mark.parametrize("scale, file_scale", [("1.0", 1.0), ("best", 0.6)])
def test_export_records_the_best_strength_and_keeps_strength_1_unless_asked(ray_local, tmp_path, scale, file_scale):
    spec = _spec(tmp_path, "search.num_trials=2", "search.max_concurrent=2", "train.max_train_steps=10",
                 "objective={metric: clip_score, mode: max}", "space.lr_scheduler=constant",
                 "eval.lora_scales=[0.6, 1.0]", f"export.scale={scale}")
    run_sweep(spec, None, trainable=strength_trial)
    result = export_sweep(spec)
    best = json.loads((result.best.parent / "best.json").read_text())
    assert best["lora_scale"]["best"] == 0.6 and best["lora_scale"]["file_scale"] == file_scale
    assert best["lora_scale"]["values"] == {"0.6": pytest.approx(best["metrics"]["clip_score"] + 1.0),
                                            "1": pytest.approx(best["metrics"]["clip_score"] - 1.0)}
    with safe_open(str(result.best), "pt") as f:
        meta = f.metadata()
        up = f.get_tensor("lora_unet_down_blocks_0_attn.lora_up.weight")
    assert meta["lorasweep_best_lora_scale"] == "0.6" and meta["lorasweep_lora_scale_metric"] == "clip_score"
    assert meta["ss_network_dim"] == "4"  # the trainer's metadata is kept
    assert torch.allclose(up, KOHYA["lora_unet_down_blocks_0_attn.lora_up.weight"] * file_scale)
    assert ("lorasweep_export_scale" in meta) == (file_scale != 1.0)
    rank1 = result.best.parent / "export" / "rank1"
    with safe_open(str(rank1 / LORA_DIFFUSERS), "pt") as f:
        assert f.metadata()["lorasweep_best_lora_scale"] == "0.6"
    assert json.loads((rank1 / "info.json").read_text())["lora_scale"]["best"] == 0.6
