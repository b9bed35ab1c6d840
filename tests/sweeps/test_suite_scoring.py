"""A sweep scored on a prompt suite: every metric, references made once, local == shared service."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from evaluator.metrics import DEFAULT_OBJECTIVE_WEIGHTS, OBJECTIVE_COMPONENTS
from sweeps import storage
from sweeps import suite_scoring as ss
from sweeps.spec import parse_spec
from sweeps.suite_scoring import base_images, base_reference_key, make_suite_scorer, reference_path, training_images
from sweeps.trial_plan import build_plan
from trainer.loop import LoraTrainer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def suite_setup(tiny_sd_dir, demo_dataset, tmp_path_factory):
    from evaluator.tiny import ensure_tiny_clip

    ensure_tiny_clip()
    data = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    data.update(base_model=str(tiny_sd_dir), dataset=str(demo_dataset), storage=str(tmp_path_factory.mktemp("runs")))
    data["eval"] = {"interval": 2, "suite": str(ROOT / "examples" / "suites" / "demo.yaml"), "class_word": "circle"}
    data["train"]["max_train_steps"] = 2
    spec = parse_spec(data, "test")
    plan = build_plan(spec)
    trainer = LoraTrainer.build(plan.train_config({"learning_rate": 1e-2, "rank": 4, "lr_scheduler": "constant"}),
                          prepared=plan.prepared)
    return spec, plan, trainer


def test_untrained_lora_scores_every_metric_and_keeps_the_prior(suite_setup):
    spec, plan, trainer = suite_setup
    scorer = make_suite_scorer(plan, trainer)
    prompts, seeds = plan.prompts, plan.seeds
    scores = scorer(trainer.sample(prompts, seeds), prompts)
    for key in ("clip_score", "clip_i", "prior_preservation", "trigger_effect", "objective",
                "clip_score_natural", "clip_score_new_setting", "clip_score_no_concept"):
        assert scores[key] is not None, key
    # A fresh LoRA does not change the base model: its no-concept images equal the base images.
    assert scores["prior_preservation"] == pytest.approx(1.0, abs=1e-4)


def test_training_images_are_the_dataset_images(suite_setup):
    _, _, trainer = suite_setup
    images = training_images(trainer)
    # The 18 pictures of the concept, not the known-colour ones kept beside them.
    assert images.dtype.name == "uint8" and images.shape == (18, 64, 64, 3)
    from toyworld.oracle import read
    from toyworld.world import HELD_OUT_COLOR
    assert all(read(im).color == HELD_OUT_COLOR for im in images)


def test_plain_prompt_specs_use_no_suite(suite_setup, tiny_sd_dir, demo_dataset):
    _, plan, trainer = suite_setup
    assert make_suite_scorer(replace(plan, suite_items=None), trainer) is None


@pytest.mark.slow
def test_shared_service_gives_the_local_scores(suite_setup, ray_local):
    from evaluator.remote import evaluator_stats, start_evaluator, stop_evaluator

    spec, plan, trainer = suite_setup
    prompts, seeds = plan.prompts, plan.seeds
    images = trainer.sample(prompts, seeds)
    local = make_suite_scorer(plan, trainer)(images, prompts)
    handle = start_evaluator(name="suite-test", model=spec.evaluator.model, pretrained=spec.evaluator.pretrained,
                             replicas=1, num_cpus=0, detached=False)
    try:
        shared = replace(plan, evaluator_actor="suite-test", evaluator_local_wait_s=0)  # a replica of no node
        remote = make_suite_scorer(shared, trainer)(images, prompts)
        make_suite_scorer(shared, trainer)  # a second trial: references already cached
        stats = evaluator_stats(handle)
    finally:
        stop_evaluator(name="suite-test")
    for key in ("clip_score", "clip_i", "prior_preservation", "trigger_effect", "objective"):
        assert remote[key] == pytest.approx(local[key], rel=1e-3, abs=1e-3), key
    assert remote["evaluator_local"] == 0.0  # not this node's own replica: reported as such
    assert stats["model_loads"] == 1
    assert sorted(stats["references"]) == [base_reference_key(plan, trainer), "demo/train"]


PARAMS = {"learning_rate": 1e-2, "rank": 4, "lr_scheduler": "constant"}


def _fresh_storage(plan, tmp_path):
    return replace(plan, sweep_uri=str(tmp_path / "sweep"))


def test_clip_skip_gives_its_own_reference(suite_setup, tmp_path):
    _, plan, trainer = suite_setup
    plan = _fresh_storage(plan, tmp_path)
    other = LoraTrainer.build(plan.train_config({**PARAMS, "clip_skip": 2}), prepared=plan.prepared)
    assert base_reference_key(plan, trainer) != base_reference_key(plan, other)
    assert base_reference_key(plan, trainer) == base_reference_key(plan, trainer)  # stable
    a, b = base_images(plan, trainer), base_images(plan, other)
    assert a.shape == b.shape and not np.array_equal(a, b)
    # Both are kept, each under its key: the one rendered first does not stand in for the other.
    assert len(storage.listdir(storage.join(plan.sweep_uri, ss.REFERENCES))) == 2
    assert np.array_equal(base_images(plan, other), b)


@pytest.mark.slow  # trains, then scores twice
def test_resumed_trial_keeps_prior_preservation(suite_setup, tmp_path):
    _, plan, _ = suite_setup
    trainer = LoraTrainer.build(plan.train_config(PARAMS), prepared=plan.prepared)
    fresh_plan = _fresh_storage(plan, tmp_path / "a")
    uninterrupted = make_suite_scorer(fresh_plan, trainer)  # made at step 0, as a fresh trial does
    trainer.train(2)
    images = trainer.sample(plan.prompts, plan.seeds)
    expected = uninterrupted(images, plan.prompts)
    # The same trial resumed at step 2 on a node whose sweep storage has no reference yet: it
    # renders the base model's images itself (adapters disabled), not the trained LoRA's.
    resumed_plan = _fresh_storage(plan, tmp_path / "b")
    assert trainer.global_step == 2
    resumed = make_suite_scorer(resumed_plan, trainer)(images, plan.prompts)
    assert resumed["prior_preservation"] is not None and resumed["objective_skipped"] == []
    assert set(resumed["objective_terms"]) == set(OBJECTIVE_COMPONENTS)
    for key in (*OBJECTIVE_COMPONENTS, "objective"):
        assert resumed[key] == pytest.approx(expected[key], abs=1e-5), key
    assert np.array_equal(base_images(resumed_plan, trainer), base_images(fresh_plan, trainer))
    # Rendering the base model left the LoRA on and trainable.
    assert trainer.params and all(p.requires_grad for p in trainer.params)
    assert np.array_equal(trainer.sample(plan.prompts, plan.seeds), images)


def test_reference_persists_and_is_read_back(suite_setup, tmp_path, monkeypatch):
    _, plan, trainer = suite_setup
    plan = _fresh_storage(plan, tmp_path)
    key = base_reference_key(plan, trainer)
    first = make_suite_scorer(plan, trainer)
    path = reference_path(plan, key)
    assert storage.exists(path) and path.startswith(plan.sweep_uri)
    stored = base_images(plan, trainer)

    def no_render(*args, **kwargs):
        raise AssertionError("the stored reference was rendered again")

    monkeypatch.setattr(ss, "adapters_disabled", no_render)
    monkeypatch.setattr(trainer, "sample", no_render)
    second = make_suite_scorer(plan, trainer)  # an evaluator restart or another trial: read back
    assert np.array_equal(base_images(plan, trainer), stored)
    monkeypatch.undo()
    images = trainer.sample(plan.prompts, plan.seeds)
    a, b = first(images, plan.prompts), second(images, plan.prompts)
    assert a["prior_preservation"] == b["prior_preservation"] is not None


def test_objective_weights_reach_the_score(suite_setup):
    _, plan, trainer = suite_setup
    images = trainer.sample(plan.prompts, plan.seeds)
    only_clip = {k: (1.0 if k == "clip_score" else 0.0) for k in OBJECTIVE_COMPONENTS}
    weighted = make_suite_scorer(replace(plan, objective_weights=only_clip), trainer)(images, plan.prompts)
    assert weighted["objective"] == pytest.approx(weighted["clip_score"])
    assert set(weighted["objective_terms"]) == {"clip_score"}
    default = make_suite_scorer(plan, trainer)(images, plan.prompts)
    assert default["objective"] == pytest.approx(sum(DEFAULT_OBJECTIVE_WEIGHTS[k] * default[k] for k in OBJECTIVE_COMPONENTS))
    for key in OBJECTIVE_COMPONENTS:  # every component is still reported, whatever its weight
        assert weighted[key] == pytest.approx(default[key]) and weighted[key] is not None


@pytest.fixture(scope="module")
def judged_plan(suite_setup, tmp_path_factory):
    """The suite's plan with both judges configured in its spec (tiny ones the test builds), and
    the transformers model and head state to score by hand."""
    from sweeps.spec_schema import EvaluatorSpec
    from tests.evaluator.judge_builders import tiny_dino, tiny_head

    spec, _, _ = suite_setup
    root = tmp_path_factory.mktemp("judges")
    _, model, proc = tiny_dino(root / "dino")
    state = tiny_head(root / "head.safetensors", "mlp", 32)  # the tiny CLIP's width
    evaluator = EvaluatorSpec(model=spec.evaluator.model, pretrained=spec.evaluator.pretrained,
                              dino=str(root / "dino"), aesthetic=str(root / "head.safetensors"))
    plan = build_plan(spec.model_copy(update={"evaluator": evaluator}))
    assert (plan.evaluator_dino, plan.evaluator_aesthetic) == (str(root / "dino"), str(root / "head.safetensors"))
    return plan, model, proc, state


def test_judges_reach_the_suite_score(suite_setup, judged_plan):
    from evaluator import ClipModel
    from tests.evaluator.judge_builders import dino_cls, head_by_hand

    spec, plain_plan, trainer = suite_setup
    plan, model, proc, state = judged_plan
    images = trainer.sample(plan.prompts, plan.seeds)
    scores = make_suite_scorer(plan, trainer)(images, plan.prompts)
    kinds = [it.kind for it in plan.suite_items]
    concept = [i for i, k in enumerate(kinds) if k in ("natural", "new_setting", "trigger_on")]
    gen = dino_cls(model, proc(images=list(images[concept]), return_tensors="pt")["pixel_values"])
    ref = dino_cls(model, proc(images=list(training_images(trainer)), return_tensors="pt")["pixel_values"])
    assert scores["dino_i"] == pytest.approx(float((gen @ ref.T).mean()), abs=1e-5)
    emb = ClipModel.load(spec.evaluator.model, spec.evaluator.pretrained, device="cpu").embed_images(images)
    prompt_kinds = [i for i, k in enumerate(kinds) if k in ("natural", "new_setting", "no_concept")]
    assert scores["aesthetic"] == pytest.approx(float(head_by_hand(state, emb)[prompt_kinds].mean()), abs=1e-4)
    # Without the judges the report has no such keys, and the CLIP metrics are unchanged by them.
    plain = make_suite_scorer(plain_plan, trainer)(images, plan.prompts)
    assert not {"dino_i", "aesthetic"} & set(plain)
    for key in ("clip_score", "clip_i", "prior_preservation", "objective"):
        assert scores[key] == pytest.approx(plain[key], abs=1e-6), key


@pytest.mark.slow
def test_shared_service_reports_the_judges_as_the_local_scorer(suite_setup, judged_plan, ray_local):
    from evaluator.remote import start_evaluator, stop_evaluator

    spec, _, trainer = suite_setup
    plan = judged_plan[0]
    images = trainer.sample(plan.prompts, plan.seeds)
    local = make_suite_scorer(plan, trainer)(images, plan.prompts)
    start_evaluator(name="suite-judges", model=spec.evaluator.model, pretrained=spec.evaluator.pretrained, replicas=1,
                    num_cpus=0, detached=False, dino=plan.evaluator_dino, aesthetic=plan.evaluator_aesthetic)
    try:
        remote = make_suite_scorer(replace(plan, evaluator_actor="suite-judges"), trainer)(images, plan.prompts)
    finally:
        stop_evaluator(name="suite-judges")
    for key in ("dino_i", "aesthetic", "clip_i", "objective"):
        assert remote[key] == pytest.approx(local[key], rel=1e-3, abs=1e-3), key
