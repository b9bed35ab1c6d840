"""The per-trial function Ray Tune runs: plan + params -> TrainConfig -> train -> sample -> score -> report.

Everything the trial needs beyond its params comes in the TrialPlan (sweeps.trial_plan), resolved
once by the driver: the trial reads no spec or suite file and re-checks nothing.

Every report carries a checkpoint with the trainer's exact state, so a trial whose worker died
continues from its last evaluation on another worker (Tune's FailureConfig retries it).
A training failure that would repeat on retry (NaN loss, an invalid config combination) is not an
error for Tune: it is recorded in the sweep's storage, reported once as a result holding
`FAILED_KEY` (the reason) and the trial returns, so Tune ends it at once instead of starting a
worker for each of `max_failures` retries that would fail the same way.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from ray import tune

from evaluator.remote import score_remote
from sweeps import storage
from sweeps.eval_images import save_eval_images
from sweeps.evaluator_placement import connect_replica, served_locally
from sweeps.ground_truth_scoring import make_ground_truth_scorer
from sweeps.results import BASE_SAMPLES, FAILED_KEY, FAILURES, LORA_DIFFUSERS, LORA_KOHYA, SAMPLES_FILE, STATE_DIR, TRIAL_INFO  # noqa: F401
from sweeps.sample_grids import save_grid
from sweeps.shared_folders import fetch
from sweeps.suite_scoring import make_suite_scorer
from sweeps.trial_plan import TrialPlan
from sweeps.variant_sampling import make_evaluation
from toyworld.lora_task import heldout_scores
from toyworld.oracle import oracle_metrics
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.config import TrainConfigError
from trainer.export import kohya_metadata, save_lora_diffusers, save_lora_kohya
from trainer.loop import LoraTrainer, TrainingDiverged
from trainer.resident_models import acquire

Scorer = Callable[[np.ndarray, list[str]], dict]


class TrialFailed(RuntimeError):
    """Training of this config cannot succeed (diverged, invalid); retrying would repeat it."""


def train_trial(params: dict, plan: TrialPlan) -> None:
    """Train one LoRA; every `plan.eval_interval` steps sample, score and report with a checkpoint.
    A deterministic failure ends the trial with one failure result (see the module's docstring)."""
    started = time.perf_counter()
    _quiet_libraries()
    torch.set_num_threads(max(1, int(plan.cpus_per_trial)))
    trial_id = tune.get_context().get_trial_id() or "local"
    failure_record = storage.join(plan.sweep_uri, FAILURES, f"{trial_id}.json")
    if storage.exists(failure_record):  # failed for good before, e.g. by a driver since killed
        _report_failure(plan, json.loads(storage.read_text(failure_record))["reason"])
        return
    state = {"step": None}
    try:
        _train(params, plan, trial_id, failure_record, state, started)
    except TrialFailed as err:
        _report_failure(plan, str(err), state["step"])


def _report_failure(plan: TrialPlan, reason: str, step: int | None = None) -> None:
    """One last result: the reason under FAILED_KEY, the objectives as NaN (Tune checks that every
    result names them; NaN is never scored) and no checkpoint. The searcher tells Optuna FAIL."""
    metrics = {FAILED_KEY: reason, **{m: float("nan") for m in plan.objective_metrics}}
    if step is not None:
        metrics["step"] = step
    tune.report(metrics)


def _train(params: dict, plan: TrialPlan, trial_id: str, failure_record: str, state: dict, started: float) -> None:
    if plan.shared:  # remote storage: the driver's caches and class images, where this node lacks them
        fetch(plan.shared, plan.sweep_uri, plan.fixed.get("cache_dir"))
    try:
        trainer = LoraTrainer(plan.train_config(params), prepared=plan.prepared)  # checks before any load
        # The worker's resident base model when the previous trial here used the same one.
        base = acquire(trainer.cfg, trainer.device, plan.prepared)
        trainer.models = base.components
        trainer.setup()
    except TrainConfigError as err:
        _fail(failure_record, f"invalid config: {err}", params)
    resumed_from = _restore(trainer)
    state["step"] = trainer.global_step
    evaluate = make_evaluation(plan, trainer, make_suite_scorer(plan, trainer) or make_scorer(plan))
    ground_truth = make_ground_truth_scorer(plan, trial_id)  # None without eval.ground_truth
    prompts, seeds = plan.prompts, plan.seeds
    if trainer.global_step == 0:
        _save_base_samples(trainer, plan.sweep_uri, prompts, seeds)
        if ground_truth is not None:
            ground_truth.ensure_base(trainer)
    tracker = _tracker(plan.tracking, params, trial_id)
    # From the trial's start to its first training step: what a pruned trial pays before it learns.
    startup = {"startup_s": time.perf_counter() - started, "warm_start": float(base.warm)}
    try:
        while trainer.global_step < trainer.max_train_steps:
            try:
                history = trainer.train(plan.eval_interval)
            except TrainingDiverged as err:
                _fail(failure_record, f"training diverged: {err}", params)
            images, scores = evaluate(prompts, seeds)  # every variant of the plan (sweeps.variant_sampling)
            if plan.oracle == "toy_world":  # exact scores that only the toy world has
                scores = {**scores, **oracle_metrics(images, prompts, plan.trigger_word),
                          **heldout_scores(trainer.sample, plan.trigger_word)}
            if ground_truth is not None:
                scores = {**scores, **ground_truth(trainer)}
            metrics = {**_metrics(trainer, history, scores, resumed_from), **startup}
            state["step"] = trainer.global_step
            save_eval_images(plan.sweep_uri, trial_id, trainer.global_step, images)  # the report's steps grid
            if tracker:
                tracker.log_evaluation(metrics, images, prompts, seeds)
            _report(trainer, plan, params, metrics, images, prompts, seeds)
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
        load_checkpoint(trainer, Path(folder) / STATE_DIR)
    return trainer.global_step


def _metrics(trainer: LoraTrainer, history: list[dict], scores: dict, resumed_from: int) -> dict:
    return {
        "step": trainer.global_step,
        "max_train_steps": trainer.max_train_steps,  # lets the results table tell pruned from complete
        "loss": float(np.mean([h["loss"] for h in history])),
        "val_loss": trainer.validation_loss(),  # fixed timesteps, noise and latents: comparable across evaluations
        "lr": history[-1]["lr"],
        "images_per_sec": float(np.median([h["images_per_sec"] for h in history])),
        "resumed_from_step": resumed_from,
        **{k: float(v) for k, v in scores.items() if np.isscalar(v)},
        # The objective split over the suite's items (prompt x seed): the wilcoxon pruner's paired test.
        **({"objective_items": scores["objective_items"]} if "objective_items" in scores else {}),
        **{k: scores[k] for k in ("gt_lpips_items", "base_gt_lpips_items") if k in scores},  # LPIPS per image
    }


def _report(trainer, plan: TrialPlan, params, metrics, images, prompts, seeds) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_checkpoint(trainer, folder / STATE_DIR)
        save_loras(trainer, plan, params, folder)
        save_grid(images, folder / SAMPLES_FILE)
        info = {"sweep": plan.sweep, "trial_id": tune.get_context().get_trial_id(), "params": params,
                "metrics": metrics, "prompts": prompts, "seeds": seeds}
        (folder / TRIAL_INFO).write_text(json.dumps(info, indent=2, default=str))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def save_loras(trainer: LoraTrainer, plan: TrialPlan, params: dict, folder: Path) -> None:
    """Both layouts into every checkpoint, so export only copies files (no model needed there); with
    EMA, the averaged LoRA. A full fine-tune writes none: its checkpoint's state holds the trained
    weights (and EMA), which export puts into the base model (trainer.full_export)."""
    if trainer.cfg.method == "full":
        return
    with trainer.eval_weights():
        _save_lora_files(trainer, plan, params, folder)


def _save_lora_files(trainer: LoraTrainer, plan: TrialPlan, params: dict, folder: Path) -> None:
    te = trainer.models.text_encoder if trainer.cfg.train_text_encoder else None
    extra = {"text_encoder": te} if te is not None else {}
    save_lora_diffusers(trainer.models.unet, folder / LORA_DIFFUSERS, **extra)
    trial_id = tune.get_context().get_trial_id()
    meta = kohya_metadata(trainer.cfg, steps=trainer.global_step, output_name=f"{plan.sweep}-{trial_id}",
                          prepared=plan.prepared, lorasweep_sweep=plan.sweep, lorasweep_trial=trial_id,
                          lorasweep_params=json.dumps(params, default=str))
    save_lora_kohya(trainer.models.unet, folder / LORA_KOHYA, metadata=meta, **extra)


def make_scorer(plan: TrialPlan) -> Scorer:
    """The sweep's shared evaluator actor when the driver started one, else a CLIP model in this process."""
    if plan.evaluator_actor:
        handle = connect_replica(plan.evaluator_actor, plan.evaluator_local_wait_s)
        local = float(served_locally(handle))  # reported: 1 when this node's own replica scored
        return lambda images, prompts: {**score_remote(handle, images, prompts, timeout_s=600), "evaluator_local": local}
    from evaluator import ClipModel, score_images  # torch and open_clip: only where the model runs

    clip = ClipModel.load(plan.evaluator_model, plan.evaluator_pretrained)
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
