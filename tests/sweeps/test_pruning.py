"""The Optuna-pruner bridge and ASHA on real Ray Tune, checked against Optuna driven alone.

A stub trainable reports known curves (a deterministic function of its params). The sweep runs
through make_search_alg + make_scheduler on local Ray; a Tune callback logs every result and
completion in the order the driver handled them. Replaying that log through the same pruner with
plain Optuna (report, should_prune, tell) must prune the same trials at the same steps.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import optuna
import pytest
import ray
import yaml
from ray import tune
from optuna.trial import TrialState

from sweeps.pruning import AshaPruningScheduler, OptunaPrunerScheduler, make_pruner, make_scheduler
from sweeps.search import RAY_TRIAL_ATTR, load_pruned, load_study, make_search_alg
from sweeps.spec import parse_spec

# Ray workers cannot import this test module: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = Path(__file__).resolve().parents[2]
STEPS = (10, 20, 30, 40, 50)  # the stub's eval steps


def stub_trainable(config: dict) -> None:
    """Curves that separate configs: higher lr (up to ~3e-3) and rank learn faster and higher."""
    quality = 1.0 - abs(math.log10(config["learning_rate"]) + 2.5) / 2.0 + 0.02 * config.get("rank", 4)
    for step in STEPS:
        tune.report({"step": step, "clip_score": quality * (1 - math.exp(-step / 25)), "loss": 1.0 / step})


class EventLog(tune.Callback):
    """Appends (kind, trial id, step, value) to a JSON-lines file in the order Tune handled them."""

    def __init__(self, path: Path):
        self.path = str(path)

    def _write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._write({"kind": "result", "trial": trial.trial_id, "step": result["step"], "value": result["clip_score"]})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write({"kind": "complete", "trial": trial.trial_id})


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        # address="local": our own cluster even when another one runs on this machine.
        ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def _spec(pruner: dict, num_trials: int = 10, **search):
    data = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    data.update(
        name="prune-test",
        train={"max_train_steps": 50, "resolution": 64},
        space={"learning_rate": {"type": "loguniform", "low": 1e-5, "high": 1e-2},
               "rank": {"type": "choice", "values": [2, 4, 8]}},
        eval={"interval": 10, "prompts": ["{trigger}, a red circle"]},
        objective={"metric": "clip_score", "mode": "max"},
        search={"sampler": "tpe", "num_trials": num_trials, "max_concurrent": 4, "seed": 3, **search},
        pruner=pruner,
        resources={"cpus_per_trial": 1, "gpus_per_trial": 0.5},
    )
    return parse_spec(data, "test")


def _run(spec, tmp_path: Path):
    study_dir, log = tmp_path / "study", tmp_path / "events.jsonl"
    tuner = tune.Tuner(
        tune.with_resources(stub_trainable, {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial}),
        tune_config=tune.TuneConfig(
            search_alg=make_search_alg(spec, study_dir), scheduler=make_scheduler(spec),
            num_samples=spec.search.num_trials, metric=spec.primary.metric, mode=spec.primary.mode, reuse_actors=True,
        ),
        run_config=tune.RunConfig(name="tune", storage_path=str(tmp_path / "ray"), callbacks=[EventLog(log)], verbose=0),
    )
    grid = tuner.fit()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    last_step = {r.metrics["trial_id"]: r.metrics["step"] for r in grid}
    return study_dir, events, last_step


def _replay(spec, events) -> dict[str, int]:
    """Optuna alone on the logged sequence: which trial it prunes, at which step."""
    study = optuna.create_study(study_name=spec.name, direction="maximize", pruner=make_pruner(spec))
    trials, done, pruned, last = {}, set(), {}, {}
    for ev in events:
        tid = ev["trial"]
        if tid not in trials:  # trial numbers in order of first appearance (Hyperband hashes them)
            trials[tid] = study.ask()
        trial = trials[tid]
        if tid in done:
            continue
        if ev["kind"] == "result":
            trial.report(ev["value"], ev["step"])
            last[tid] = ev["value"]
            if trial.should_prune():
                study.tell(trial, state=TrialState.PRUNED)
                pruned[tid] = ev["step"]
                done.add(tid)
        else:
            study.tell(trial, last[tid])  # what Tune's last result tells: the final value
            done.add(tid)
    return pruned


def _study_states(study_dir: Path, name: str) -> dict[str, TrialState]:
    return {t.user_attrs[RAY_TRIAL_ATTR]: t.state for t in load_study(study_dir, name).trials}


def test_make_scheduler_kinds():
    assert make_scheduler(_spec({"type": "none"})) is None
    sched = make_scheduler(_spec({"type": "median", "options": {"n_startup_trials": 3}}))
    assert isinstance(sched, OptunaPrunerScheduler) and isinstance(sched.pruner, optuna.pruners.MedianPruner)
    assert sched.pruner._n_startup_trials == 3
    sha = make_pruner(_spec({"type": "successive_halving"}))
    assert sha._min_resource == 10  # first rung = one eval interval, in training steps
    assert isinstance(make_scheduler(_spec({"type": "asha"})), AshaPruningScheduler)


@pytest.mark.parametrize("pruner", [
    {"type": "median", "options": {"n_startup_trials": 2}},
    pytest.param({"type": "successive_halving", "options": {"reduction_factor": 2}}, marks=pytest.mark.slow),
], ids=["median", "successive_halving"])
def test_optuna_pruner_prunes_where_optuna_alone_does(local_ray, tmp_path, pruner):
    spec = _spec(pruner)
    study_dir, events, last_step = _run(spec, tmp_path)
    expected = _replay(spec, events)
    assert expected, "the curves should make the pruner prune some trials"
    assert len(expected) < spec.search.num_trials, "and let some finish"
    assert load_pruned(study_dir) == expected
    # A pruned trial reported nothing after its pruning step (its resources were released).
    assert {t: last_step[t] for t in expected} == expected
    assert all(last_step[t] == STEPS[-1] for t in last_step if t not in expected)
    states = _study_states(study_dir, spec.name)
    assert {t for t, s in states.items() if s == TrialState.PRUNED} == set(expected)
    assert all(s == TrialState.COMPLETE for t, s in states.items() if t not in expected)
    # The journal keeps each trial's curve at the trainable's steps, not training_iteration.
    study = load_study(study_dir, spec.name)
    assert all(set(t.intermediate_values) <= set(STEPS) for t in study.trials)


def test_asha_stops_are_pruned_not_complete(local_ray, tmp_path):
    spec = _spec({"type": "asha", "options": {"max_t": 50, "grace_period": 10, "reduction_factor": 2}})
    study_dir, _, last_step = _run(spec, tmp_path)
    stopped = {t: s for t, s in last_step.items() if s < 50}
    assert stopped, "ASHA should stop some trials early with these curves"
    assert load_pruned(study_dir) == stopped
    states = _study_states(study_dir, spec.name)
    assert {t for t, s in states.items() if s == TrialState.PRUNED} == set(stopped)
    assert {t for t, s in states.items() if s == TrialState.COMPLETE} == set(last_step) - set(stopped)


def test_multi_objective_rejects_pruners():
    data = _spec({"type": "none"}).model_dump()
    data["objective"] = [{"metric": "clip_score", "mode": "max"}, {"metric": "loss", "mode": "min"}]
    data["pruner"] = {"type": "median"}
    with pytest.raises(ValueError, match="pruner.type: Optuna cannot prune a multi-objective study"):
        parse_spec(data, "t")


def test_pruner_options_checked_against_signature():
    data = _spec({"type": "none"}).model_dump()
    data["pruner"] = {"type": "median", "options": {"n_warmup_step": 2}}
    with pytest.raises(ValueError) as err:
        parse_spec(data, "t")
    assert "pruner.options.n_warmup_step: unknown option of optuna.pruners.MedianPruner" in str(err.value)
    assert "n_warmup_steps" in str(err.value)  # the valid options are listed
    data["pruner"] = {"type": "percentile", "options": {}}
    with pytest.raises(ValueError, match="pruner.options.percentile: required"):
        parse_spec(data, "t")
    data["pruner"] = {"type": "percentile", "options": {"percentile": 150}}
    with pytest.raises(ValueError, match="pruner.options: optuna.pruners.PercentilePruner rejects"):
        parse_spec(data, "t")
    data["pruner"] = {"type": "asha", "options": {"time_attr": "x", "grace_period": 100, "max_t": 50}}
    with pytest.raises(ValueError, match="pruner.options.time_attr: unknown option"):
        parse_spec(data, "t")
    data["pruner"] = {"type": "asha", "options": {"grace_period": 100, "max_t": 50}}
    with pytest.raises(ValueError, match="ASHAScheduler rejects .*grace_period must be <= max_t"):
        parse_spec(data, "t")
    data["pruner"] = {"type": "asha"}
    data["train"] = {"resolution": 64, "max_train_epochs": 3}
    with pytest.raises(ValueError, match="pruner.options.max_t: required with max_train_epochs"):
        parse_spec(data, "t")


@pytest.mark.parametrize("pruner", [
    {"type": "median", "options": {"n_startup_trials": 2}},
    {"type": "percentile", "options": {"percentile": 40.0, "n_startup_trials": 2}},
    {"type": "successive_halving", "options": {"reduction_factor": 2}},
    {"type": "hyperband", "options": {"reduction_factor": 2}},
    pytest.param({"type": "wilcoxon", "options": {"p_threshold": 0.3, "n_startup_steps": 2}},
                 marks=pytest.mark.skipif(importlib.util.find_spec("scipy") is None,
                                          reason="WilcoxonPruner needs scipy; test_wilcoxon_needs_scipy covers its absence")),
], ids=lambda p: p["type"])
def test_scheduler_decisions_match_optuna_alone_for_every_pruner(tmp_path, pruner):
    """The scheduler driven through the calls Tune makes (interleaved trials, no Ray needed):
    its STOP decisions equal the pruner's own decisions in a replay with plain Optuna."""
    from types import SimpleNamespace

    spec = _spec(pruner, num_trials=12)
    limiter = make_search_alg(spec, tmp_path)
    controller = SimpleNamespace(search_alg=limiter)  # what Tune hands a scheduler: its search_alg
    sched = make_scheduler(spec)
    ids = [f"t{i}" for i in range(12)]
    configs = {t: limiter.searcher.suggest(t) for t in ids}
    events, stopped, live = [], {}, list(ids)
    while live:  # round-robin: every live trial reports its next step, as concurrent trials do
        for tid in list(live):
            step = STEPS[sum(1 for e in events if e["trial"] == tid and e["kind"] == "result")]
            q = 1.0 - abs(math.log10(configs[tid]["learning_rate"]) + 2.5) / 2.0 + 0.02 * configs[tid]["rank"]
            value = q * (1 - math.exp(-step / 25)) + 0.001 * (step % 20)  # wiggles for Wilcoxon
            result = {"step": step, "clip_score": value, "training_iteration": step // 10}
            decision = sched.on_trial_result(controller, SimpleNamespace(trial_id=tid), result)
            if decision != "STOP":
                limiter.searcher.on_trial_result(tid, result)
            events.append({"kind": "result", "trial": tid, "step": step, "value": value})
            if decision == "STOP" or step == STEPS[-1]:
                stopped[tid] = step if decision == "STOP" else None
                limiter.searcher.on_trial_complete(tid, result)  # (suggested past the limiter, above)
                events.append({"kind": "complete", "trial": tid})
                live.remove(tid)
    got = {t: s for t, s in stopped.items() if s is not None}
    assert got == _replay(spec, events)
    assert load_pruned(tmp_path) == got
    states = _study_states(tmp_path, spec.name)
    assert {t for t, s in states.items() if s == TrialState.PRUNED} == set(got)


def test_wilcoxon_needs_scipy():
    data = _spec({"type": "none"}).model_dump()
    data["pruner"] = {"type": "wilcoxon"}
    if importlib.util.find_spec("scipy") is None:
        with pytest.raises(ValueError, match="pruner.type: wilcoxon .*needs scipy"):
            parse_spec(data, "t")
    else:
        assert isinstance(make_pruner(parse_spec(data, "t")), optuna.pruners.WilcoxonPruner)
