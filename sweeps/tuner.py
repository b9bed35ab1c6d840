"""Builds and runs the Ray Tune sweep: Optuna search, pruning scheduler, failure/checkpoint policy, resume."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import ray
from ray import tune

from sweeps import storage
from sweeps.cluster_fit import TrialStartTimeout, cluster_fit_warning
from sweeps.evaluator_placement import ReplicaWatcher
from sweeps.progress import ProgressPrinter
from sweeps.pruning import make_pruner, make_scheduler
from sweeps.ray_session import ensure_ray
from sweeps.report import ReportWriter
from sweeps.results import EXPERIMENT, experiment_path, sweep_uri
from sweeps.search import RAY_TRIAL_ATTR, make_search_alg
from sweeps.snapshot_repair import repair_search_state
from sweeps.spec_schema import SweepSpec
from sweeps.study_storage import load_sweep_study, open_storage, study_uri
from sweeps.tracking import trial_settings
from sweeps.trainable import train_trial
from sweeps.trial_plan import TrialPlan


def evaluator_name(spec: SweepSpec) -> str:
    """The shared evaluator actor of this sweep (replicas are named after it)."""
    return f"lorasweep-evaluator-{spec.name}"


def make_trainable(spec: SweepSpec, plan: TrialPlan | None, trainable: Callable | None = None):
    """The function Tune runs, with the spec's resources; `trainable` replaces train_trial (stubs in tests)."""
    if trainable is None:
        plan = replace(plan, evaluator_actor=evaluator_name(spec), tracking=trial_settings(spec))
        trainable = tune.with_parameters(train_trial, plan=plan)
    return tune.with_resources(trainable, {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial})


def build_tuner(spec: SweepSpec, plan: TrialPlan | None, trainable: Callable | None = None,
                report: bool | None = None) -> tune.Tuner:
    """`report`: rewrite the sweep's report after every finished trial (default: for real trainings,
    not for stub trainables)."""
    metric, mode = _metric_mode(spec)
    report = trainable is None if report is None else report
    return tune.Tuner(
        make_trainable(spec, plan, trainable),
        tune_config=tune.TuneConfig(
            search_alg=make_search_alg(spec, study_uri(spec), pruner=make_pruner(spec), study_storage=open_storage(spec)),
            scheduler=make_scheduler(spec),
            num_samples=spec.search.num_trials,
            metric=metric,
            mode=mode,
            reuse_actors=True,  # a trial worker starts in seconds; reusing it for the next trial saves them
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=sweep_uri(spec),
            callbacks=[ProgressPrinter(spec.primary.metric), TrialStartTimeout(spec.resources),
                       *([ReportWriter(spec)] if report else [])],
            failure_config=tune.FailureConfig(max_failures=spec.failure.max_failures),
            # Keep each trial's best checkpoints (for export) and, always, its latest (for resume).
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=max(2, spec.export.top_k),
                checkpoint_score_attribute=spec.primary.metric,
                checkpoint_score_order=spec.primary.mode,
            ),
            verbose=0,
        ),
    )


def _metric_mode(spec: SweepSpec) -> tuple[str | None, str | None]:
    # A searcher with a list of objectives sets its own metrics; Tune's single metric must then stay unset.
    if len(spec.objectives) > 1:
        return None, None
    return spec.primary.metric, spec.primary.mode


def can_resume(spec: SweepSpec) -> bool:
    return tune.Tuner.can_restore(experiment_path(spec))


def restore_tuner(spec: SweepSpec, plan: TrialPlan | None, trainable: Callable | None = None) -> tune.Tuner:
    """The killed sweep, its searcher and Optuna study with it; finished and failed trials stay as they are."""
    _close_orphaned_study_trials(spec)
    for change in repair_search_state(experiment_path(spec)):  # a head lost mid-save (sweeps.snapshot_repair)
        print(f"sweep {spec.name}: saved search state made consistent with its trials: {change}", flush=True)
    return tune.Tuner.restore(
        experiment_path(spec),
        trainable=make_trainable(spec, plan, trainable),
        resume_unfinished=True,
        resume_errored=False,
        restart_errored=False,
    )


def _close_orphaned_study_trials(spec: SweepSpec) -> list[int]:
    """Mark FAIL the Optuna trials that a killed driver asked for after its last saved experiment state.

    Tune restores the searcher as it was at that save; a trial suggested later exists in the study
    journal (RUNNING) but in no Tune trial, so nothing would ever finish it and TPE's constant liar
    would count it as running forever. Returns the numbers of the trials closed.
    """
    from optuna.trial import TrialState
    from ray.tune import ExperimentAnalysis

    study = load_sweep_study(spec)
    if study is None:  # no study yet (killed before the first suggestion)
        return []
    known = {t.trial_id for t in ExperimentAnalysis(experiment_path(spec)).trials}
    closed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        if t.state == TrialState.RUNNING and t.user_attrs.get(RAY_TRIAL_ATTR) not in known:
            study.tell(t.number, state=TrialState.FAIL)
            closed.append(t.number)
    if closed:
        print(f"study {spec.name}: trials {closed} were started by the killed driver but never ran; marked FAIL", flush=True)
    return closed


def run_sweep(spec: SweepSpec, plan: TrialPlan | None, address: str | None = None, resume: bool = False,
              trainable: Callable | None = None, report: bool | None = None) -> tune.ResultGrid:
    """Run (or, with `resume` or when the storage already holds this sweep, continue) the sweep.

    `plan` (sweeps.trial_plan.build_plan) is what train_trial needs; None with a stub `trainable`.
    `report`: see build_tuner (a resumed sweep keeps the callbacks it was started with)."""
    storage.check_writable(sweep_uri(spec))
    Path(spec.output_dir).mkdir(parents=True, exist_ok=True)
    open_storage(spec)  # a study database that cannot be reached fails here, before Ray starts
    restorable = can_resume(spec)
    if resume and not restorable:
        raise FileNotFoundError(f"--resume: no sweep to resume at {experiment_path(spec)}; run without --resume to start it")
    ensure_ray(address)
    if address:
        warning = cluster_fit_warning(spec.resources, ray.nodes())
        if warning:
            print(warning, flush=True)
    if restorable:
        print(f"resuming sweep {spec.name} from {experiment_path(spec)}", flush=True)
    tuner = restore_tuner(spec, plan, trainable) if restorable else build_tuner(spec, plan, trainable, report)
    # Tune snapshots its state after every kept checkpoint (what resume needs); it need not warn about it.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # One evaluator replica per trial node for the whole sweep, also on nodes that join later.
    watcher = ReplicaWatcher(spec, evaluator_name(spec)).start() if trainable is None else None
    try:
        return tuner.fit()
    finally:
        if watcher is not None:
            watcher.stop()
