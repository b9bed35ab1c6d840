"""Pruning on Ray Tune: the spec's Optuna pruner inside the sweep's study, or Ray's ASHA.

Ray's OptunaSearch creates its study with a NopPruner. The sweep's study carries the spec's
pruner instead (`make_pruner`, passed to sweeps.search.make_search_alg), because Optuna's pieces
cooperate through `study.pruner`: with a HyperbandPruner there, every `Trial` hands the sampler a
study filtered to its own bracket (optuna.pruners._filter_study), so TPE models each bracket
apart, as Hyperband expects. A pruner the study does not hold would decide alone, and TPE would
mix the brackets.

`OptunaPrunerScheduler` turns Optuna's decision into Tune's: on each result it reports the
trial's objective at its `step` to the trial's Optuna trial (through the sweep's
SweepOptunaSearch), asks that trial `should_prune()`, and returns STOP when it says so. STOP
ends the trial at once, so its GPU goes to the next config; the searcher then tells the Optuna
trial PRUNED and records it in `<study_dir>/pruned.json`. A trial whose `step` reached its
`max_train_steps` (the trainable reports both in every result) has nothing left to save: it
completes even when the pruner would prune it there. It is still asked, so the pruner keeps the
state Optuna alone would (SuccessiveHalving records each trial's rung values while deciding).

`AshaPruningScheduler` is Ray's ASHA on the trainable's `step`; trials it stops before `max_t`
are recorded PRUNED the same way (Ray's OptunaSearch would tell them COMPLETE).

Pruners are not saved in Optuna storage: the searcher installs a fresh copy of the spec's pruner
whenever it creates, loads or restores the study.
"""

from __future__ import annotations

from typing import Any

import optuna
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from sweeps.pruner_options import OPTUNA_PRUNERS, pruner_options
from sweeps.results import FAILED_KEY
from sweeps.search import SweepOptunaSearch, unwrap_searcher
from sweeps.spec_schema import SweepSpec


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner | None:
    """The spec's Optuna pruner (its resources are training steps), or None for none/asha."""
    name = OPTUNA_PRUNERS.get(spec.pruner.type)
    if name is None:
        return None
    return getattr(optuna.pruners, name)(**pruner_options(spec))


def make_scheduler(spec: SweepSpec) -> TrialScheduler | None:
    """The Tune scheduler that prunes for the spec, or None (Tune's FIFO) when pruner is none.
    An Optuna pruner acts only when the searcher's study holds it: build the search alg with
    `make_search_alg(spec, study_dir, pruner=make_pruner(spec))`."""
    if spec.pruner.type == "none":
        return None
    if spec.pruner.type == "asha":
        return AshaPruningScheduler(metric=spec.primary.metric, mode=spec.primary.mode, **pruner_options(spec))
    return OptunaPrunerScheduler(metric=spec.primary.metric, mode=spec.primary.mode)


class _SearcherLink:
    """Finds the sweep's SweepOptunaSearch through the controller that calls the scheduler."""

    _searcher: SweepOptunaSearch | None = None

    def searcher(self, tune_controller: Any) -> SweepOptunaSearch:
        if self._searcher is None:
            found = unwrap_searcher(tune_controller.search_alg)
            if found is None:
                raise RuntimeError(
                    f"{type(self).__name__} needs the sweep's searcher (sweeps.search.make_search_alg) "
                    f"as the Tuner's search_alg; got {type(tune_controller.search_alg).__name__}"
                )
            self._check(found)
            self._searcher = found
        return self._searcher

    def _check(self, searcher: SweepOptunaSearch) -> None:
        pass

    def __getstate__(self) -> dict:
        # Tune pickles the scheduler with the experiment; the searcher is saved on its own.
        state = self.__dict__.copy()
        state.pop("_searcher", None)
        return state

    def _accepts(self, metric: str | None, mode: str | None) -> bool:
        """TuneConfig may repeat the spec's metric/mode; only a different one is a conflict."""
        return metric in (None, self._metric) and mode in (None, self._mode)


class OptunaPrunerScheduler(_SearcherLink, FIFOScheduler):
    """FIFO scheduling; on each new objective value, the study's pruner decides STOP or CONTINUE."""

    def __init__(self, metric: str, mode: str):
        super().__init__()
        self._metric, self._mode = metric, mode

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        return self._accepts(metric, mode)

    def _check(self, searcher: SweepOptunaSearch) -> None:
        # Ray's default NopPruner would silently never prune.
        if isinstance(searcher.study.pruner, optuna.pruners.NopPruner):
            raise RuntimeError(
                "OptunaPrunerScheduler: the searcher's study has no pruner; build it with "
                "make_search_alg(spec, study_dir, pruner=sweeps.pruning.make_pruner(spec))"
            )

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        searcher = self.searcher(tune_controller)
        # Tune calls the scheduler before the searcher: report here, the searcher skips the repeat.
        step = searcher.report_intermediate(trial.trial_id, result)
        if step is None:
            return TrialScheduler.CONTINUE
        prune = searcher.should_prune(trial.trial_id)
        budget = result.get("max_train_steps")
        if prune and not (budget is not None and step >= budget):
            searcher.mark_pruned(trial.trial_id, step)
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE


class AshaPruningScheduler(_SearcherLink, ASHAScheduler):
    """Ray's ASHA over the trainable's `step`; its early stops are recorded as PRUNED."""

    def __init__(self, metric: str, mode: str, **options):
        super().__init__(time_attr="step", metric=metric, mode=mode, **options)

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        return self._accepts(metric, mode)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        searcher = self.searcher(tune_controller)
        if result.get(FAILED_KEY):  # no score: it must not enter a rung
            return TrialScheduler.CONTINUE
        searcher.report_intermediate(trial.trial_id, result)  # the study keeps the whole curve
        decision = super().on_trial_result(tune_controller, trial, result)
        step = result.get(self._time_attr)
        if decision == TrialScheduler.STOP and step is not None and step < self._max_t:
            searcher.mark_pruned(trial.trial_id, int(step))
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if result and result.get(FAILED_KEY):  # failed for good: no score for its bracket
            self._trial_info.pop(trial.trial_id, None)
            return
        super().on_trial_complete(tune_controller, trial, result)
