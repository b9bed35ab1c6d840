"""Parameter importance (sweeps.importance) over real Optuna studies: the parameter the objective
depends on comes first, per objective in a multi-objective study, and too few trials say so."""

from pathlib import Path

import optuna
import pytest

from sweeps.importance import Importance, format_importances, param_importances
from sweeps.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _spec(*overrides):
    return load_spec(ROOT / "examples" / "demo.yaml", list(overrides))


def _study(directions, objective, n=40):
    study = optuna.create_study(directions=directions, sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(objective, n_trials=n)
    return study


def _params(trial):
    return trial.suggest_float("learning_rate", 1e-4, 3e-2, log=True), trial.suggest_categorical("rank", [2, 4, 8])


@pytest.mark.parametrize("method", ["fanova", "mean_decrease_impurity", "ped_anova"])
def test_the_parameter_the_objective_depends_on_comes_first(method):
    study = _study(["maximize"], lambda t: -((_params(t)[0] - 3e-3) ** 2) * 1e4)
    (imp,) = param_importances(study, _spec(), method)
    assert imp.metric == "objective" and imp.trials == 40 and list(imp.values)[0] == "learning_rate"
    assert imp.values["learning_rate"] > 0.7 and sum(imp.values.values()) == pytest.approx(1.0)


def test_each_objective_of_a_multi_objective_study_has_its_own_importances():
    spec = _spec("objective=[{metric: clip_score, mode: max}, {metric: loss, mode: min}]", "search.sampler=nsga2",
                 "pruner.type=none")

    def objective(t):
        lr, rank = _params(t)
        return lr * 100, rank / 8

    first, second = param_importances(_study(["maximize", "minimize"], objective), spec)
    assert (first.metric, second.metric) == ("clip_score", "loss")
    assert first.top(1) == ["learning_rate"] and second.top(1) == ["rank"]


def test_pruned_trials_do_not_count_and_too_few_trials_say_so():
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"learning_rate": 1e-3, "rank": 2})
    study.optimize(lambda t: _params(t)[0], n_trials=1)
    trial = study.ask()
    _params(trial)
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    (imp,) = param_importances(study, _spec())
    assert imp.trials == 1 and imp.values == {} and "needs at least 2" in imp.note
    (none,) = param_importances(None, _spec())
    assert "no Optuna study" in none.note


def test_status_lines():
    lines = format_importances([Importance("objective", "fanova", 12, {"learning_rate": 0.8, "rank": 0.2}),
                                Importance("loss", "fanova", 1, note="1 complete trial(s); importance needs at least 2")])
    assert lines.splitlines() == [
        "parameter importance for objective (fanova, 12 complete trials): learning_rate 0.80, rank 0.20",
        "parameter importance for loss (fanova, 1 complete trials): 1 complete trial(s); importance needs at least 2"]
