"""Short trials on the tiny SD that the resident-model tests compare (imported by them; not a test
module). Run as a script, it runs one trial in this fresh process and saves its outcome:

    python tests/trainer/resident_trials.py CONFIG_JSON PREPARED_PICKLE OUT_DIR
"""

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from trainer.config import build_train_config
from trainer.export import save_lora_diffusers, save_lora_kohya
from trainer.loop import LoraTrainer, TrainingDiverged
from trainer.resident_models import ResidentModels

STEPS = 2
PROMPTS, SEEDS = ["lswsks, a red circle", "a blue square"], [0, 1]
# The kohya layout's dates (modelspec.date, ss_training_finished_at) say when a file was written.
DATED = ("modelspec.date", "ss_training_finished_at")
# What each previous trial changes from the plain one (see test_resident_models).
VARIANTS = {
    "plain": {},
    "text_encoder_lora": {"train_text_encoder": True, "gradient_checkpointing": True},
    "clip_skip_2": {"clip_skip": 2},
    "v_prediction": {"prediction_type": "v_prediction", "snr_gamma": 5.0},
    "diverged": {"learning_rate": 1e-3},
}


def config(base: dict, variant: str):
    return build_train_config({**base, **VARIANTS[variant]})


def run_trial(cfg, prepared, workers: ResidentModels, folder: Path, diverge: bool = False) -> dict:
    """One trial on `workers`' base model: STEPS steps, samples, val_loss and both LoRA files.
    `diverge`: NaN LoRA weights before the first step, so that it raises TrainingDiverged."""
    trainer = LoraTrainer(cfg, prepared=prepared)
    got = workers.acquire(cfg, trainer.device, prepared)
    trainer.models = got.components
    trainer.setup()
    if diverge:
        with torch.no_grad():
            for name, p in trainer.models.unet.named_parameters():
                if "lora_A" in name:
                    p.fill_(float("nan"))
        try:
            trainer.step()
        except TrainingDiverged:
            return {"warm": got.warm, "diverged": True}
        raise AssertionError("the NaN trial did not diverge")
    losses = [h["loss"] for h in trainer.train(STEPS)]
    out = {"warm": got.warm, "losses": losses, "val_loss": trainer.validation_loss(),
           "images": trainer.sample(PROMPTS, SEEDS)}
    te = {"text_encoder": trainer.models.text_encoder} if cfg.train_text_encoder else {}
    folder.mkdir(parents=True, exist_ok=True)
    out["files"] = {
        "diffusers": read_lora(save_lora_diffusers(trainer.models.unet, folder / "lora_diffusers.safetensors", **te)),
        "kohya": read_lora(save_lora_kohya(trainer.models.unet, folder / "lora_kohya.safetensors",
                                           metadata={"ss_output_name": "t"}, **te)),
    }
    return out


def read_lora(path: Path) -> dict:
    """A LoRA file's tensors and its metadata but the dates."""
    with safe_open(str(path), "pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k not in DATED}
        return {"tensors": {k: f.get_tensor(k) for k in f.keys()}, "metadata": meta}


def assert_same_trial(a: dict, b: dict) -> None:
    """Bit for bit: losses, val_loss, sampled images, LoRA files' tensors and metadata."""
    assert a["losses"] == b["losses"]
    assert a["val_loss"] == b["val_loss"]
    assert np.array_equal(a["images"], b["images"])
    for layout in ("diffusers", "kohya"):
        fa, fb = a["files"][layout], b["files"][layout]
        assert fa["metadata"] == fb["metadata"], layout
        assert fa["tensors"].keys() == fb["tensors"].keys() and fa["tensors"], layout
        for key, tensor in fa["tensors"].items():
            assert torch.equal(tensor, fb["tensors"][key]), f"{layout}: {key}"


def _main(config_json: str, prepared_pickle: str, out_dir: str) -> None:
    torch.set_num_threads(2)  # as tests/conftest.py: the same kernels as the test process
    cfg = build_train_config(json.loads(Path(config_json).read_text()))
    prepared = pickle.loads(Path(prepared_pickle).read_bytes())
    out = run_trial(cfg, prepared, ResidentModels(), Path(out_dir) / "files")
    Path(out_dir, "outcome.pkl").write_bytes(pickle.dumps(out))


if __name__ == "__main__":
    _main(*sys.argv[1:4])
