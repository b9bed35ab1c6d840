"""The sweep's Optuna search on Ray Tune: sampler, conditional space, study storage, PRUNED bookkeeping.

`make_search_alg(spec, study_dir)` returns `ConcurrencyLimiter(SweepOptunaSearch(...))`. The
Optuna study lives in `<study_dir>/optuna.journal` (a journal file: append-only, safe on NFS) or
in the storage given (sweeps.study_storage.open_storage: `study.storage`, written through to an
object store, or a database), named after the sweep and loaded if it exists, so a resumed sweep
keeps its history and `optuna-dashboard <study_dir>/optuna.journal` watches it live.

Ray's OptunaSearch (ray 2.60) creates its study with a NopPruner, reports intermediate values at
`training_iteration` and tells every trial that a scheduler stopped COMPLETE with its partial
score, so the sampler learns from it as if it had finished. SweepOptunaSearch gives the study the
pruner it is built with (samplers read `study.pruner`: TPE samples within Hyperband's brackets),
reports at the trainable's `step`, answers `should_prune` through Optuna's own Trial, and tells
trials that a scheduler pruned PRUNED; it also records them in `pruned.json`. Which pruner, and
whether its answer stops a trial, are decided in sweeps.pruning; this module keeps the study.

Optuna storage does not keep the pruner, and Tune restores the searcher from a pickle whose study
holds the pruner as it was then: every (re)start installs a fresh copy of the given pruner.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import TrialState
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from sweeps import storage
from sweeps.results import FAILED_KEY
from sweeps.spec_schema import ParamSpace, SweepSpec, search_order
from sweeps.study_storage import JOURNAL_FILE, PRUNED_FILE, RAY_TRIAL_ATTR, journal_storage, load_pruned  # noqa: F401
from sweeps.study_storage import flush as flush_study


def optuna_distribution(param: ParamSpace) -> optuna.distributions.BaseDistribution:
    if param.type == "choice":
        return optuna.distributions.CategoricalDistribution(param.values)
    if param.type == "int":
        return optuna.distributions.IntDistribution(int(param.low), int(param.high), log=param.log,
                                                    step=int(param.step or 1))
    log = param.type == "loguniform"
    return optuna.distributions.FloatDistribution(param.low, param.high, log=log, step=param.step)


class ConditionalSpace:
    """Define-by-run space: a field with `when` is suggested only when its condition holds on the
    values chosen so far (or the fixed values). A class, not a closure: the searcher is pickled."""

    def __init__(self, spec: SweepSpec):
        self.params = spec.searched()
        self.order = search_order(self.params)
        fixed = spec.fixed()
        self.fixed = {k: fixed[k] for p in self.params.values() for k in p.conditions() if k in fixed}

    def __call__(self, trial: optuna.Trial) -> None:
        values = dict(self.fixed)
        for name in self.order:
            p = self.params[name]
            if all(values.get(k, _default(k)) in ok for k, ok in p.conditions().items()):
                values[name] = suggest(trial, name, p)


def suggest(trial: optuna.Trial, name: str, p: ParamSpace) -> Any:
    """Through the public suggest_* methods: Ray's OptunaSearch captures the config from them."""
    if p.type == "choice":
        return trial.suggest_categorical(name, p.values)
    if p.type == "int":
        return trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(name, p.low, p.high, step=p.step, log=p.type == "loguniform")


def _default(field: str) -> Any:
    from trainer.config import TrainConfig

    return TrainConfig.model_fields[field].default


def startup_trials(spec: SweepSpec) -> int:
    """Random trials before TPE/GP model the results: a third of the budget, at most Optuna's 10."""
    return max(1, min(10, spec.search.num_trials // 3))


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    s, seed = spec.search, spec.search.seed
    params = spec.searched()
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.sampler == "grid":
        return optuna.samplers.GridSampler({n: p.grid_values() for n, p in params.items()}, seed=seed)
    if s.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_trials(spec))
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=nsga2_population(spec))
    # Multivariate TPE with constant liar: parallel trials do not all pick the same config;
    # group=True models each conditional sub-space on its own.
    conditional = any(p.when for p in params.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # `group` is "experimental"
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, group=conditional,
                                          n_startup_trials=startup_trials(spec))


def nsga2_population(spec: SweepSpec) -> int:
    """Generation size: a quarter of the budget (at least 2, at most Optuna's 50), so several
    generations evolve within the trial budget."""
    return max(2, min(50, spec.search.num_trials // 4))


def load_study(study_dir: Path, name: str) -> optuna.Study:
    """A study from the journal in `study_dir` (sweeps.study_storage.load_sweep_study: wherever `study.storage` says)."""
    return optuna.load_study(study_name=name, storage=journal_storage(study_dir))


# Items per evaluation that paired reporting allows (an eval suite is prompts x seeds, far fewer).
MAX_ITEMS = 1_000_000


def paired_step(step: int, item: int) -> int:
    """The Optuna step of item `item` of the evaluation at training step `step` (wilcoxon pruning)."""
    if not 0 <= item < MAX_ITEMS:
        raise ValueError(f"item index {item} outside [0, {MAX_ITEMS})")
    return step * MAX_ITEMS + item


class SweepOptunaSearch(OptunaSearch):
    """OptunaSearch with the study in the sweep's storage and holding `pruner` (None: no pruning),
    intermediate values at `step`, initial configs enqueued once per study, and trials a
    scheduler pruned told PRUNED."""

    def __init__(self, *, study_dir: str | Path, initial_configs: list[dict] | None = None,
                 pruner: optuna.pruners.BasePruner | None = None, **kwargs):
        self.study_dir = study_dir  # where pruned.json goes: a local folder or one in the sweep's storage
        self.pruned: dict[str, dict] = {}  # Tune trial id -> {"number": Optuna trial number, "step": step}
        self._last_step: dict[str, int] = {}  # Tune trial id -> last step reported to Optuna
        self._initial_configs = list(initial_configs or [])
        self._pruner_template = pruner  # never used itself: each (re)start copies it
        super().__init__(**kwargs)

    def _setup_study(self, mode):
        super()._setup_study(mode)
        self._install_pruner()
        # Not through OptunaSearch's points_to_evaluate: that enqueues them again on every resume.
        for config in self._initial_configs:
            self._ot_study.enqueue_trial(config, skip_if_exists=True)

    def _install_pruner(self) -> None:
        # A fresh pruner, as optuna.load_study(pruner=...) in a new process would have: lazily
        # built state (Hyperband's brackets) is rebuilt from the study, not carried in a pickle.
        template = getattr(self, "_pruner_template", None)  # absent when an older lorasweep pickled it
        self._ot_study.pruner = copy.deepcopy(template) if template is not None else optuna.pruners.NopPruner()

    def save(self, checkpoint_path: str) -> None:
        # Tune saves this searcher with its experiment state: the stored study must be as new.
        flush_study(self._storage)
        super().save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        if self._ot_study is not None:
            self._install_pruner()

    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    @property
    def is_multi_objective(self) -> bool:
        return isinstance(self.metric, list)

    def suggest(self, trial_id: str) -> dict | None:
        new = trial_id not in self._ot_trials
        config = super().suggest(trial_id)
        if new:
            self._ot_trials[trial_id].set_user_attr(RAY_TRIAL_ATTR, trial_id)
        return config

    def report_intermediate(self, trial_id: str, result: dict) -> int | None:
        """Report the objective to the Optuna trial at the result's `step` (the trainable's
        training step; `training_iteration` when absent). Returns the step when this is a new
        value, None when the result carries no objective or repeats a step (a restored trial).

        With a WilcoxonPruner and a result holding `<metric>_items` (the objective split over the
        suite's prompt x seed items, see evaluator.score.objective_items), each item is reported
        at its own Optuna step, `paired_step(step, i)`: the pruner then compares a trial with the
        best one item by item, at the same training steps, as its signed-rank test intends.
        """
        if self.is_multi_objective or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return None
        if result.get(FAILED_KEY):  # a failed trial's last result holds no score
            return None
        value = result.get(self.metric)
        if value is None:
            return None
        step = int(result.get("step", result.get(TRAINING_ITERATION, 0)))
        if step <= self._last_step.get(trial_id, -1):
            return None
        items = result.get(f"{self.metric}_items")
        if items and isinstance(self._ot_study.pruner, optuna.pruners.WilcoxonPruner):
            for i, item in enumerate(items):
                self._ot_trials[trial_id].report(float(item), paired_step(step, i))
        else:
            self._ot_trials[trial_id].report(float(value), step)
        self._last_step[trial_id] = step
        return step

    def should_prune(self, trial_id: str) -> bool:
        """Optuna's own answer for the trial's curve so far: `Trial.should_prune`, which asks
        `study.pruner` (the pruner may record state in the study while deciding)."""
        return self._ot_trials[trial_id].should_prune()

    def mark_pruned(self, trial_id: str, step: int) -> None:
        """Called by the scheduler that stops the trial: it is told PRUNED when Tune completes it."""
        self.pruned[trial_id] = {"number": self._ot_trials[trial_id].number, "step": int(step)}
        storage.write_text(storage.join(self.study_dir, PRUNED_FILE), json.dumps(self.pruned, indent=2, sort_keys=True))

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.report_intermediate(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and result.get(FAILED_KEY) and trial_id not in self._completed_trials and trial_id in self._ot_trials:
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.FAIL)  # failed for good (sweeps.trainable)
            self._completed_trials.add(trial_id)
        elif trial_id in self.pruned and trial_id not in self._completed_trials and not error:
            # Optuna records the last intermediate value as a pruned trial's value.
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)
        else:
            super().on_trial_complete(trial_id, result=result, error=error)
        flush_study(self._storage)  # a trial's end is worth keeping at once


def unwrap_searcher(search_alg: Any) -> SweepOptunaSearch | None:
    """The SweepOptunaSearch inside Tune's wrappers (SearchGenerator, ConcurrencyLimiter)."""
    node = search_alg
    while node is not None and not isinstance(node, SweepOptunaSearch):
        node = getattr(node, "searcher", None)
    return node


def make_search_alg(spec: SweepSpec, study_dir: str | Path, pruner: optuna.pruners.BasePruner | None = None,
                    study_storage: BaseStorage | None = None) -> ConcurrencyLimiter:
    """The sweep's searcher: Optuna over the spec's space, its study in `study_storage` (default:
    the journal `<study_dir>/optuna.journal`) and pruned.json in `study_dir` (a local folder or a
    URI), holding `pruner` (the spec's is sweeps.pruning.make_pruner(spec); None: no pruning)."""
    multi = len(spec.objectives) > 1
    searcher = SweepOptunaSearch(
        study_dir=study_dir,
        initial_configs=spec.search.initial_configs,
        space=ConditionalSpace(spec),
        metric=[o.metric for o in spec.objectives] if multi else spec.primary.metric,
        mode=[o.mode for o in spec.objectives] if multi else spec.primary.mode,
        sampler=make_sampler(spec),
        study_name=spec.name,
        storage=study_storage if study_storage is not None else journal_storage(study_dir),
        pruner=pruner,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=spec.search.max_concurrent)

