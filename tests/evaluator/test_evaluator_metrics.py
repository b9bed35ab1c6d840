"""Tests for the evaluator's suite-level metrics, composite objective and prompt suites (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evaluator import (
    DEFAULT_OBJECTIVE_WEIGHTS,
    DEFAULT_SUITE,
    ObjectiveWeights,
    SuiteError,
    SuiteItem,
    clip_i,
    clip_i_per_image,
    clip_t,
    composite_objective,
    default_suite,
    expand_suite,
    load_suite,
    parse_suite,
    prior_preservation,
    suite_metrics,
    trigger_effect,
)
from evaluator.distribution_metrics import clip_fd, clip_kid, cmmd, diversity
from evaluator.metrics import REPORTED_METRICS
from evaluator.suites import clip_texts, drop_word

ROOT = Path(__file__).resolve().parents[2]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------- metric functions

def test_clip_i_is_mean_cosine_over_all_pairs():
    rng = np.random.default_rng(0)
    gen, ref = rng.normal(size=(5, 12)) * 3, rng.normal(size=(7, 12))
    want = np.mean([[_cos(g, r) for r in ref] for g in gen])
    assert clip_i(gen, ref) == pytest.approx(want, abs=1e-6)
    per = clip_i_per_image(torch.tensor(gen, dtype=torch.float32), ref)
    np.testing.assert_allclose(per.numpy(), [np.mean([_cos(g, r) for r in ref]) for g in gen],
                               atol=1e-6)
    # the same as the dot product of the mean unit vectors (an identity, computed differently)
    assert clip_i(gen, ref) == pytest.approx(float(_unit(gen).mean(0) @ _unit(ref).mean(0)),
                                             abs=1e-6)
    assert clip_i(ref, ref * 2) == pytest.approx(np.mean(_unit(ref) @ _unit(ref).T), abs=1e-6)
    with pytest.raises(ValueError, match="embedding sizes differ"):
        clip_i(gen, ref[:, :6])


def test_prior_preservation_is_per_pair_then_mean():
    rng = np.random.default_rng(1)
    lora, base = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    base[0] = lora[0] * 5  # an untouched image: cosine 1
    want = np.mean([_cos(a, b) for a, b in zip(lora, base)])
    assert prior_preservation(lora, base) == pytest.approx(want, abs=1e-6)
    assert prior_preservation(lora, lora) == pytest.approx(1.0, abs=1e-6)
    # per pair, not all pairs: shuffling the base images changes the score
    assert prior_preservation(lora, base[::-1]) != pytest.approx(want, abs=1e-3)
    with pytest.raises(ValueError, match=r"one base-model image per LoRA image.*6 LoRA and 5"):
        prior_preservation(lora, base[:5])


def test_trigger_effect_and_its_errors():
    assert trigger_effect([30.0, 32.0], [25.0, 26.0]) == pytest.approx(5.5)
    assert trigger_effect(torch.tensor([20.0]), np.array([22.0])) == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="same non-zero number"):
        trigger_effect([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="same non-zero number"):
        trigger_effect([], [])


def test_composite_objective_weights_terms_and_skips():
    comp = {"clip_score": 31.0, "clip_i": 0.8, "prior_preservation": 0.9, "trigger_effect": 2.0}
    out = composite_objective(comp)
    assert DEFAULT_OBJECTIVE_WEIGHTS == {"clip_score": 1.0, "clip_i": 10.0,
                                         "prior_preservation": 10.0, "trigger_effect": 0.5}
    assert out["objective"] == pytest.approx(31.0 + 8.0 + 9.0 + 1.0)
    assert out["components"] == comp and out["skipped"] == []
    assert out["terms"] == pytest.approx({"clip_score": 31.0, "clip_i": 8.0,
                                          "prior_preservation": 9.0, "trigger_effect": 1.0})
    partial = composite_objective({**comp, "clip_i": None, "trigger_effect": None})
    assert partial["objective"] == pytest.approx(40.0)
    assert partial["skipped"] == ["clip_i", "trigger_effect"]
    custom = composite_objective(comp, {"clip_score": 2.0, "clip_i": 0.0})
    assert custom["objective"] == pytest.approx(62.0) and set(custom["terms"]) == {"clip_score"}
    with pytest.raises(ValueError, match=r"unknown objective component\(s\) \['fid'\]"):
        composite_objective(comp, {"fid": 1.0})
    with pytest.raises(ValueError, match="no computable term"):
        composite_objective({"clip_score": None}, {"clip_score": 1.0})
    with pytest.raises(ValueError, match="finite"):
        composite_objective(comp, {"clip_score": float("nan")})
    typed = ObjectiveWeights(clip_i=0.0)
    assert composite_objective(comp, typed)["objective"] == pytest.approx(41.0)
    assert ObjectiveWeights().as_dict() == DEFAULT_OBJECTIVE_WEIGHTS
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        ObjectiveWeights(clip_score=-1)


# ---------------------------------------------------------------- suites

def test_default_suite_matches_shipped_yaml_and_expands_in_order():
    shipped = load_suite(ROOT / "examples" / "suites" / "default.yaml")
    assert shipped == default_suite() == parse_suite(DEFAULT_SUITE)
    items = expand_suite(shipped, "sks", "dog")
    assert len(items) == 18
    assert [k for k, _, _ in items] == (["natural"] * 4 + ["new_setting"] * 6 + ["no_concept"] * 4
                                        + ["trigger_on"] * 2 + ["trigger_off"] * 2)
    assert items[0] == SuiteItem("natural", "a photo of sks dog", 0)
    assert items[1].seed == 1 and items[1].prompt == items[0].prompt
    assert items[-2:] == [SuiteItem("trigger_off", "a photo of dog", 0),
                          SuiteItem("trigger_off", "a photo of dog", 1)]
    for p in (ROOT / "examples" / "suites").glob("*.yaml"):  # every shipped suite loads
        assert expand_suite(load_suite(p), "tok", "thing")


def test_expand_suite_seeds_placeholders_and_trigger_removal():
    suite = parse_suite({"seeds": [7],
                         "natural": [{"prompt": "{trigger}, a {class}", "seeds": [1, 2]}],
                         "trigger_test": ["{trigger}, a red {class}, photo"],
                         "no_concept": ["a bowl"]})
    items = expand_suite(suite, "lswsks", "circle")
    assert items == [SuiteItem("natural", "lswsks, a circle", 1),
                     SuiteItem("natural", "lswsks, a circle", 2),
                     SuiteItem("no_concept", "a bowl", 7),
                     SuiteItem("trigger_on", "lswsks, a red circle, photo", 7),
                     SuiteItem("trigger_off", "a red circle, photo", 7)]
    # CLIP-T texts drop the trigger word (whole words only), so on/off share one text
    assert clip_texts(items, "lswsks") == ["a circle", "a circle", "a bowl", "a red circle, photo",
                                           "a red circle, photo"]
    assert clip_texts(items, "lswsks", keep_trigger=True)[0] == "lswsks, a circle"
    assert drop_word("a photo of sks dog, sksy", "sks") == "a photo of dog, sksy"
    with pytest.raises(SuiteError, match=r"natural\[0\].*no trigger word.*trigger_word"):
        expand_suite(suite, None, "circle")
    with pytest.raises(SuiteError, match=r"no class word.*eval.class_word"):
        expand_suite(suite, "lswsks", None)


def _write(tmp_path, text: str):
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, words", [
    ("natural: ['a {trigger}']\nprompts: [x]\n", ["suite.yaml: prompts: unknown key"]),
    ("natural: ['a {trigger} {style}']\n", ["natural.0.prompt", "{style}", "allowed"]),
    ("no_concept: ['a {trigger} bowl']\n", ["no_concept", "contains {trigger}"]),
    ("trigger_test: ['a dog']\n", ["trigger_test", "lacks {trigger}"]),
    ("seeds: [a]\nnatural: [x]\n", ["seeds.0", "integer"]),
    ("seeds: []\nnatural: [x]\n", ["seeds", "at least 1"]),
    ("name: empty\n", ["no prompts"]),
    ("- a\n- b\n", ["must be a mapping"]),
    ("natural: [x\n", ["not valid YAML"]),
    ("natural: [{prompt: x, seed: 3}]\n", ["natural.0.seed", "unknown key"]),
])
def test_bad_suite_yaml_names_file_and_key(tmp_path, text, words):
    path = _write(tmp_path, text)
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    msg = str(info.value)
    assert str(path) in msg
    for w in words:
        assert w in msg, msg


def test_bad_suite_reports_every_problem_at_once(tmp_path):
    path = _write(tmp_path, "seeds: [x]\nnatural: ['{foo}']\nextra: 1\n")
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 3 and all(ln.startswith(f"{path}: ") for ln in lines)
    with pytest.raises(SuiteError, match="not found"):
        load_suite(tmp_path / "missing.yaml")


# ---------------------------------------------------------------- suite_metrics (pure)

def test_suite_metrics_equal_independent_computation():
    rng = np.random.default_rng(3)
    kinds = (["natural"] * 2 + ["new_setting"] * 2 + ["no_concept"] * 3 + ["trigger_on"] * 2
             + ["trigger_off"] * 2)
    # Two seeds of each prompt (p0, p0, p1, p1, ...): the concept prompts have a diversity.
    items = [SuiteItem(k, f"p{i // 2}", i) for i, k in enumerate(kinds)]
    img, txt = rng.normal(size=(11, 16)), rng.normal(size=(11, 16))
    txt[:11] += img * 1.5  # mostly positive cosines
    base, train = rng.normal(size=(3, 16)), rng.normal(size=(4, 16))
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    out = suite_metrics(items, t(img), t(txt), t(base), t(train))

    clip = [100 * max(_cos(a, b), 0.0) for a, b in zip(img, txt)]
    assert out["per_image"] == pytest.approx(clip, abs=1e-4)
    assert out["clip_score"] == pytest.approx(np.mean(clip[:7]), abs=1e-4)
    assert out["clip_score_no_concept"] == pytest.approx(np.mean(clip[4:7]), abs=1e-4)
    assert out["clip_score_trigger_off"] == pytest.approx(np.mean(clip[9:]), abs=1e-4)
    concept = [0, 1, 2, 3, 7, 8]
    assert out["clip_i"] == pytest.approx(
        np.mean([[_cos(img[i], r) for r in train] for i in concept]), abs=1e-5)
    assert out["prior_preservation"] == pytest.approx(
        np.mean([_cos(img[4 + j], base[j]) for j in range(3)]), abs=1e-5)
    assert out["trigger_effect"] == pytest.approx(np.mean(clip[7:9]) - np.mean(clip[9:]), abs=1e-4)
    want = (out["clip_score"] + 10 * out["clip_i"] + 10 * out["prior_preservation"]
            + 0.5 * out["trigger_effect"])
    assert out["objective"] == pytest.approx(want, abs=1e-4) and out["objective_skipped"] == []
    # The concept images against the training images, beside the objective and not in it.
    assert out["cmmd"] == pytest.approx(cmmd(img[concept], train), abs=1e-6)
    assert out["clip_fd"] == pytest.approx(clip_fd(img[concept], train), abs=1e-6)
    assert out["clip_kid"] == pytest.approx(clip_kid(img[concept], train), abs=1e-9)
    assert out["diversity"] == pytest.approx(diversity(img[concept], ["p0", "p0", "p1", "p1", "p3", "p4"]), abs=1e-6)
    assert min(out["clip_fd"], out["diversity"]) > 0  # (cmmd, unbiased, may be below 0 for two random sets)
    # A suite with every kind reports exactly the metrics a sweep's objective may name.
    scalars = {k for k, v in out.items() if isinstance(v, float)}
    assert scalars == set(REPORTED_METRICS)

    bare = suite_metrics(items[:4], t(img[:4]), t(txt[:4]))
    assert bare["clip_i"] is bare["prior_preservation"] is bare["trigger_effect"] is None
    assert bare["cmmd"] is bare["clip_fd"] is bare["clip_kid"] is None  # no training images
    assert bare["diversity"] == pytest.approx(diversity(img[:4], ["p0", "p0", "p1", "p1"]), abs=1e-6)
    one = suite_metrics(items[:1], t(img[:1]), t(txt[:1]), train_emb=t(train))  # one concept image
    assert one["cmmd"] is one["clip_kid"] is one["diversity"] is None and one["clip_i"] is not None
    assert bare["objective"] == pytest.approx(bare["clip_score"])
    assert bare["objective_skipped"] == ["clip_i", "prior_preservation", "trigger_effect"]
    assert "clip_score_no_concept" not in bare
    with pytest.raises(ValueError, match="one base-model image per no_concept item"):
        suite_metrics(items, t(img), t(txt), t(base[:2]))
    with pytest.raises(ValueError, match="11 images for 4 items"):
        suite_metrics(items[:4], t(img), t(txt))
    with pytest.raises(ValueError, match="unknown kind 'bogus'"):
        suite_metrics([SuiteItem("bogus", "x", 0)], t(img[:1]), t(txt[:1]))


def test_objective_items_split_the_objective_item_by_item():
    rng = np.random.default_rng(5)
    kinds = ["natural"] * 2 + ["no_concept"] * 2 + ["trigger_on"] * 2 + ["trigger_off"] * 2
    items = [SuiteItem(k, f"p{i}", i) for i, k in enumerate(kinds)]
    img, txt = rng.normal(size=(8, 16)), rng.normal(size=(8, 16))
    txt += img * 1.5
    base, train = rng.normal(size=(2, 16)), rng.normal(size=(3, 16))
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    weights = {"clip_score": 1.0, "clip_i": 10.0, "prior_preservation": 5.0, "trigger_effect": 0.5}
    out = suite_metrics(items, t(img), t(txt), t(base), t(train), weights=weights)

    clip = [100 * max(_cos(a, b), 0.0) for a, b in zip(img, txt)]
    want = np.zeros(8)
    for i in range(4):  # clip_score over natural + no_concept: 4 of 8 items
        want[i] += 1.0 * clip[i] * 8 / 4
    for i in (0, 1, 4, 5):  # clip_i over the concept images (natural, trigger_on)
        want[i] += 10.0 * np.mean([_cos(img[i], r) for r in train]) * 8 / 4
    for j in range(2):  # prior preservation, paired with the base image of the same prompt and seed
        want[2 + j] += 5.0 * _cos(img[2 + j], base[j]) * 8 / 2
        want[4 + j] += 0.5 * (clip[4 + j] - clip[6 + j]) * 8 / 2  # trigger effect, on the trigger_on item
    assert out["objective_items"] == pytest.approx(list(want), abs=1e-3)
    assert np.mean(out["objective_items"]) == pytest.approx(out["objective"], abs=1e-4)

    # A weight of 0 leaves the component out of the items as it does out of the objective.
    out0 = suite_metrics(items, t(img), t(txt), t(base), t(train), weights={**weights, "clip_i": 0.0})
    assert np.mean(out0["objective_items"]) == pytest.approx(out0["objective"], abs=1e-4)
    assert out0["objective_items"][6] == 0.0 and out0["objective_items"][0] != pytest.approx(want[0])


def test_clip_t_of_suite_texts_is_what_suite_metrics_uses():
    items = [SuiteItem("natural", "sks, a red circle", 0)]
    emb = torch.eye(4)[:1]
    out = suite_metrics(items, emb, emb)
    assert out["per_image"] == pytest.approx([float(clip_t(emb, emb)[0])])
    assert yaml.safe_load(yaml.safe_dump(out))  # plain Python values: reportable as is
