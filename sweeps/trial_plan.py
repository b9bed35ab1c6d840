"""The trial plan: everything a trial needs, resolved once by the driver before any trial starts.

The driver builds it from the validated spec: built-in models and data made, local paths made
absolute, the dataset read and verified once, class images and latent/text caches built, the base
model hashed, the prompt suite expanded. Trials receive the plan (Ray pickles it) and build their
training config from `plan.fixed` and their params; they never read the spec or the suite file,
never re-verify the dataset and never re-hash a model, so a trial runs on a node where neither
file exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluator.suites import SuiteItem, expand_suite
from evaluator.tiny import TINY_CLIP_ID, ensure_tiny_clip
from sweeps.class_image_job import ensure_sweep_class_images, gpu_worker_wanted
from sweeps.cluster_fit import local_fit_problems
from sweeps.eval_variants import EvalVariants, plan_variants
from sweeps.results import sweep_uri
from sweeps.spec import SpecError, key_problem
from sweeps.spec_schema import SweepSpec
from trainer.class_images import class_dir_problems, missing_class_images
from trainer.config import TrainConfig, TrainConfigError, build_train_config
from trainer.dataset_captions import caption_dataset, caption_input_problems
from trainer.dataset_layouts import DatasetError, detect_dataset_type
from trainer.model_loading import BaseModelError, resolve_base_model
from trainer.preparation import Prepared, check_instance_data, prepare
from trainer.train_data import resolve_dataset


@dataclass(frozen=True)
class TrialPlan:
    """One sweep's resolved inputs, shared by all its trials (picklable, no open resources)."""

    sweep: str
    sweep_uri: str  # where failure records and the base model's samples go
    fixed: dict[str, Any]  # training values every trial shares; base_model and dataset resolved
    prepared: Prepared  # verified data, model hashes and cache fingerprints (trainer.preparation)
    prompts: list[str]  # what every evaluation samples, with its seeds
    seeds: list[int]
    suite_items: list[SuiteItem] | None  # the expanded suite; None when `eval.prompts` are used
    trigger_word: str | None
    eval_interval: int  # training steps between evaluations
    oracle: str | None  # `eval.oracle`
    evaluator_model: str  # CLIP for in-process scoring, when no shared evaluator runs
    evaluator_pretrained: str | None
    cpus_per_trial: float
    evaluator_actor: str | None = None  # the shared evaluator's actor name, set by the driver
    tracking: dict | None = None  # sweeps.tracking.trial_settings(spec)
    objective_weights: dict[str, float] | None = None  # `objective.weights` (None: the defaults)
    evaluator_dino: str | None = None  # the optional judges' absolute paths (`evaluator.dino`, `.aesthetic`)
    evaluator_aesthetic: str | None = None
    evaluator_local_wait_s: float = 60.0  # `evaluator.placement.local_wait_s`
    shared: tuple = ()  # sweeps.shared_folders.SharedFolder: what a trial fetches from remote storage
    objective_metrics: tuple[str, ...] = ()  # the spec's objectives (a failed trial's result names them)
    ground_truth: dict | None = None  # sweeps.ground_truth_scoring.plan_entry(spec): pairs, seed, LPIPS backbone
    eval_variants: EvalVariants | None = None  # guidance scales, LoRA strengths, img2img (None: sample once)

    def train_config(self, params: dict[str, Any]) -> TrainConfig:
        return build_train_config({**self.fixed, **params})


def input_problems(spec: SweepSpec, local: bool) -> list[str]:
    """What is wrong with the spec's base model, dataset, optional judges' files and resources on
    this machine, found without loading a model: each as `key: message`. `local` (no --address):
    the trial's CPUs and GPUs must fit this machine."""
    problems = (key_problem("base_model", lambda: resolve_base_model(spec.base_model), BaseModelError)
                + key_problem("dataset", lambda: detect_dataset_type(resolve_dataset(spec.dataset)), DatasetError)
                + _class_dir_problems(spec))
    if spec.caption is not None and not any(p.startswith("dataset:") for p in problems):
        names = {"model": "caption.model", "trigger": "trigger_word"}
        problems += [f"{names.get(key, key)}: {msg}" for key, msg in
                     caption_input_problems(resolve_dataset(spec.dataset), spec.trigger_word, spec.caption)]
    paths = spec.evaluator.judge_paths()
    if any(paths.values()):  # read, not loaded: a DINO folder's config and weights header, a head's keys and width
        from evaluator.judges import judge_problems

        problems += [f"evaluator.{key}: {msg}" for key, msg in
                     judge_problems(paths["dino"], paths["aesthetic"], spec.evaluator.model).items()]
    if spec.eval.ground_truth is not None:
        from sweeps.ground_truth_scoring import ground_truth_problems

        problems += ground_truth_problems(spec.eval.ground_truth)
    if local:
        import torch

        problems += local_fit_problems(spec.resources, os.cpu_count() or 1, torch.cuda.device_count())
    return problems


def _class_dir_problems(spec: SweepSpec) -> list[str]:
    try:
        cfg = build_train_config(spec.fixed())
    except TrainConfigError:  # a searched field completes it; the spec checks judged the values
        return []
    return [f"train.class_data_dir: {msg}" for msg in class_dir_problems(cfg)]


def build_plan(spec: SweepSpec, source: str = "<spec>", local: bool = True, address: str | None = None) -> TrialPlan:
    """The plan of `spec`; every input problem raises one SpecError (exit 2, no traceback).
    `address`: the cluster, where missing class images are made on a GPU worker."""
    problems = input_problems(spec, local)
    if problems:
        raise SpecError(source, problems)
    fixed = {**spec.fixed(), "base_model": _resolved_base_model(spec.base_model),
             "dataset": str(resolve_dataset(spec.dataset).resolve()), **_absolute_folders(spec.fixed())}
    if spec.evaluator.model == TINY_CLIP_ID:
        ensure_tiny_clip()
    if spec.caption is not None:  # before the dataset is read: the captions are what it reads
        print(caption_dataset(fixed["dataset"], spec.trigger_word, spec.caption).summary(), flush=True)
    try:
        cfg = build_train_config(fixed)
        if missing_class_images(cfg):
            check_instance_data(cfg)  # before minutes of sampling
            ensure_sweep_class_images(cfg, cfg.class_data_dir, gpu_worker_wanted(spec, address))
        prepared = prepare(cfg, clip_skips=_searched_clip_skips(spec))
    except DatasetError as err:
        raise SpecError(source, [f"dataset: {err}"]) from None
    except BaseModelError as err:
        raise SpecError(source, [f"base_model: {err}"]) from None
    except TrainConfigError as err:  # a value the base model cannot take (clip skip beyond its text encoder)
        raise SpecError(source, [f"{'space' if path in spec.space else 'train'}.{path}: {msg}"
                                 for path, msg in err.problems]) from None
    prompts, seeds = spec.eval_prompts()
    suite = spec.prompt_suite()
    items = expand_suite(suite, spec.trigger_word, spec.eval.class_word) if suite is not None else None
    return TrialPlan(
        sweep=spec.name, sweep_uri=sweep_uri(spec), fixed=fixed, prepared=prepared, prompts=prompts, seeds=seeds,
        suite_items=items, trigger_word=spec.trigger_word, eval_interval=spec.eval.interval, oracle=spec.eval.oracle,
        evaluator_model=spec.evaluator.model, evaluator_pretrained=spec.evaluator.pretrained,
        cpus_per_trial=spec.resources.cpus_per_trial,
        objective_weights=spec.objective_weights(), objective_metrics=tuple(o.metric for o in spec.objectives),
        evaluator_local_wait_s=spec.evaluator.placement.local_wait_s,
        evaluator_dino=spec.evaluator.judge_paths()["dino"], evaluator_aesthetic=spec.evaluator.judge_paths()["aesthetic"],
        ground_truth=_ground_truth_entry(spec),
        eval_variants=plan_variants(suite, spec.eval.lora_scales, spec.trigger_word, spec.eval.class_word),
    )


def _absolute_folders(fixed: dict[str, Any]) -> dict[str, str]:
    """The class and validation folders made absolute (relative to the working directory, as the
    dataset), so that a trial's worker, started elsewhere, reads the same files."""
    return {k: str(Path(fixed[k]).expanduser().resolve()) for k in ("class_data_dir", "validation_dir") if fixed.get(k)}
def _ground_truth_entry(spec: SweepSpec) -> dict | None:
    if spec.eval.ground_truth is None:
        return None
    from sweeps.ground_truth_scoring import plan_entry

    return plan_entry(spec.eval.ground_truth)


def _resolved_base_model(base_model: str) -> str:
    """A built-in as the folder or file it was built into; a local path made absolute; a hub id as is."""
    kind, location = resolve_base_model(base_model)
    return location if base_model.startswith("builtin:") or kind != "hub" else base_model


def _searched_clip_skips(spec: SweepSpec) -> list[int] | None:
    """Every clip skip the space can give, so the driver builds each one's text cache."""
    searched = spec.searched().get("clip_skip")
    if searched is None:
        return None
    if searched.type == "int":
        low, high = (int(v) for v in searched.extremes())
        return list(range(low, high + 1))
    return [int(v) for v in searched.extremes()]
