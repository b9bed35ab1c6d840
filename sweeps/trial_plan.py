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
from typing import Any

from evaluator.suites import SuiteItem, expand_suite
from evaluator.tiny import TINY_CLIP_ID, ensure_tiny_clip
from sweeps.cluster_fit import local_fit_problems
from sweeps.eval_variants import EvalVariants, plan_variants
from sweeps.results import sweep_uri
from sweeps.spec import SpecError
from sweeps.spec_schema import SweepSpec
from trainer.config import TrainConfig, TrainConfigError, build_train_config
from trainer.dataset_layouts import DatasetError, detect_dataset_type
from trainer.model_loading import BaseModelError, resolve_base_model
from trainer.preparation import Prepared, prepare
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
    eval_variants: EvalVariants | None = None  # guidance scales, LoRA strengths, img2img (None: sample once)

    def train_config(self, params: dict[str, Any]) -> TrainConfig:
        return build_train_config({**self.fixed, **params})


def input_problems(spec: SweepSpec, local: bool) -> list[str]:
    """What is wrong with the spec's base model, dataset, optional judges' files and resources on
    this machine, found without loading a model: each as `key: message`. `local` (no --address):
    the trial's CPUs and GPUs must fit this machine."""
    problems = []
    try:
        resolve_base_model(spec.base_model)
    except BaseModelError as err:
        problems.append(f"base_model: {err}")
    try:
        detect_dataset_type(resolve_dataset(spec.dataset))
    except DatasetError as err:
        problems.append(f"dataset: {err}")
    paths = spec.evaluator.judge_paths()
    if any(paths.values()):  # read, not loaded: a DINO folder's config and weights header, a head's keys and width
        from evaluator.judges import judge_problems

        problems += [f"evaluator.{key}: {msg}" for key, msg in
                     judge_problems(paths["dino"], paths["aesthetic"], spec.evaluator.model).items()]
    if local:
        import torch

        problems += local_fit_problems(spec.resources, os.cpu_count() or 1, torch.cuda.device_count())
    return problems


def build_plan(spec: SweepSpec, source: str = "<spec>", local: bool = True) -> TrialPlan:
    """The plan of `spec`; every input problem raises one SpecError (exit 2, no traceback)."""
    problems = input_problems(spec, local)
    if problems:
        raise SpecError(source, problems)
    fixed = {**spec.fixed(), "base_model": _resolved_base_model(spec.base_model),
             "dataset": str(resolve_dataset(spec.dataset).resolve())}
    if spec.evaluator.model == TINY_CLIP_ID:
        ensure_tiny_clip()
    try:
        prepared = prepare(build_train_config(fixed), clip_skips=_searched_clip_skips(spec))
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
        objective_weights=spec.objective_weights(),
        evaluator_dino=spec.evaluator.judge_paths()["dino"], evaluator_aesthetic=spec.evaluator.judge_paths()["aesthetic"],
        eval_variants=plan_variants(suite, spec.eval.lora_scales, spec.trigger_word, spec.eval.class_word),
    )


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
