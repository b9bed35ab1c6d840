"""Metrics of an evaluation sampled at several guidance scales, LoRA strengths and img2img strengths
(evaluator.variant_metrics), and the suite keys that ask for them (evaluator.suites)."""

from pathlib import Path

import pytest
import torch

from evaluator.suites import SuiteError, expand_img2img, load_suite, parse_suite
from evaluator.variant_metrics import (
    aggregate_variants,
    canonical_name,
    img2img_metrics,
    parse_qualified,
    qualified,
)

BASE = {"natural": ["a {trigger} circle"], "no_concept": ["a red circle"], "seeds": [0]}


def _variant(objective: float, clip_score: float, items: list[float], pp: float | None = 0.9) -> dict:
    return {"objective": objective, "clip_score": clip_score, "clip_i": None, "prior_preservation": pp,
            "trigger_effect": None, "objective_items": items, "per_image": items,
            "objective_terms": {"clip_score": clip_score}, "objective_skipped": ["clip_i"]}


def test_plain_metrics_are_the_mean_over_variants_and_each_axis_value_its_own_mean():
    results = {(5.0, 0.5): _variant(10.0, 20.0, [8.0, 12.0]), (5.0, 1.0): _variant(14.0, 22.0, [12.0, 16.0]),
               (7.5, 0.5): _variant(20.0, 30.0, [18.0, 22.0]), (7.5, 1.0): _variant(24.0, 32.0, [20.0, 28.0])}
    out = aggregate_variants(results, per_guidance=True, per_lora_scale=True)
    assert out["objective"] == pytest.approx(17.0) and out["clip_score"] == pytest.approx(26.0)
    # Item by item, so that the mean of objective_items is still the objective (the wilcoxon pruner's pairs).
    assert out["objective_items"] == pytest.approx([14.5, 19.5])
    assert sum(out["objective_items"]) / 2 == pytest.approx(out["objective"])
    assert out["objective_terms"] == {"clip_score": pytest.approx(26.0)}
    assert out["objective@guidance=5"] == pytest.approx(12.0) and out["objective@guidance=7.5"] == pytest.approx(22.0)
    assert out["objective@lora_scale=0.5"] == pytest.approx(15.0) and out["objective@lora_scale=1"] == pytest.approx(19.0)
    assert out["clip_score@lora_scale=1"] == pytest.approx(27.0)
    assert out["prior_preservation@guidance=7.5"] == pytest.approx(0.9)
    # A component no variant could compute stays None and has no per-value metric.
    assert out["clip_i"] is None and "clip_i@guidance=5" not in out
    assert out["objective_skipped"] == ["clip_i"]


def test_one_axis_reports_only_its_own_values():
    results = {(None, 0.6): _variant(1.0, 2.0, [1.0]), (None, 1.0): _variant(3.0, 4.0, [3.0])}
    out = aggregate_variants(results, per_guidance=False, per_lora_scale=True)
    assert {k for k in out if "@" in k} == {qualified(m, "lora_scale", w) for w in (0.6, 1.0)
                                           for m in ("objective", "clip_score", "prior_preservation")}
    with pytest.raises(ValueError, match="no variant"):
        aggregate_variants({}, True, True)


def test_qualified_names_parse_and_are_canonical():
    assert qualified("objective", "lora_scale", 1.0) == "objective@lora_scale=1"
    assert parse_qualified("clip_i@guidance=7.50") == ("clip_i", "guidance", 7.5)
    assert parse_qualified("objective") is None
    assert canonical_name("objective@lora_scale=1.0") == "objective@lora_scale=1"
    assert canonical_name("objective") == "objective"
    with pytest.raises(ValueError, match="axis one of guidance, lora_scale, strength"):
        parse_qualified("objective@cfg=7.5")
    with pytest.raises(ValueError, match="not a number"):
        parse_qualified("objective@guidance=high")


def test_img2img_metrics_per_strength():
    out = img2img_metrics([0.5, 0.5, 1.0], torch.tensor([20.0, 30.0, 10.0]), [0.9, 0.7, 0.2])
    assert out["img2img_clip_score"] == pytest.approx(20.0) and out["img2img_clip_i"] == pytest.approx(0.6)
    assert out["img2img_clip_score@strength=0.5"] == pytest.approx(25.0)
    assert out["img2img_clip_i@strength=0.5"] == pytest.approx(0.8)
    assert out["img2img_clip_i@strength=1"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="one strength, CLIP-T and init cosine per img2img image"):
        img2img_metrics([0.5], [1.0, 2.0], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        img2img_metrics([0.5], [float("nan")], [0.1])


@pytest.mark.parametrize("key, value, words", [
    ("guidance_scales", [7.5, 0.0], "guidance_scales: guidance scale 0.0 must be a finite number > 0"),
    ("guidance_scales", [-1.0], "guidance scale -1.0 must be a finite number > 0"),
    ("guidance_scales", [5.0, 5.0], "repeat a value"),
    ("img2img", [{"prompt": "a {trigger} square", "init_image": "x.png", "strengths": [0.65, 1.5]}],
     "img2img.0.strengths: strength 1.5 is outside (0, 1]"),
    ("img2img", [{"prompt": "a {trigger} square", "init_image": "x.png", "strengths": [0.0]}],
     "strength 0.0 is outside (0, 1]"),
    ("img2img", [{"prompt": "a {trigger} square", "strengths": [0.5]}], "img2img.0.init_image: Field required"),
])
def test_bad_variant_keys_name_their_key(key, value, words):
    with pytest.raises(SuiteError) as err:
        parse_suite({**BASE, key: value}, "my-suite.yaml")
    assert "my-suite.yaml: " in str(err.value) and words in str(err.value)


def test_img2img_items_expand_in_order_with_paths_relative_to_the_suite_file(tmp_path):
    folder = tmp_path / "suites"
    folder.mkdir()
    path = folder / "s.yaml"
    path.write_text("seeds: [0, 1]\nnatural: ['a {trigger} circle']\nguidance_scales: [5, 7.5]\n"
                    "img2img:\n  - {prompt: 'a {trigger} {class}', init_image: pics/a.png, strengths: [0.65, 0.8], seeds: [3]}\n"
                    f"  - {{prompt: 'a red circle', init_image: {tmp_path / 'b.png'}, strengths: [1.0]}}\n")
    suite = load_suite(path)
    assert suite.guidance_scales == [5.0, 7.5]
    items = expand_img2img(suite, "lswsks", "square")
    a = str((folder / "pics" / "a.png").resolve())
    assert items == [("a lswsks square", a, 0.65, 3), ("a lswsks square", a, 0.8, 3),
                     ("a red circle", str(tmp_path / "b.png"), 1.0, 0), ("a red circle", str(tmp_path / "b.png"), 1.0, 1)]
    assert Path(items[0].init_image).is_absolute()


def test_a_suite_of_img2img_items_alone_is_refused():
    with pytest.raises(SuiteError, match="no prompts to sample from text"):
        parse_suite({"img2img": [{"prompt": "a", "init_image": "x.png", "strengths": [0.5]}]})
