"""The Optuna-pruner bridge and ASHA, checked against Optuna driven alone.

Known curves (a deterministic function of the params) go through make_search_alg + make_scheduler,
either on local Ray (a Tune callback logs every result and completion in the order the driver
handled them) or through the calls Tune makes on the scheduler and searcher, with trials of
unequal lengths that start, report and finish at their own times. Replaying the log through the
same pruner with plain Optuna (report, should_prune, tell) must give the same decision at every
step; a trial at its last step completes whatever the pruner says.
"""

import importlib.util
import json
import math
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import ray
import yaml
from optuna.trial import TrialState
from ray import tune

from sweeps.pruning import AshaPruningScheduler, OptunaPrunerScheduler, make_pruner, make_scheduler
from sweeps.search import RAY_TRIAL_ATTR, load_pruned, load_study, make_search_alg
from sweeps.spec import parse_spec

# Ray workers cannot import this test module: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = Path(__file__).resolve().parents[2]
STEPS = (10, 20, 30, 40, 50)  # the stub's eval steps


def curve(config: dict, step: int) -> float:
    """Curves that separate configs: higher lr (up to ~3e-3) and rank learn faster and higher."""
    quality = 1.0 - abs(math.log10(config["learning_rate"]) + 2.5) / 2.0 + 0.02 * config.get("rank", 4)
    return quality * (1 - math.exp(-step / 25)) + 0.001 * (step % 20)  # wiggles for Wilcoxon


def stub_trainable(config: dict) -> None:
    budget = config.get("max_train_steps", STEPS[-1])
    for step in range(10, budget + 1, 10):
        # max_train_steps in every result, as sweeps.trainable reports it.
        tune.report({"step": step, "max_train_steps": budget, "clip_score": curve(config, step), "loss": 1.0 / step})


class EventLog(tune.Callback):
    """Appends (kind, trial id, step, value) to a JSON-lines file in the order Tune handled them."""

    def __init__(self, path: Path):
        self.path = str(path)

    def _write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._write({"kind": "result", "trial": trial.trial_id, "step": result["step"],
                     "budget": result["max_train_steps"], "value": result["clip_score"]})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write({"kind": "complete", "trial": trial.trial_id})


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
            search_alg=make_search_alg(spec, study_dir, pruner=make_pruner(spec)), scheduler=make_scheduler(spec),
            num_samples=spec.search.num_trials, metric=spec.primary.metric, mode=spec.primary.mode, reuse_actors=True,
        ),
        run_config=tune.RunConfig(name="tune", storage_path=str(tmp_path / "ray"), callbacks=[EventLog(log)], verbose=0),
    )
    grid = tuner.fit()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    last_step = {r.metrics["trial_id"]: r.metrics["step"] for r in grid}
    return study_dir, events, last_step


def _replay(spec, events, numbers: dict[str, int]) -> tuple[list[tuple[str, int, bool]], dict[str, int]]:
    """Optuna alone on the logged sequence: report and should_prune at every result; a trial
    before its last step is pruned when should_prune says so, told PRUNED when Tune completes it,
    and otherwise told COMPLETE with its last value. Returns every (trial, step, pruned here)
    and the pruned trials' steps."""
    study = optuna.create_study(study_name=spec.name, direction="maximize", pruner=make_pruner(spec))
    # The sweep's trial numbers (Hyperband hashes name and number into brackets). Asking a trial
    # before it reports changes no decision: pruners read only reported values and finished trials.
    order = sorted(numbers, key=numbers.get)
    assert [numbers[t] for t in order] == list(range(len(order)))
    trials = {tid: study.ask() for tid in order}
    decisions, pruned, last = [], {}, {}
    for ev in events:
        tid, trial = ev["trial"], trials[ev["trial"]]
        if ev["kind"] == "result":
            trial.report(ev["value"], ev["step"])
            last[tid] = ev["value"]
            prune = trial.should_prune() and ev["step"] < ev["budget"]
            decisions.append((tid, ev["step"], prune))
            if prune:
                pruned[tid] = ev["step"]
        elif ev["kind"] == "complete":
            if tid in pruned:
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, last[tid])  # what Tune's last result tells: the final value
    return decisions, pruned


def _numbers(study_dir: Path, name: str) -> dict[str, int]:
    return {t.user_attrs[RAY_TRIAL_ATTR]: t.number for t in load_study(study_dir, name).trials}


def _study_states(study_dir: Path, name: str) -> dict[str, TrialState]:
    return {t.user_attrs[RAY_TRIAL_ATTR]: t.state for t in load_study(study_dir, name).trials}


def test_make_scheduler_kinds():
    assert make_scheduler(_spec({"type": "none"})) is None
    spec = _spec({"type": "median", "options": {"n_startup_trials": 3}})
    assert isinstance(make_scheduler(spec), OptunaPrunerScheduler)
    pruner = make_pruner(spec)
    assert isinstance(pruner, optuna.pruners.MedianPruner) and pruner._n_startup_trials == 3
    sha = make_pruner(_spec({"type": "successive_halving"}))
    assert sha._min_resource == 10  # first rung = one eval interval, in training steps
    assert isinstance(make_scheduler(_spec({"type": "asha"})), AshaPruningScheduler)


@pytest.mark.parametrize("pruner", [
    {"type": "median", "options": {"n_startup_trials": 2}},
    pytest.param({"type": "successive_halving", "options": {"reduction_factor": 2}}, marks=pytest.mark.slow),
], ids=["median", "successive_halving"])
def test_optuna_pruner_prunes_where_optuna_alone_does(ray_local, tmp_path, pruner):
    spec = _spec(pruner)
    study_dir, events, last_step = _run(spec, tmp_path)
    _, expected = _replay(spec, events, _numbers(study_dir, spec.name))
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


def test_asha_stops_are_pruned_not_complete(ray_local, tmp_path):
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


def _drive(spec, study_dir: Path, seed: int = 0) -> tuple[list[dict], list[tuple[str, int, bool]]]:
    """The calls Tune makes on the scheduler and the searcher, without Ray, for trials of unequal
    lengths (their searched max_train_steps) that run concurrently at their own pace: up to
    max_concurrent at once, a new one as soon as a slot frees (Tune's order: scheduler, then the
    searcher unless STOP), and each finished or stopped trial completed a few events later, as
    Tune does once the trial's actor is done. Returns the event log and every decision."""
    alg = make_search_alg(spec, study_dir, pruner=make_pruner(spec))
    controller = SimpleNamespace(search_alg=alg)  # what Tune hands a scheduler: its search_alg
    sched = make_scheduler(spec)
    rng = random.Random(seed)
    events, decisions = [], []
    running: dict[str, dict] = {}  # trial id -> config and last step reported
    ending: dict[str, dict] = {}  # trial id -> last result, stopped or finished, not yet completed
    started = 0
    while started < spec.search.num_trials or running or ending:
        free = len(running) + len(ending) < spec.search.max_concurrent
        if started < spec.search.num_trials and free and (not running or rng.random() < 0.5):
            tid = f"t{started}"
            started += 1
            running[tid] = {"config": alg.suggest(tid), "step": 0}
            events.append({"kind": "start", "trial": tid})
        elif ending and (not running or rng.random() < 0.3):
            tid = rng.choice(sorted(ending))
            alg.on_trial_complete(tid, ending.pop(tid))
            events.append({"kind": "complete", "trial": tid})
        else:
            tid = rng.choice(sorted(running))  # one trial's next eval; the others lag or lead
            t = running[tid]
            t["step"] += spec.eval.interval
            budget = t["config"]["max_train_steps"]
            value = curve(t["config"], t["step"])
            result = {"step": t["step"], "max_train_steps": budget, "clip_score": value,
                      "training_iteration": t["step"] // spec.eval.interval}
            stop = sched.on_trial_result(controller, SimpleNamespace(trial_id=tid), result) == "STOP"
            if not stop:
                alg.on_trial_result(tid, result)
            events.append({"kind": "result", "trial": tid, "step": t["step"], "budget": budget, "value": value})
            decisions.append((tid, t["step"], stop))
            if stop or t["step"] >= budget:
                ending[tid] = result
                del running[tid]
    return events, decisions


def _unequal_spec(pruner: dict):
    spec = _spec(pruner, num_trials=16)
    data = spec.model_dump()
    data["train"].pop("max_train_steps", None)
    data["space"]["max_train_steps"] = {"type": "choice", "values": [30, 50, 80]}
    return parse_spec(data, "test")


@pytest.mark.parametrize("pruner", [
    {"type": "median", "options": {"n_startup_trials": 2}},
    {"type": "percentile", "options": {"percentile": 40.0, "n_startup_trials": 2}},
    {"type": "successive_halving", "options": {"reduction_factor": 2}},
    {"type": "hyperband", "options": {"reduction_factor": 2}},
    pytest.param({"type": "wilcoxon", "options": {"p_threshold": 0.3, "n_startup_steps": 2}},
                 marks=pytest.mark.skipif(importlib.util.find_spec("scipy") is None,
                                          reason="WilcoxonPruner needs scipy; test_wilcoxon_needs_scipy covers its absence")),
], ids=lambda p: p["type"])
def test_unequal_interleaved_trials_decide_as_optuna_alone(tmp_path, pruner):
    """Trials of 30, 50 and 80 steps, started late and reporting out of step with each other:
    the scheduler prunes some before their last step, and every decision, step by step, is the
    one a plain Optuna study with the same pruner makes on the same curves in the same order."""
    spec = _unequal_spec(pruner)
    events, decisions = _drive(spec, tmp_path)
    # The schedule is what a real sweep does: unequal lengths, not lockstep, later starts.
    budgets = {e["trial"]: e["budget"] for e in events if e["kind"] == "result"}
    assert len(set(budgets.values())) == 3
    step_of, lockstep = {}, True
    for e in events:
        if e["kind"] == "result":
            step_of[e["trial"]] = e["step"]
            lockstep &= max(step_of.values()) - min(step_of.values()) <= spec.eval.interval
        elif e["kind"] == "complete":
            del step_of[e["trial"]]
    assert not lockstep, "some trials should be 2+ evals ahead of others"
    first_done = next(i for i, e in enumerate(events) if e["kind"] == "complete")
    assert any(e["kind"] == "start" for e in events[first_done:]), "some trials start after others finished"

    expected, pruned = _replay(spec, events, _numbers(tmp_path, spec.name))
    assert decisions == expected
    assert pruned, "the pruner should prune some trials before their last step"
    assert all(step < budgets[t] for t, step in pruned.items())
    assert load_pruned(tmp_path) == pruned
    states = _study_states(tmp_path, spec.name)
    assert {t for t, s in states.items() if s == TrialState.PRUNED} == set(pruned)
    assert {t for t, s in states.items() if s == TrialState.COMPLETE} == set(budgets) - set(pruned)
    assert len(states) == spec.search.num_trials


def test_trial_at_its_last_step_completes_even_if_the_pruner_would_prune(tmp_path):
    """A full-budget trial is never PRUNED: nothing is left to save by stopping it."""
    spec = _spec({"type": "median", "options": {"n_startup_trials": 1, "n_warmup_steps": 0}})
    alg = make_search_alg(spec, tmp_path, pruner=make_pruner(spec))
    controller, sched = SimpleNamespace(search_alg=alg), make_scheduler(spec)
    searcher = alg.searcher

    def report(tid, step, value, budget):
        result = {"step": step, "max_train_steps": budget, "clip_score": value, "training_iteration": step // 10}
        decision = sched.on_trial_result(controller, SimpleNamespace(trial_id=tid), result)
        if decision != "STOP":
            alg.on_trial_result(tid, result)
        return decision, result

    for tid in ("good", "short", "long"):
        alg.suggest(tid)
    for step in (10, 20):
        _, result = report("good", step, 0.9, budget=20)
    alg.on_trial_complete("good", result)
    # The same poor value at step 10: the last step of a 10-step trial, the first of a 20-step one.
    decision, result = report("short", 10, 0.1, budget=10)
    assert searcher.should_prune("short"), "the median pruner would prune it here"
    assert decision == "CONTINUE"
    alg.on_trial_complete("short", result)
    assert report("long", 10, 0.1, budget=20)[0] == "STOP"
    alg.on_trial_complete("long", None)
    states = _study_states(tmp_path, spec.name)
    assert states == {"good": TrialState.COMPLETE, "short": TrialState.COMPLETE, "long": TrialState.PRUNED}
    assert load_study(tmp_path, spec.name).trials[1].value == pytest.approx(0.1)
    assert load_pruned(tmp_path) == {"long": 10}


def test_tpe_samples_within_hyperband_brackets(tmp_path):
    """With Hyperband in the study, the TPE sampler is handed each new trial's bracket only."""
    spec = _unequal_spec({"type": "hyperband", "options": {"reduction_factor": 2}})
    _drive(spec, tmp_path)  # 16 trials: Hyperband has set up its brackets
    searcher = make_search_alg(spec, tmp_path, pruner=make_pruner(spec)).searcher  # resumed sweep
    seen = []
    sampler = searcher.study.sampler
    original = sampler.sample_relative

    def spy(study, trial, search_space):
        seen.append((type(study).__name__, len(study.get_trials(deepcopy=False)),
                     len(searcher.study.get_trials(deepcopy=False))))
        return original(study, trial, search_space)

    sampler.sample_relative = spy
    for i in range(4):  # the fresh pruner sets up its brackets on its first decision
        searcher.suggest(f"n{i}")
        searcher.report_intermediate(f"n{i}", {"step": 10, "clip_score": 0.5})
        searcher.should_prune(f"n{i}")
    assert len(seen) == 4 and all(kind == "_BracketStudy" for kind, _, _ in seen)
    assert all(0 < n < total for _, n, total in seen[1:]), "a bracket holds only some of the trials"


def test_scheduler_needs_the_pruner_in_the_study(tmp_path):
    spec = _spec({"type": "median"})
    controller = SimpleNamespace(search_alg=make_search_alg(spec, tmp_path))  # no pruner given
    with pytest.raises(RuntimeError, match="study has no pruner"):
        make_scheduler(spec).on_trial_result(controller, SimpleNamespace(trial_id="t0"), {})


def test_wilcoxon_needs_scipy():
    data = _spec({"type": "none"}).model_dump()
    data["pruner"] = {"type": "wilcoxon"}
    if importlib.util.find_spec("scipy") is None:
        with pytest.raises(ValueError, match="pruner.type: wilcoxon .*needs scipy"):
            parse_spec(data, "t")
    else:
        assert isinstance(make_pruner(parse_spec(data, "t")), optuna.pruners.WilcoxonPruner)


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="WilcoxonPruner needs scipy")
def test_wilcoxon_compares_trials_item_by_item_at_the_same_training_step(tmp_path):
    """With `objective_items` in the results, the wilcoxon pruner sees every prompt x seed item at
    its own Optuna step: a trial that is worse on most items than the best trial at the same
    training step is pruned, though its mean alone (one number per step) could never reach a
    signed-rank test's significance; the decisions are those of plain Optuna on the same items."""
    from sweeps.search import paired_step

    data = _spec({"type": "wilcoxon", "options": {"p_threshold": 0.1, "n_startup_steps": 0}}).model_dump()
    data["objective"] = {"metric": "objective", "mode": "max"}
    spec = parse_spec(data, "t")
    alg = make_search_alg(spec, tmp_path, pruner=make_pruner(spec))
    controller, sched = SimpleNamespace(search_alg=alg), make_scheduler(spec)
    rng = random.Random(0)
    base = [rng.uniform(20, 40) for _ in range(24)]
    curves = {"best": [0.0] * 24, "worse": [-1.0 + rng.uniform(-0.3, 0.3) for _ in range(24)],
              "tied": [rng.uniform(-1.0, 1.0) for _ in range(24)]}
    plain = optuna.create_study(direction="maximize", pruner=make_pruner(spec))
    decisions, expected = {}, {}
    for tid, shift in curves.items():
        alg.suggest(tid)
        twin = plain.ask()
        for step in (10, 20, 30):
            items = [b + s + step / 10 for b, s in zip(base, shift)]
            result = {"step": step, "max_train_steps": 50, "objective": sum(items) / len(items),
                      "objective_items": items, "training_iteration": step // 10}
            decision = sched.on_trial_result(controller, SimpleNamespace(trial_id=tid), result)
            for i, v in enumerate(items):
                twin.report(v, paired_step(step, i))
            expected.setdefault(tid, []).append(twin.should_prune())
            decisions.setdefault(tid, []).append(decision == "STOP")
            if decision == "STOP":
                alg.on_trial_complete(tid, result)
                plain.tell(twin, state=TrialState.PRUNED)
                break
            alg.on_trial_result(tid, result)
        else:
            alg.on_trial_complete(tid, result)
            plain.tell(twin, result["objective"])
    assert decisions == expected
    assert decisions["worse"] == [True] and decisions["tied"] == [False, False, False]
    study = load_study(tmp_path, spec.name)
    worse = next(t for t in study.trials if t.state == TrialState.PRUNED)
    assert sorted(worse.intermediate_values) == [paired_step(10, i) for i in range(24)]
