"""A finished stub sweep for the report's tests: real Ray Tune + Optuna (the demo's TPE and median
pruner), a stub trainable that writes what sweeps.trainable writes (checkpoints with trial.json,
samples.png and small real LoRA files, every evaluation's kept images, the base model's images).

Every image says where it came from, so a grid's cells can be checked: the left half of an image
is the trial's colour (red: rank x 30; green: where its learning rate lies in the space, 0..250;
blue: the step x 20), the right half the item's index in the suite (prompt x seed) x 5.
"""

import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from ray import cloudpickle, tune
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import conftest by name
STEPS = (3, 6, 9)
LR_LOW, LR_HIGH = 1.0e-4, 3.0e-2  # examples/demo.yaml's learning_rate range


def stub_score(config: dict, step: int) -> float:
    return 1000.0 * config["learning_rate"] * step / 10


def lr_code(lr: float) -> int:
    return int(round(250 * math.log(lr / LR_LOW) / math.log(LR_HIGH / LR_LOW)))


def stub_images(config: dict, step: int, count: int) -> np.ndarray:
    images = np.zeros((count, 8, 8, 3), dtype=np.uint8)
    images[:, :, :4] = [config["rank"] * 30, lr_code(config["learning_rate"]), step * 20]
    images[:, :, 4:] = (np.arange(count) * 5)[:, None, None, None]
    return images


def write_checkpoint(folder: Path, config: dict, metrics: dict, prompts: list[str], seeds: list[int]) -> None:
    from sweeps.results import LORA_DIFFUSERS, LORA_KOHYA, SAMPLES_FILE, TRIAL_INFO
    from sweeps.sample_grids import save_grid

    down = torch.full((config["rank"], 4), config["learning_rate"])
    save_file({"lora_unet_down_blocks_0_attn.lora_down.weight": down}, str(folder / LORA_KOHYA),
              metadata={"ss_network_dim": str(config["rank"])})
    save_file({"unet.down_blocks.0.attn.lora_A.weight": down}, str(folder / LORA_DIFFUSERS))
    save_grid(stub_images(config, metrics["step"], len(prompts)), folder / SAMPLES_FILE)
    (folder / TRIAL_INFO).write_text(json.dumps({"params": config, "metrics": metrics, "prompts": prompts, "seeds": seeds}))


def stub_trial(config: dict, sweep_uri: str, prompts: list[str], seeds: list[int]) -> None:
    from sweeps import storage
    from sweeps.eval_images import save_eval_images
    from sweeps.results import BASE_SAMPLES
    from sweeps.sample_grids import save_grid

    trial_id = tune.get_context().get_trial_id()
    base = storage.join(sweep_uri, BASE_SAMPLES)
    if not storage.exists(base):
        save_grid(np.full((len(prompts), 8, 8, 3), 128, dtype=np.uint8), Path(base))
    for step in STEPS:
        metrics = {"step": step, "max_train_steps": STEPS[-1], "clip_score": stub_score(config, step),
                   "loss": 1.0 / config["rank"] + config["learning_rate"]}
        save_eval_images(sweep_uri, trial_id, step, stub_images(config, step, len(prompts)))
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(Path(tmp), config, metrics, prompts, seeds)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def stub_spec(storage: Path, *overrides):
    from sweeps.spec import load_spec

    return load_spec(ROOT / "examples" / "demo.yaml", [
        f"storage={storage}", "search.num_trials=6", "search.max_concurrent=2", f"train.max_train_steps={STEPS[-1]}",
        "objective={metric: clip_score, mode: max}", "space.lr_scheduler=constant", *overrides])


def run_stub_sweep(spec, report: bool = False) -> None:
    from sweeps.results import sweep_uri
    from sweeps.stored_spec import store
    from sweeps.tuner import run_sweep

    store(spec)  # as sweeps/run.py does: the report CLI reads the spec from the sweep's folder
    prompts, seeds = spec.eval_prompts()
    run_sweep(spec, None, trainable=tune.with_parameters(stub_trial, sweep_uri=sweep_uri(spec), prompts=prompts, seeds=seeds),
              report=report)


@pytest.fixture(scope="session")
def report_sweep(ray_local, tmp_path_factory):
    """(spec, stdout) of a finished 6-trial stub sweep that rewrote its report as trials finished;
    stdout holds the ReportWriter's lines."""
    import contextlib
    import io

    spec = stub_spec(tmp_path_factory.mktemp("report-sweep"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_stub_sweep(spec, report=True)
    sys.stdout.write(out.getvalue())
    return spec, out.getvalue()
