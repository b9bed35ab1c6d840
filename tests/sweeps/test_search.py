"""make_search_alg: conditional space, samplers, seeds, initial configs, study storage and resume.

Driven through the Searcher API that Ray Tune calls (suggest / on_trial_result /
on_trial_complete), without starting Ray: it is the same object Tune drives.
"""

from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from sweeps.search import (
    JOURNAL_FILE,
    RAY_TRIAL_ATTR,
    SweepOptunaSearch,
    load_pruned,
    load_study,
    make_search_alg,
    unwrap_searcher,
)
from sweeps.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]


def _spec(space: dict, **over):
    data = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    data["eval"]["suite"] = str(ROOT / "examples" / data["eval"]["suite"])  # as load_spec resolves it
    data.update(name="search-test", space=space, pruner={"type": "none"}, objective={"metric": "clip_score", "mode": "max"},
                search={"sampler": "random", "num_trials": 40, "max_concurrent": 40, "seed": 7})
    data.update(over)
    return parse_spec(data, "test")


SCHEDULER_SPACE = {
    "lr_scheduler": {"type": "choice", "values": ["linear", "cosine_with_restarts"]},
    "lr_num_cycles": {"type": "int", "low": 2, "high": 4, "when": {"lr_scheduler": "cosine_with_restarts"}},
    "learning_rate": {"type": "loguniform", "low": 1e-6, "high": 1e-4},
}


def _searcher(spec, study_dir) -> SweepOptunaSearch:
    found = unwrap_searcher(make_search_alg(spec, study_dir))
    assert isinstance(found, SweepOptunaSearch)
    return found


def _finish(searcher, trial_id, value, steps=(10, 20)):
    for i, step in enumerate(steps):
        result = {"clip_score": value * (i + 1) / len(steps), "step": step, "training_iteration": i + 1}
        searcher.on_trial_result(trial_id, result)
    searcher.on_trial_complete(trial_id, {"clip_score": value, "step": steps[-1]})


def test_conditional_param_only_when_its_condition_holds(tmp_path):
    searcher = _searcher(_spec(SCHEDULER_SPACE), tmp_path)
    configs = [searcher.suggest(f"t{i}") for i in range(30)]
    kinds = {c["lr_scheduler"] for c in configs}
    assert kinds == {"linear", "cosine_with_restarts"}
    for c in configs:
        assert ("lr_num_cycles" in c) == (c["lr_scheduler"] == "cosine_with_restarts"), c
        assert 1e-6 <= c["learning_rate"] <= 1e-4
    assert all(2 <= c["lr_num_cycles"] <= 4 for c in configs if "lr_num_cycles" in c)


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_same_seed_same_configs(tmp_path, sampler):
    spec = _spec(SCHEDULER_SPACE, search={"sampler": sampler, "num_trials": 12, "max_concurrent": 2, "seed": 11})
    runs = []
    for d in ("a", "b"):
        searcher = _searcher(spec, tmp_path / d)
        out = []
        for i in range(12):
            out.append(searcher.suggest(f"t{i}"))
            _finish(searcher, f"t{i}", out[-1]["learning_rate"] * 1e4)
        runs.append(out)
    assert runs[0] == runs[1]
    assert len({c["learning_rate"] for c in runs[0]}) == 12


def test_tpe_is_multivariate_with_constant_liar(tmp_path):
    sampler = _searcher(_spec(SCHEDULER_SPACE, search={"sampler": "tpe", "num_trials": 30}), tmp_path)._sampler
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._multivariate and sampler._constant_liar and sampler._group  # group: conditional space
    assert sampler._parzen_estimator_parameters is not None
    assert sampler._n_startup_trials == 10


def test_grid_visits_every_combination(tmp_path):
    space = {"rank": {"type": "choice", "values": [4, 8, 16]}, "clip_skip": {"type": "int", "low": 1, "high": 2}}
    searcher = _searcher(_spec(space, search={"sampler": "grid", "num_trials": 6}), tmp_path)
    seen = set()
    for i in range(6):
        c = searcher.suggest(f"t{i}")
        seen.add((c["rank"], c["clip_skip"]))
        _finish(searcher, f"t{i}", 0.1)
    assert seen == {(r, s) for r in (4, 8, 16) for s in (1, 2)}


def test_nsga2_multi_objective_study(tmp_path):
    spec = _spec(SCHEDULER_SPACE, objective=[{"metric": "clip_score", "mode": "max"}, {"metric": "loss", "mode": "min"}],
                 search={"sampler": "nsga2", "num_trials": 8})
    searcher = _searcher(spec, tmp_path)
    assert isinstance(searcher._sampler, optuna.samplers.NSGAIISampler)
    searcher.suggest("t0")
    searcher.on_trial_result("t0", {"clip_score": 0.2, "loss": 0.5, "step": 10})  # no intermediate values
    searcher.on_trial_complete("t0", {"clip_score": 0.3, "loss": 0.4, "step": 20})
    study = load_study(tmp_path, spec.name)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.trials[0].values == [0.3, 0.4]


def test_initial_configs_first_then_resume_keeps_history(tmp_path):
    first = {"learning_rate": 1e-5, "lr_scheduler": "cosine_with_restarts", "lr_num_cycles": 3}
    spec = _spec(SCHEDULER_SPACE, search={"sampler": "tpe", "num_trials": 10, "seed": 1, "initial_configs": [first]})
    searcher = _searcher(spec, tmp_path)
    assert searcher.suggest("a0") == first
    for i in range(1, 4):
        searcher.suggest(f"a{i}")
    for i in range(4):
        _finish(searcher, f"a{i}", 0.1 * i)
    assert (tmp_path / JOURNAL_FILE).is_file()

    resumed = _searcher(spec, tmp_path)  # a new driver on the same storage
    assert [t.state for t in resumed.study.trials] == [TrialState.COMPLETE] * 4
    assert resumed.study.best_value == pytest.approx(0.3)
    config = resumed.suggest("b0")
    assert config != first, "initial configs are enqueued once per study, not on every resume"
    assert resumed.study.trials[-1].number == 4
    assert resumed.study.trials[-1].user_attrs[RAY_TRIAL_ATTR] == "b0"


def test_intermediate_values_at_step_and_pruned_state(tmp_path):
    spec = _spec(SCHEDULER_SPACE)
    searcher = _searcher(spec, tmp_path)
    for t in ("p", "c"):
        searcher.suggest(t)
    # `step` is the trainable's training step, not Tune's training_iteration.
    assert searcher.report_intermediate("p", {"clip_score": 0.1, "step": 50, "training_iteration": 1}) == 50
    assert searcher.report_intermediate("p", {"clip_score": 0.1, "step": 50, "training_iteration": 2}) is None
    assert searcher.report_intermediate("p", {"loss": 1.0, "step": 60}) is None  # no objective in it
    searcher.on_trial_result("p", {"clip_score": 0.15, "step": 100, "training_iteration": 2})
    searcher.mark_pruned("p", 100)
    # Tune then completes the stopped trial with its last result; it must stay PRUNED.
    searcher.on_trial_complete("p", {"clip_score": 0.15, "step": 100})
    _finish(searcher, "c", 0.4)
    trials = {t.user_attrs[RAY_TRIAL_ATTR]: t for t in load_study(tmp_path, spec.name).trials}
    assert trials["p"].state == TrialState.PRUNED and trials["p"].intermediate_values == {50: 0.1, 100: 0.15}
    assert trials["c"].state == TrialState.COMPLETE and trials["c"].value == pytest.approx(0.4)
    assert load_pruned(tmp_path) == {"p": 100}


def test_searcher_pickles_for_tune_checkpoints(tmp_path):
    searcher = _searcher(_spec(SCHEDULER_SPACE), tmp_path)
    searcher.suggest("t0")
    _finish(searcher, "t0", 0.2)
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = SweepOptunaSearch(study_dir=tmp_path)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert "lr_scheduler" in restored.suggest("t1")
    assert len(restored.study.trials) == 2


def test_study_holds_a_fresh_copy_of_its_pruner_on_every_start(tmp_path):
    """Optuna storage keeps no pruner: the searcher gives the study one when it creates, loads
    or restores it, without the state the previous one had built."""
    spec = _spec(SCHEDULER_SPACE)
    assert isinstance(_searcher(spec, tmp_path / "none").study.pruner, optuna.pruners.NopPruner)
    template = optuna.pruners.HyperbandPruner(min_resource=10, max_resource=40, reduction_factor=2)
    searcher = unwrap_searcher(make_search_alg(spec, tmp_path, pruner=template))
    pruner = searcher.study.pruner
    assert isinstance(pruner, optuna.pruners.HyperbandPruner) and pruner is not template
    assert (pruner._min_resource, pruner._max_resource, pruner._reduction_factor) == (10, 40, 2)
    searcher.suggest("t0")
    searcher.report_intermediate("t0", {"clip_score": 0.2, "step": 10})
    assert searcher.should_prune("t0") is False  # through the study's pruner, which sets up its brackets
    assert pruner._pruners and not template._pruners

    loaded = unwrap_searcher(make_search_alg(spec, tmp_path, pruner=template))  # a new driver
    assert isinstance(loaded.study.pruner, optuna.pruners.HyperbandPruner) and not loaded.study.pruner._pruners

    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = SweepOptunaSearch(study_dir=tmp_path)
    restored.restore(str(tmp_path / "searcher.pkl"))
    fresh = restored.study.pruner
    assert isinstance(fresh, optuna.pruners.HyperbandPruner) and not fresh._pruners
    assert restored._ot_trials["t0"].study is restored.study  # should_prune asks this pruner
    restored.report_intermediate("t0", {"clip_score": 0.3, "step": 20})
    assert restored.should_prune("t0") is False and fresh._pruners
