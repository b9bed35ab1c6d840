"""The per-trial function Ray Tune runs: params -> TrainConfig -> train -> sample -> score -> report.

Every report carries a checkpoint with the trainer's exact state, so a trial whose worker died
continues from its last evaluation on another worker (Tune's FailureConfig retries it).
A training failure that would repeat on retry (NaN loss, an invalid config combination) is
recorded once in the sweep's storage; retries of that trial then fail at once with the reason.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from ray import tune

from sweeps import storage
from sweeps.results import (BASE_SAMPLES, FAILURES, LORA_DIFFUSERS, LORA_KOHYA, SAMPLES_FILE,  # noqa: F401
                            STATE_DIR, TRIAL_INFO)
from sweeps.sample_grids import save_grid
from sweeps.spec import SweepSpec, parse_spec
from sweeps.suite_scoring import make_suite_scorer
from toyworld.oracle import oracle_metrics
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.config import TrainConfigError
from trainer.loop import LoraTrainer, TrainingDiverged


Scorer = Callable[[np.ndarray, list[str]], dict]


class TrialFailed(RuntimeError):
    """Training of this config cannot succeed (diverged, invalid); retrying would repeat it."""


def train_trial(params: dict, spec_data: dict, run_info: dict) -> None:
    """Train one LoRA; every `eval.interval` steps sample, score and report with a checkpoint.

    run_info: {"sweep_uri": where failure records go, "evaluator": actor name or None,
    "tracking": tracking.trial_settings(...) or None}.
    """
    spec: SweepSpec = parse_spec(spec_data, "<sweep spec>")
    _quiet_libraries()
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_trial)))
    trial_id = tune.get_context().get_trial_id() or "local"
    failure_record = storage.join(run_info["sweep_uri"], FAILURES, f"{trial_id}.json")
    if storage.exists(failure_record):
        raise TrialFailed(json.loads(storage.read_text(failure_record))["reason"])
    try:
        trainer = LoraTrainer(spec.train_config(params))
    except TrainConfigError as err:
        _fail(failure_record, f"invalid config: {err}", params)
    cfg = trainer.cfg  # max_train_steps resolved from max_train_epochs when that is set
    resumed_from = _restore(trainer)
    scorer = make_suite_scorer(spec, run_info.get("evaluator"), trainer) or make_scorer(spec, run_info.get("evaluator"))
    prompts, seeds = spec.eval_prompts()
    if trainer.global_step == 0:
        _save_base_samples(trainer, run_info["sweep_uri"], prompts, seeds)
    tracker = _tracker(run_info.get("tracking"), params, trial_id)
    try:
        while trainer.global_step < cfg.max_train_steps:
            try:
                history = trainer.train(spec.eval.interval)
            except TrainingDiverged as err:
                _fail(failure_record, f"training diverged: {err}", params)
            images = trainer.sample(prompts, seeds)
            scores = scorer(images, prompts)
            if spec.eval.oracle == "toy_world":  # exact scores that only the toy world has
                scores = {**scores, **oracle_metrics(images, prompts, spec.trigger_word)}
            metrics = _metrics(trainer, history, scores, resumed_from)
            if tracker:
                tracker.log_evaluation(metrics, images, prompts, seeds)
            _report(trainer, spec, params, metrics, images, prompts, seeds)
    finally:
        if tracker:
            tracker.finish()


def _save_base_samples(trainer: LoraTrainer, sweep_uri: str, prompts: list[str], seeds: list[int]) -> None:
    """Once per sweep (the first trial to start): the base model's images of the eval prompts, for
    the labelled comparison in best_samples.png. A fresh LoRA (up-projections zero) leaves the
    base model's output unchanged, so no second model is loaded."""
    target = storage.join(sweep_uri, BASE_SAMPLES)
    if storage.exists(target):
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_grid(trainer.sample(prompts, seeds), Path(tmp) / BASE_SAMPLES)
        storage.copy_file(Path(tmp) / BASE_SAMPLES, target)


def _fail(record: str, reason: str, params: dict) -> None:
    reason = " ".join(reason.split())  # one line: it goes into tables and progress lines
    storage.write_text(record, json.dumps({"reason": reason, "params": params}, indent=2, default=str))
    raise TrialFailed(reason)


def _restore(trainer: LoraTrainer) -> int:
    """Load the trial's last checkpoint (after a worker loss or a resumed sweep); returns its step."""
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as folder:
        load_trainer_state(trainer, Path(folder) / STATE_DIR)
    return trainer.global_step


def _metrics(trainer: LoraTrainer, history: list[dict], scores: dict, resumed_from: int) -> dict:
    return {
        "step": trainer.global_step,
        "max_train_steps": trainer.cfg.max_train_steps,  # lets the results table tell pruned from complete
        "loss": float(np.mean([h["loss"] for h in history])),
        "lr": history[-1]["lr"],
        "images_per_sec": float(np.median([h["images_per_sec"] for h in history])),
        "resumed_from_step": resumed_from,
        **{k: float(v) for k, v in scores.items() if np.isscalar(v)},
    }


def _report(trainer, spec, params, metrics, images, prompts, seeds) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_trainer_state(trainer, folder / STATE_DIR)
        save_loras(trainer, spec, params, folder)
        save_grid(images, folder / SAMPLES_FILE)
        info = {"sweep": spec.name, "trial_id": tune.get_context().get_trial_id(), "params": params,
                "metrics": metrics, "prompts": prompts, "seeds": seeds}
        (folder / TRIAL_INFO).write_text(json.dumps(info, indent=2, default=str))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def save_loras(trainer: LoraTrainer, spec: SweepSpec, params: dict, folder: Path) -> None:
    """Both layouts into every checkpoint, so export only copies files (no model needed there)."""
    import trainer.export as export

    te = trainer.models.text_encoder if getattr(trainer.cfg, "train_text_encoder", False) else None
    extra = {"text_encoder": te} if te is not None else {}
    export.save_lora_diffusers(trainer.models.unet, folder / LORA_DIFFUSERS, **extra)
    if hasattr(export, "save_lora_kohya"):
        trial_id = tune.get_context().get_trial_id()
        meta = export.kohya_metadata(trainer.cfg, steps=trainer.global_step, output_name=f"{spec.name}-{trial_id}",
                                     lorasweep_sweep=spec.name, lorasweep_trial=trial_id,
                                     lorasweep_params=json.dumps(params, default=str))
        export.save_lora_kohya(trainer.models.unet, folder / LORA_KOHYA, metadata=meta, **extra)


def save_trainer_state(trainer: LoraTrainer, folder: Path) -> None:
    """The trainer's exact state (safetensors + JSON, atomic) beside the checkpoint's other files."""
    save_checkpoint(trainer, folder)


def load_trainer_state(trainer: LoraTrainer, folder: Path) -> None:
    load_checkpoint(trainer, folder)


def make_scorer(spec: SweepSpec, evaluator_name: str | None) -> Scorer:
    """The sweep's shared evaluator actor when the driver started one, else a CLIP model in this process."""
    if evaluator_name:
        from evaluator.remote import connect_evaluator, score_remote

        handle = connect_evaluator(name=evaluator_name, timeout_s=120)
        return lambda images, prompts: score_remote(handle, images, prompts, timeout_s=600)
    from evaluator import ClipModel, score_images

    clip = ClipModel.load(spec.evaluator.model, spec.evaluator.pretrained)
    return lambda images, prompts: score_images(clip, images, prompts)


def _tracker(settings: dict | None, params: dict, trial_id: str):
    if not settings:
        return None
    from sweeps.tracking import TrialTracker

    return TrialTracker(settings, params, trial_id)


def _quiet_libraries() -> None:
    """Per-trial progress bars, load warnings and per-checkpoint notices drown the sweep's own lines."""
    import logging

    import diffusers
    import transformers

    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
