"""A sweep scored on a prompt suite: every metric, references made once, local == shared service."""

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from sweeps.spec import parse_spec
from sweeps.suite_scoring import make_suite_scorer, training_images
from sweeps.trial_plan import build_plan
from trainer.loop import LoraTrainer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def suite_setup(tiny_sd_dir, demo_dataset):
    from evaluator.tiny import ensure_tiny_clip

    ensure_tiny_clip()
    data = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    data.update(base_model=str(tiny_sd_dir), dataset=str(demo_dataset))
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
        shared = replace(plan, evaluator_actor="suite-test")
        remote = make_suite_scorer(shared, trainer)(images, prompts)
        make_suite_scorer(shared, trainer)  # a second trial: references already cached
        stats = evaluator_stats(handle)
    finally:
        stop_evaluator(name="suite-test")
    for key in ("clip_score", "clip_i", "prior_preservation", "trigger_effect", "objective"):
        assert remote[key] == pytest.approx(local[key], rel=1e-3, abs=1e-3), key
    assert stats["model_loads"] == 1
    assert sorted(stats["references"]) == ["demo/base", "demo/train"]
