from pathlib import Path

import pytest
import yaml

from sweeps.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]


def _base(**over):
    data = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    data["eval"]["suite"] = str(ROOT / "examples" / data["eval"]["suite"])  # as load_spec resolves it
    data.update(over)
    return data


def test_repo_root_search_yaml_is_the_thesis_sweep():
    spec = load_spec(ROOT / "search.yaml")
    assert spec.trigger_word == "nosnjaoutfit" and spec.eval.class_word == "outfit"
    assert set(spec.searched()) >= {"learning_rate", "lr_scheduler", "lr_num_cycles", "train_batch_size", "clip_skip", "rank"}
    assert spec.searched()["lr_num_cycles"].when == {"lr_scheduler": "cosine_with_restarts"}
    assert spec.search.sampler == "tpe" and spec.pruner.type == "median"
    assert spec.tracking.wandb.enabled and spec.tracking.wandb.mode == "offline"
    assert not Path(spec.dataset).exists()  # validates without the data: prepare checks the dataset
    kinds = {k for k in ("natural", "new_setting", "no_concept", "trigger_test") if spec.eval.suite.get(k)}
    assert kinds == {"natural", "new_setting", "no_concept", "trigger_test"}


# A space and train section with one problem in every field.
BAD_SPACE = {
    "learning_rate": {"type": "loguniform", "low": 0, "high": 1e-3},
    "rank": {"type": "choice", "values": [4, 0]},
    "not_a_field": {"type": "uniform", "low": 0, "high": 1},
    "lr_scheduler": {"type": "choice", "values": ["linear", "cosine_typo"]},
}
BAD_TRAIN = {"resolution": 64, "max_train_steps": 0, "extra_knob": 3}


def test_all_problems_reported_together_with_paths():
    data = _base(space=BAD_SPACE, train=BAD_TRAIN, search={"num_trials": 0})
    with pytest.raises(SpecError) as err:
        parse_spec(data, "search.yaml")
    text = str(err.value)
    assert text.startswith("search.yaml:")
    for expected in ("search.num_trials:", "space.learning_rate.low: must be > 0", "train.extra_knob: unknown key"):
        assert expected in text, text


def test_space_and_train_problems_reported_together():
    data = _base(space=BAD_SPACE, train=BAD_TRAIN)
    with pytest.raises(SpecError) as err:
        parse_spec(data, "search.yaml")
    text = str(err.value)
    for expected in (
        "space.learning_rate.low: must be > 0",
        "space.rank: value 0 is invalid",
        "space.not_a_field: not a training field",
        "space.lr_scheduler: value 'cosine_typo' is invalid",
        "train.max_train_steps:",
        "train.extra_knob: unknown key",
    ):
        assert expected in text, f"missing {expected!r} in:\n{text}"


def test_overrides_and_trigger_substitution(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text((ROOT / "examples" / "demo.yaml").read_text())
    ev = '{interval: 5, prompts: ["{trigger}, a red circle", "a {trigger} square"], seeds: [0, 3]}'
    spec = load_spec(path, ["search.num_trials=3", "train.max_train_steps=7", f"eval={ev}"])
    assert spec.search.num_trials == 3 and spec.train["max_train_steps"] == 7
    prompts, seeds = spec.eval_prompts()
    assert prompts == ["lswsks, a red circle"] * 2 + ["a lswsks square"] * 2 and seeds == [0, 3, 0, 3]


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)


def _problems(**over) -> str:
    with pytest.raises(SpecError) as err:
        parse_spec(_base(**over), "search.yaml")
    return str(err.value)


SCHED = {
    "lr_scheduler": {"type": "choice", "values": ["linear", "cosine_with_restarts"]},
    "lr_num_cycles": {"type": "int", "low": 2, "high": 4, "when": {"lr_scheduler": "cosine_with_restarts"}},
}


def test_conditions_name_searched_fields_and_their_values():
    assert parse_spec(_base(space=SCHED)).searched()["lr_num_cycles"].conditions() == {"lr_scheduler": ["cosine_with_restarts"]}
    text = _problems(space={
        **SCHED,
        "rank": {"type": "choice", "values": [4, 8], "when": {"lr_scheduler": "cosine"}},
        "clip_skip": {"type": "int", "low": 1, "high": 2, "when": {"no_such_field": 1}},
        "lr_warmup_steps": {"type": "int", "low": 0, "high": 5, "when": {"learning_rate": 1e-4}},
        "alpha": {"type": "uniform", "low": 1, "high": 4, "when": {"mixed_precision": "fp16"}},
    }, train={"resolution": 64, "max_train_steps": 40})
    for expected in (
        "space.rank.when.lr_scheduler: 'cosine' is not a value space.lr_scheduler can take",
        "space.clip_skip.when.no_such_field: not a training field",
        "space.alpha.when.mixed_precision: mixed_precision is fixed to 'no', so alpha is never searched",
    ):
        assert expected in text, text
    cyc = _problems(space={
        "rank": {"type": "choice", "values": [4, 8], "when": {"clip_skip": 1}},
        "clip_skip": {"type": "choice", "values": [1, 2], "when": {"rank": 4}},
    })
    assert "space: conditions form a cycle among clip_skip, rank" in cyc


def test_search_section_checks():
    assert "search.sampler: nsga2 is for multi-objective search" in _problems(search={"sampler": "nsga2"})
    grid = _problems(search={"sampler": "grid", "num_trials": 4})
    assert "space.learning_rate: the grid sampler needs choice or int fields" in grid
    space = {"rank": {"type": "choice", "values": [2, 4]},
             "learning_rate": {"type": "uniform", "low": 0.001, "high": 0.003, "step": 0.001}}
    spec = parse_spec(_base(space=space, search={"sampler": "grid", "num_trials": 6}))
    assert spec.searched()["learning_rate"].grid_values() == [0.001, 0.002, 0.003]
    grid = {"sampler": "grid", "num_trials": 7}
    assert "search.num_trials: 7 exceeds the grid's 6 configurations" in _problems(space=space, search=grid)
    text = _problems(search={"num_trials": 4, "initial_configs": [
        {"learning_rate": 5e-2, "rank": 4}, {"rank": 3}, {"clip_skip": 2}]})
    for expected in ("search.initial_configs[0].learning_rate: 0.05 is outside space.learning_rate",
                     "search.initial_configs[1].rank: 3 is outside space.rank ([2, 4, 8])",
                     "search.initial_configs[2].clip_skip: not a searched field"):
        assert expected in text, text


def test_objective_metrics_and_multi_objective():
    # Named after what the evaluator really reports, so a metric nothing reports is refused.
    assert "objective.metric: unknown metric 'clip_score_concept'" in _problems(objective={"metric": "clip_score_concept"})
    assert parse_spec(_base(objective={"metric": "clip_score_trigger_on"})).primary.metric == "clip_score_trigger_on"
    text = _problems(objective={"metric": "clipscore"})
    assert "objective.metric: unknown metric 'clipscore'; trials report clip_score" in text
    two = [{"metric": "clip_score", "mode": "max"}, {"metric": "prior_preservation", "mode": "max"}]
    spec = parse_spec(_base(objective=two, search={"sampler": "nsga2", "num_trials": 8}, pruner={"type": "none"}))
    assert [o.metric for o in spec.objectives] == ["clip_score", "prior_preservation"]
    assert "objective[1].metric: 'clip_score' is listed twice" in _problems(objective=[two[0], two[0]], pruner={"type": "none"})


def test_oracle_metrics_need_the_toy_world_oracle():
    ev = {"interval": 50, "prompts": ["a {trigger} circle"]}
    text = _problems(eval=ev, objective={"metric": "concept_accuracy", "mode": "max"})
    assert "objective.metric: 'concept_accuracy' comes from the toy world's pixel oracle; set eval.oracle" in text
    spec = parse_spec(_base(objective={"metric": "concept_accuracy", "mode": "max"}))
    assert spec.eval.oracle == "toy_world"
    assert "eval.oracle: the oracle's concept_accuracy reads the trigger prompts; set trigger_word" in _problems(
        trigger_word=None, eval={**ev, "prompts": ["a circle"], "oracle": "toy_world"})
    assert "eval.oracle:" in _problems(eval={**ev, "oracle": "pixels"})


def test_resources_fractions():
    assert parse_spec(_base(resources={"gpus_per_trial": 0.25, "cpus_per_trial": 0.5})).resources.gpus_per_trial == 0.25
    assert "resources.gpus_per_trial: 1.5 is fractional above 1" in _problems(resources={"gpus_per_trial": 1.5})


def test_gp_sampler_needs_scipy():
    import importlib.util

    if importlib.util.find_spec("scipy") is None:
        assert "search.sampler: gp (optuna GPSampler) needs scipy" in _problems(search={"sampler": "gp"})
    else:
        assert parse_spec(_base(search={"sampler": "gp"})).search.sampler == "gp"


def test_eval_suite_inline_and_from_file(tmp_path):
    suite = {"natural": ["a photo of {trigger} {class}"], "no_concept": ["a bowl of fruit"],
             "trigger_test": ["a photo of {trigger} {class}"], "seeds": [0]}
    spec = parse_spec(_base(eval={"interval": 20, "suite": suite, "class_word": "circle"}))
    prompts, seeds = spec.eval_prompts()
    assert prompts == ["a photo of lswsks circle", "a bowl of fruit", "a photo of lswsks circle", "a photo of circle"]
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "s.yaml").write_text(yaml.safe_dump(suite))
    data = _base(eval={"interval": 20, "suite": "suites/s.yaml"})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match=r"eval.suite: .*uses \{class\} but no class word"):
        load_spec(tmp_path / "spec.yaml")
    data["eval"]["class_word"] = "circle"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    assert load_spec(tmp_path / "spec.yaml").eval_prompts() == (prompts, [0, 0, 0, 0])
    assert "eval.prompts: give prompts (or eval.suite)" in _problems(eval={"interval": 20})


def test_describe_sweep_dry_run(tmp_path):
    from sweeps.dry_run import STEP_S_PER_IMAGE, describe_sweep, estimate

    spec = load_spec(ROOT / "search.yaml")
    text = describe_sweep(spec)
    for expected in (
        "budget: 32 trials, at most 4 at a time",
        "objective: maximize clip_score",
        "sampler: tpe (multivariate TPE with constant liar",
        "pruner: median (n_startup_trials=5, n_warmup_steps=200",
        "lr_num_cycles                int [2, 4]   only when lr_scheduler = cosine_with_restarts",
        "learning_rate                loguniform [1e-06, 0.0001]",
        "max_train_epochs             10",
        "resources per trial: 4 CPU, 1 GPU",
        "GPU-hours for 32 trials x 1 GPU",
        f"assumptions: {STEP_S_PER_IMAGE} s per training image per step",
        "dataset not readable here",
    ):
        assert expected in text, f"missing {expected!r} in:\n{text}"
    # A kohya folder on disk is counted: 3 images x 10 repeats per epoch.
    folder = tmp_path / "data" / "10_nosnjaoutfit outfit"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"img_{i}.png").write_bytes(b"")
    data = yaml.safe_load((ROOT / "search.yaml").read_text())
    data["dataset"] = str(tmp_path / "data")
    data["space"]["train_batch_size"] = {"type": "choice", "values": [6]}
    est = estimate(parse_spec(data))
    assert est["steps_per_trial"] == pytest.approx(10 * 30 / 6)
    one = est["hours_per_trial"]
    data["resources"]["gpus_per_trial"] = 0.5
    half = estimate(parse_spec(data))
    assert half["gpu_hours"] == pytest.approx(one * 32 * 0.5)
    demo = describe_sweep(load_spec(ROOT / "examples" / "demo.yaml"))
    assert "0 GPU-hours" in demo and "tiny test model" in demo


def test_section_errors_and_cross_checks_reported_together():
    text = _problems(
        search={"num_trials": 0},
        objective={"metric": "nope"},
        space={"rank": {"type": "choice", "values": [2, 4], "when": {"lr_scheduler": "bogus"}},
               "learning_rate": {"type": "loguniform", "low": 1e-4, "high": 1e-3}},
        resources={"gpus_per_trial": 2.5},
        pruner={"type": "median", "options": {"n_startup": 1}},
    )
    for expected in ("search.num_trials:", "objective.metric: unknown metric 'nope'",
                     "space.rank.when.lr_scheduler: lr_scheduler is fixed to 'constant'",
                     "resources.gpus_per_trial: 2.5 is fractional above 1",
                     "pruner.options.n_startup: unknown option of optuna.pruners.MedianPruner"):
        assert expected in text, text


def test_field_errors_do_not_hide_combination_problems():
    text = _problems(train={**_base()["train"], "train_batch_size": 0, "resolution": 65, "center_crop": False})
    for expected in ("train.train_batch_size: Input should be greater than or equal to 1",
                     "train.resolution: 65 is not a multiple of 8", "train.cache_latents: random crops"):
        assert expected in text, text


def test_val_loss_is_an_objective_to_minimise():
    spec = parse_spec(_base(objective={"metric": "val_loss", "mode": "min"}))
    assert (spec.primary.metric, spec.primary.mode) == ("val_loss", "min")
    assert "objective.mode: 'val_loss' is better lower; set mode: min" in _problems(objective={"metric": "val_loss"})


def test_an_objective_against_its_metrics_direction_is_refused():
    text = _problems(objective={"metric": "cmmd", "mode": "max"})
    assert ("objective.mode: 'cmmd' is better lower; set mode: min (the pruner and the export follow the primary "
            "objective's mode)") in text
    two = [{"metric": "clip_score", "mode": "max"}, {"metric": "clip_kid", "mode": "max"}]
    text = _problems(objective=two, search={"sampler": "nsga2", "num_trials": 8}, pruner={"type": "none"})
    assert "objective[1].mode: 'clip_kid' is better lower; set mode: min" in text
    assert "objective[0]" not in text
    assert "objective.mode: 'prior_preservation' is better higher; set mode: max" in _problems(
        objective={"metric": "prior_preservation", "mode": "min"})
    # The pruners follow the primary objective: a lower-is-better one prunes the highest values.
    from sweeps.pruning import make_scheduler

    for pruner in ({"type": "median", "options": {"n_startup_trials": 2}}, {"type": "asha", "options": {"max_t": 400}}):
        spec = parse_spec(_base(objective={"metric": "clip_fd", "mode": "min"}, pruner=pruner))
        scheduler = make_scheduler(spec)
        assert (scheduler._metric, scheduler._mode) == ("clip_fd", "min")
        assert "objective.mode: 'clip_fd'" in _problems(objective={"metric": "clip_fd", "mode": "max"}, pruner=pruner)
    # Metrics without one good direction take either mode.
    for metric, mode in (("diversity", "min"), ("diversity", "max"), ("clip_score_trigger_off", "min")):
        assert parse_spec(_base(objective={"metric": metric, "mode": mode})).primary.mode == mode
    # An unknown name still lists what trials report, the distribution metrics among them.
    assert "cmmd, clip_fd, clip_kid, diversity" in _problems(objective={"metric": "fid", "mode": "min"})


def test_objective_weights_parse_into_every_component():
    spec = parse_spec(_base(objective={"metric": "objective", "mode": "max",
                                       "weights": {"clip_score": 2, "prior_preservation": 0}}), "search.yaml")
    from evaluator.metrics import DEFAULT_OBJECTIVE_WEIGHTS

    # Given components replace the defaults; the others keep theirs.
    assert spec.objective_weights() == {**DEFAULT_OBJECTIVE_WEIGHTS, "clip_score": 2.0, "prior_preservation": 0.0}
    assert parse_spec(_base(), "search.yaml").objective_weights() is None  # no weights: the defaults


@pytest.mark.parametrize(("weights", "expected"), [
    ({"clip_score": 1, "clip_j": 2}, "objective.weights.clip_j: unknown objective component; "
                                     "known: clip_score, clip_i, prior_preservation, trigger_effect"),
    ({"prior_preservation": -1}, "objective.weights.prior_preservation: must be >= 0"),
    ({"clip_score": 0, "clip_i": 0, "prior_preservation": 0, "trigger_effect": 0}, "objective.weights: every weight is 0"),
])
def test_bad_objective_weights_name_their_path(weights, expected):
    with pytest.raises(SpecError) as err:
        parse_spec(_base(objective={"metric": "objective", "weights": weights}), "search.yaml")
    assert expected in str(err.value), str(err.value)


def test_objective_weights_need_the_objective_metric():
    with pytest.raises(SpecError) as err:
        parse_spec(_base(objective={"metric": "clip_score", "weights": {"clip_score": 1}}), "search.yaml")
    assert "objective.weights: weights only apply to metric objective" in str(err.value)
