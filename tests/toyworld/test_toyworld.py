"""The toy world: seeded drawing, the exact pixel oracle, its metrics, and the LoRA task's data."""

import numpy as np
import pytest
from PIL import Image

from toyworld.lora_task import CLASS_WORD, TRIGGER, concept_images, write_lora_dataset
from toyworld.oracle import Reading, expected, oracle_metrics, read
from toyworld.world import (
    BACKGROUNDS,
    COLORS,
    HELD_OUT_COLOR,
    KNOWN_COLORS,
    SHAPES,
    all_classes,
    caption,
    draw_shape,
    render_world,
)


def test_drawing_is_seeded_and_captions_match_scenes():
    a, caps_a, scenes = render_world(40, seed=3)
    b, caps_b, _ = render_world(40, seed=3)
    c, _, _ = render_world(40, seed=4)
    assert np.array_equal(a, b) and caps_a == caps_b and not np.array_equal(a, c)
    assert a.shape == (40, 64, 64, 3) and a.dtype == np.uint8
    for text, s in zip(caps_a, scenes):
        assert text in (caption(s.color, s.shape), caption(s.color, s.shape, s.background))
    assert {s.background for s in scenes} == set(BACKGROUNDS)


def test_held_out_colour_is_left_out_of_the_known_world():
    assert HELD_OUT_COLOR in COLORS and HELD_OUT_COLOR not in KNOWN_COLORS
    _, captions, scenes = render_world(300, seed=0, colors=KNOWN_COLORS)
    assert not any(HELD_OUT_COLOR in c for c in captions)
    assert {s.color for s in scenes} == set(KNOWN_COLORS)


@pytest.mark.parametrize("color", list(COLORS))
def test_oracle_reads_every_class_of_drawn_images(color):
    # A fixed seed (str hashes change per process). Measured over 300 draws per class, the
    # hardest class (a purple circle on gray) reads right 99.3% of the time.
    rng = np.random.default_rng(list(COLORS).index(color))
    for shape in SHAPES:
        for background in BACKGROUNDS:
            reads = [read(draw_shape(rng, color, shape, background=background)) for _ in range(100)]
            right = np.mean([r == (color, shape) for r in reads])
            assert right >= 0.97, (color, shape, background, right)


def test_oracle_says_none_on_noise_and_blank_images():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (200, 64, 64, 3), dtype=np.uint8)
    assert np.mean([read(n) == Reading(None, None) for n in noise]) >= 0.95
    blank = np.full((64, 64, 3), 128, np.uint8)
    assert read(blank) == Reading(None, None)
    # A shape covering most of the picture is not one of the world's shapes.
    huge = np.full((64, 64, 3), 20, np.uint8)
    huge[4:60, 4:60] = COLORS["red"]
    assert read(huge) == Reading(None, None)
    with pytest.raises(ValueError, match="RGB"):
        read(np.zeros((64, 64), np.uint8))


def test_expected_reads_what_a_prompt_asks_for():
    assert expected("a lswsks triangle on a black background", "lswsks") == (HELD_OUT_COLOR, "triangle")
    assert expected("a red circle", "lswsks") == ("red", "circle")
    assert expected("a circle", "lswsks") == (None, "circle")
    assert expected("lswsks, a square", "lswsks") == (HELD_OUT_COLOR, "square")


def test_oracle_metrics_count_concept_and_prior_prompts():
    rng = np.random.default_rng(1)
    cyan_circle = draw_shape(rng, HELD_OUT_COLOR, "circle")
    red_circle = draw_shape(rng, "red", "circle")
    blue_square = draw_shape(rng, "blue", "square")
    images = np.stack([cyan_circle, red_circle, cyan_circle, red_circle, blue_square, red_circle])
    prompts = ["a lswsks circle", "a lswsks circle", "a lswsks square",  # right, wrong colour, wrong shape
               "a red circle", "a blue square", "a circle"]  # prior right, prior right, no colour: skipped
    m = oracle_metrics(images, prompts, "lswsks")
    assert m["concept_accuracy"] == pytest.approx(1 / 3)
    assert m["concept_color_rate"] == pytest.approx(2 / 3)
    assert m["prior_accuracy"] == 1.0
    m = oracle_metrics(np.stack([cyan_circle, cyan_circle]), ["a red circle", "a blue square"], "lswsks")
    assert m == {"prior_accuracy": 0.0}  # the concept leaked into prompts without the trigger
    with pytest.raises(ValueError, match="one prompt per image"):
        oracle_metrics(images, prompts[:2], "lswsks")


def test_concept_images_show_the_held_out_colour_in_every_shape():
    images, captions = concept_images(18, seed=0)
    assert len(images) == 18 and all(TRIGGER in c for c in captions)
    assert [read(im) for im in images] == [(HELD_OUT_COLOR, expected(c, TRIGGER).shape) for c in captions]
    assert {expected(c, TRIGGER).shape for c in captions} == set(SHAPES)


@pytest.mark.parametrize("layout", ["kohya", "imagefolder", "dreambooth"])
def test_lora_dataset_layouts_load_in_the_trainer(tmp_path, layout):
    from trainer.config import build_train_config
    from trainer.train_data import load_train_data

    root = write_lora_dataset(tmp_path / layout, layout=layout)
    assert write_lora_dataset(root, layout=layout) == root  # written once
    over = {"dataset": str(root)}
    if layout == "dreambooth":
        over = dict(dataset=str(root / "instance"), instance_prompt=f"a {TRIGGER} {CLASS_WORD}",
                    class_data_dir=str(root / "class"), class_prompt=f"a {CLASS_WORD}", with_prior_preservation=True,
                    num_class_images=12)
    cfg = build_train_config(dict(base_model="builtin:tiny-sd", resolution=64, **over))
    data = load_train_data(cfg)
    concept = [e for e in data.examples if TRIGGER in e.caption]
    assert len({e.image_path for e in concept}) == 18
    assert all(e.caption.startswith(f"a {TRIGGER} ") for e in concept)
    if layout == "kohya":  # beside the concept: known-colour pictures with their own captions
        known = [e for e in data.examples if TRIGGER not in e.caption]
        assert len(concept) == 18 * 5 and len(known) == 15 * 2
        assert all(read(np.asarray(Image.open(e.image_path))) == expected(e.caption, TRIGGER) for e in known)
    else:
        assert len(concept) == len(data.examples)
    if layout == "dreambooth":
        assert len(data.class_examples) == 12


def test_all_classes_cover_every_colour_and_shape():
    assert len(all_classes()) == len(COLORS) * len(SHAPES)
    assert len(all_classes(KNOWN_COLORS)) == len(KNOWN_COLORS) * len(SHAPES)
