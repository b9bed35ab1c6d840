"""An evaluation sampled several ways on the tiny model: guidance scales, LoRA strengths, img2img
(sweeps.eval_variants, sweeps.variant_sampling), and the default suite's single sampling kept."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from peft.tuners.lora import LoraLayer

from sweeps.spec import parse_spec
from sweeps.suite_scoring import base_reference_key, make_suite_scorer
from sweeps.trial_plan import build_plan
from sweeps.variant_sampling import lora_strength, make_evaluation
from trainer.loop import LoraTrainer
from trainer.sampling import make_img2img_pipeline

ROOT = Path(__file__).resolve().parents[2]
PARAMS = {"learning_rate": 1e-2, "rank": 4, "lr_scheduler": "constant"}


def _spec(tiny_sd_dir, demo_dataset, storage, suite, **eval_keys):
    data = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    data.update(base_model=str(tiny_sd_dir), dataset=str(demo_dataset), storage=str(storage))
    data["eval"] = {"interval": 2, "suite": suite, "class_word": "circle", **eval_keys}
    data["train"].update(max_train_steps=4, sampling={"steps": 4})  # few denoising steps: a fast test
    return parse_spec(data, "test")


@pytest.fixture(scope="module")
def init_image(demo_dataset) -> Path:
    return sorted(Path(demo_dataset).rglob("*.png"))[0]


SMALL_SUITE = {"seeds": [0], "natural": ["a {trigger} circle"], "no_concept": ["a red square"]}


@pytest.fixture(scope="module")
def variant_setup(tiny_sd_dir, demo_dataset, init_image, tmp_path_factory):
    from evaluator.tiny import ensure_tiny_clip

    ensure_tiny_clip()
    suite = {**SMALL_SUITE, "guidance_scales": [5.0, 9.0],
             "img2img": [{"prompt": "a {trigger} square", "init_image": str(init_image), "strengths": [0.25, 1.0]}]}
    spec = _spec(tiny_sd_dir, demo_dataset, tmp_path_factory.mktemp("runs"), suite, lora_scales=[0.5, 1.0])
    plan = build_plan(spec)
    trainer = LoraTrainer.build(plan.train_config(PARAMS), prepared=plan.prepared)
    return spec, plan, trainer


def _counting(trainer, monkeypatch) -> list:
    calls, real = [], trainer.sample

    def sample(prompts, seeds, sampling=None):
        calls.append((len(prompts), (sampling or trainer.cfg.sampling).guidance_scale))
        return real(prompts, seeds, sampling)

    monkeypatch.setattr(trainer, "sample", sample)
    return calls


def test_a_suite_without_variants_samples_once_per_evaluation(tiny_sd_dir, demo_dataset, tmp_path, monkeypatch):
    from evaluator.tiny import ensure_tiny_clip

    ensure_tiny_clip()
    spec = _spec(tiny_sd_dir, demo_dataset, tmp_path, SMALL_SUITE)
    plan = build_plan(spec)
    assert plan.eval_variants is None
    trainer = LoraTrainer.build(plan.train_config(PARAMS), prepared=plan.prepared)
    # The reference key of the plain suite is the one every earlier sweep stored its base images under.
    assert base_reference_key(plan, trainer) == base_reference_key(plan, trainer, trainer.cfg.sampling.guidance_scale)
    evaluate = make_evaluation(plan, trainer, make_suite_scorer(plan, trainer))
    calls = _counting(trainer, monkeypatch)
    images, scores = evaluate(plan.prompts, plan.seeds)
    assert calls == [(len(plan.prompts), trainer.cfg.sampling.guidance_scale)]
    assert images.shape[0] == len(plan.prompts)
    assert not any("@" in k or k.startswith("img2img") for k in scores)


def test_the_plan_carries_the_variants_and_the_init_images(variant_setup, init_image):
    _, plan, _ = variant_setup
    v = plan.eval_variants
    assert v.pairs() == [(5.0, 0.5), (5.0, 1.0), (9.0, 0.5), (9.0, 1.0)]
    assert [(it.strength, it.seed) for it in v.img2img] == [(0.25, 0), (1.0, 0)]
    from PIL import Image

    assert np.array_equal(v.init_images[str(init_image)], np.asarray(Image.open(init_image).convert("RGB")))
    assert pickle.loads(pickle.dumps(plan)).eval_variants.pairs() == v.pairs()  # Ray ships the plan


def test_every_guidance_and_strength_pair_is_sampled_and_scored(variant_setup, monkeypatch):
    _, plan, trainer = variant_setup
    evaluate = make_evaluation(plan, trainer, make_suite_scorer(plan, trainer))
    calls = _counting(trainer, monkeypatch)
    images, scores = evaluate(plan.prompts, plan.seeds)
    n = len(plan.prompts)
    # Four pairs of the suite; the 9.0 base-model reference (its no_concept item) made at its first use.
    assert sorted(c for c in calls if c[0] == n) == [(n, 5.0), (n, 5.0), (n, 9.0), (n, 9.0)]
    assert (1, 9.0) in calls
    assert images.shape[0] == n
    # A fresh LoRA (up weights 0) leaves the base model as it is: each scale's prior is kept against
    # that scale's own reference, and the strength changes nothing.
    for g in ("5", "9"):
        assert scores[f"prior_preservation@guidance={g}"] == pytest.approx(1.0, abs=1e-4)
    assert scores["objective@lora_scale=0.5"] == pytest.approx(scores["objective@lora_scale=1"], abs=1e-4)
    assert scores["clip_score@guidance=5"] != pytest.approx(scores["clip_score@guidance=9"], abs=1e-3)
    per_g = [scores["objective@guidance=5"], scores["objective@guidance=9"]]
    assert scores["objective"] == pytest.approx(sum(per_g) / 2)
    assert np.mean(scores["objective_items"]) == pytest.approx(scores["objective"], rel=1e-5)
    # img2img: a low strength keeps more of the init image than strength 1.
    assert scores["img2img_clip_i@strength=0.25"] > scores["img2img_clip_i@strength=1"]
    assert scores["img2img_clip_i"] == pytest.approx(
        (scores["img2img_clip_i@strength=0.25"] + scores["img2img_clip_i@strength=1"]) / 2)


def test_lora_strength_scales_the_delta_and_restores_the_exact_scales(variant_setup):
    _, _, trainer = variant_setup
    trainer.train(2)  # up weights no longer 0
    layer = next(m for m in trainer.models.unet.modules() if isinstance(m, LoraLayer) and hasattr(m, "base_layer")
                 and isinstance(m.base_layer, torch.nn.Linear))
    x = torch.randn(3, layer.base_layer.in_features, generator=torch.Generator().manual_seed(0))
    scales = [dict(m.scaling) for m in trainer.models.unet.modules() if isinstance(m, LoraLayer)]
    with torch.no_grad():
        base = layer.base_layer(x)
        full = layer(x) - base
        assert full.abs().max() > 0
        with lora_strength(trainer, 0.5):
            half = layer(x) - base
        after = layer(x) - base
    assert torch.allclose(half, 0.5 * full, atol=1e-6)
    assert torch.equal(after, full)
    assert [dict(m.scaling) for m in trainer.models.unet.modules() if isinstance(m, LoraLayer)] == scales


def test_img2img_pipeline_shares_the_trials_modules_and_keeps_the_picture_at_low_strength(variant_setup, init_image):
    _, plan, trainer = variant_setup
    pipe = make_img2img_pipeline(trainer.models, trainer.cfg.sampling.sampler)
    assert pipe.unet is trainer.models.unet and pipe.vae is trainer.models.vae
    assert pipe.text_encoder is trainer.models.text_encoder
    picture = plan.eval_variants.init_images[str(init_image)]
    low, full = (trainer.sample_img2img(["a lswsks square"], [0], [picture], s) for s in (0.25, 1.0))
    assert low.shape == full.shape == (1, 64, 64, 3)
    from trainer.sampling import fit_image

    fitted = fit_image(picture, 64).astype(int)
    assert np.abs(low[0].astype(int) - fitted).mean() < np.abs(full[0].astype(int) - fitted).mean()


def test_changed_guidance_scales_in_a_suite_file_are_a_changed_question(tmp_path):
    from sweeps.spec import SpecError, load_spec
    from sweeps.stored_spec import check_against_stored, store

    suite = tmp_path / "suite.yaml"
    suite.write_text((ROOT / "examples" / "suites" / "demo.yaml").read_text() + "guidance_scales: [5.0, 7.5]\n")
    spec = load_spec(ROOT / "examples" / "demo.yaml", [f"storage={tmp_path}", f"eval.suite={suite}"])
    store(spec)
    assert check_against_stored(spec, "demo.yaml") == []
    suite.write_text(suite.read_text().replace("[5.0, 7.5]", "[5.0, 10.0]"))
    again = load_spec(ROOT / "examples" / "demo.yaml", [f"storage={tmp_path}", f"eval.suite={suite}"])
    with pytest.raises(SpecError, match="eval_variants.guidance_scales"):
        check_against_stored(again, "demo.yaml")


def test_the_dry_run_counts_every_variant_and_img2img_step(tmp_path, init_image):
    from sweeps.dry_run import SAMPLE_S_PER_UNET_STEP, estimate
    from sweeps.spec import load_spec

    sets = [f"storage={tmp_path}", "train.sampling={steps: 10}"]
    plain = load_spec(ROOT / "examples" / "demo.yaml", sets)
    n = len(plain.eval_prompts()[0])
    assert estimate(plain)["eval_images"] == n  # the demo's evaluation costs what it did
    suite = {**SMALL_SUITE, "guidance_scales": [5.0, 7.5, 10.0],
             "img2img": [{"prompt": "a {trigger} square", "init_image": str(init_image), "strengths": [0.65, 0.8]}]}
    spec = load_spec(ROOT / "examples" / "demo.yaml", [*sets, f"eval.suite={suite}", "eval.lora_scales=[0.6, 1.0]"])
    est, base = estimate(spec), estimate(plain)
    assert est["eval_images"] == 2 * 3 * 2 + 2
    # Same training: the difference is the evaluations' denoising steps (img2img: int(10 x 0.65) + int(10 x 0.8)).
    extra_s = (est["hours_per_trial"] - base["hours_per_trial"]) * 3600
    steps = 2 * 3 * 2 * 10 + 6 + 8 - n * 10
    assert extra_s == pytest.approx(est["evals_per_trial"] * steps * SAMPLE_S_PER_UNET_STEP * (64 / 512) ** 2)
