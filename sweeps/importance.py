"""Which searched parameter mattered: optuna.importance over the sweep's study, per objective.

fANOVA (Hutter et al. 2014, Optuna's FanovaImportanceEvaluator with a fixed seed, so the same
study always gives the same numbers) by default. Optuna assesses the study's COMPLETE trials:
a pruned trial's value comes from fewer steps and would bias the fit, so pruned trials do not
count; the panel says how many trials did. Read by the report, `--status` and the W&B summary.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.importance import FanovaImportanceEvaluator, MeanDecreaseImpurityImportanceEvaluator, PedAnovaImportanceEvaluator
from optuna.trial import TrialState

from sweeps.spec_schema import SweepSpec

EVALUATORS = {
    "fanova": lambda: FanovaImportanceEvaluator(seed=0),
    "mean_decrease_impurity": lambda: MeanDecreaseImpurityImportanceEvaluator(seed=0),
    "ped_anova": lambda: PedAnovaImportanceEvaluator(),
}
MIN_TRIALS = 2  # fANOVA needs two values to split; with one, Optuna returns equal shares


@dataclass
class Importance:
    metric: str
    method: str
    trials: int  # complete trials the importances come from
    values: dict[str, float] = field(default_factory=dict)  # parameter -> share (sums to 1), largest first
    note: str | None = None  # why there are none

    def top(self, n: int = 2) -> list[str]:
        return list(self.values)[:n]


def study_dir(spec: SweepSpec) -> Path:
    from sweeps import study_storage

    return study_storage.study_dir(spec)


def load_sweep_study(spec: SweepSpec) -> optuna.Study | None:
    """The sweep's Optuna study (wherever `study.storage` keeps it), or None when it has none yet."""
    from sweeps import study_storage

    return study_storage.load_sweep_study(spec)


def objective_target(spec: SweepSpec, index: int):
    """Optuna's `target` for objective `index`: None for a single-objective study (its value)."""
    return None if len(spec.objectives) == 1 else (lambda t: t.values[index])


def param_importances(study: optuna.Study | None, spec: SweepSpec, method: str = "fanova") -> list[Importance]:
    """One Importance per objective of the spec, in the spec's order."""
    complete = 0 if study is None else len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    out = []
    for i, obj in enumerate(spec.objectives):
        imp = Importance(obj.metric, method, complete)
        if study is None:
            imp.note = "no Optuna study on this machine (the journal is kept in the sweep's local folder)"
        elif complete < MIN_TRIALS:
            imp.note = f"{complete} complete trial(s); importance needs at least {MIN_TRIALS}"
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning of the evaluators
                try:
                    values = optuna.importance.get_param_importances(
                        study, evaluator=EVALUATORS[method](), target=objective_target(spec, i))
                except (ValueError, RuntimeError) as err:  # e.g. no parameter set in every complete trial
                    imp.note = f"not computable: {err}"
                    values = {}
            imp.values = {k: float(v) for k, v in values.items()}
        out.append(imp)
    return out


def format_importances(importances: list[Importance]) -> str:
    """`--status` lines: one per objective, parameters largest first."""
    lines = []
    for imp in importances:
        head = f"parameter importance for {imp.metric} ({imp.method}, {imp.trials} complete trials)"
        body = ", ".join(f"{k} {v:.2f}" for k, v in imp.values.items()) if imp.values else imp.note
        lines.append(f"{head}: {body}")
    return "\n".join(lines)
