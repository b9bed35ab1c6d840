"""The XYZ grids' axes, cells and pictures (sweeps.xyz_grids), on images whose pixels say which
item they are."""

import numpy as np
import pytest

from sweeps.xyz_grids import TILE, Grid, make_axis, param_grid, pick_items, prompt_seed_grid, strength_grid


def _items(n: int) -> np.ndarray:
    images = np.zeros((n, 16, 16, 3), dtype=np.uint8)
    images[..., 0] = (np.arange(n) * 10)[:, None, None]
    return images


def test_choices_get_a_column_each_and_many_numbers_get_log_bins():
    choice = make_axis("rank", [8, 2, 4, 2, None])
    assert choice.labels == ["2", "4", "8"] and [choice.index(v) for v in (2, 8, 16, None)] == [0, 2, None, None]
    lrs = list(np.geomspace(1e-4, 1e-2, 9))
    axis = make_axis("learning_rate", lrs, log=True, max_bins=2)
    assert axis.labels == ["0.0001..0.001", "0.001..0.01"]
    assert [axis.index(v) for v in (1e-4, 9e-4, 2e-3, 1e-2, 2e-2, 5e-5)] == [0, 0, 1, 1, None, None]
    linear = make_axis("lr_warmup_steps", list(range(10)), max_bins=3)
    assert len(linear.labels) == 3 and linear.index(0) == 0 and linear.index(9) == 2
    assert make_axis("lr_scheduler", ["cosine", "constant", "cosine"]).labels == ["constant", "cosine"]
    # A choice keeps its values as columns however many: six learning rates are six columns, not bins.
    lr_choices = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    labels = make_axis("learning_rate", lr_choices, log=True, choice=True).labels
    assert labels == ["0.0001", "0.0003", "0.001", "0.003", "0.01", "0.03"]


def test_each_cell_holds_the_best_trial_whose_params_fall_in_it():
    trials = [("a", {"rank": 2, "lr_scheduler": "constant"}, 1.0), ("b", {"rank": 2, "lr_scheduler": "constant"}, 3.0),
              ("c", {"rank": 4, "lr_scheduler": "cosine"}, 2.0), ("d", {"rank": 4, "lr_scheduler": "cosine"}, float("nan")),
              ("e", {"rank": 4, "lr_scheduler": "constant"}, None)]
    x, y = make_axis("rank", [2, 4]), make_axis("lr_scheduler", ["constant", "cosine"])
    read = []
    image = lambda tid: read.append(tid) or np.full((4, 4, 3), ord(tid), dtype=np.uint8)
    grid = param_grid(trials, x, y, "objective", "max", "a lswsks circle", 0, image)
    assert grid.meta["cells"] == {(0, 0): "b", (1, 1): "c"} and sorted(read) == ["b", "c"]  # only the shown are read
    assert grid.cells[0][1] is None and grid.cells[1][0] is None and grid.cells[0][0][0, 0, 0] == ord("b")
    assert grid.captions[0][0] == "b 3" and grid.captions[0][1] == ""
    low = param_grid(trials, x, None, "loss", "min", "p", 0, image)
    assert low.rows == ["all"] and low.meta["cells"] == {(0, 0): "a", (0, 1): "c"}


def test_prompt_seed_grid_puts_every_image_at_its_prompt_and_seed():
    prompts = ["a", "a", "b", "b", "a"]
    seeds = [0, 1, 0, 1, 0]  # the last repeats (a, 0): the first image of a pair is shown
    grid = prompt_seed_grid(_items(5), prompts, seeds, "t")
    assert grid.rows == ["a", "b"] and grid.columns == ["seed 0", "seed 1"]
    assert [[int(c[0, 0, 0]) for c in row] for row in grid.cells] == [[0, 10], [20, 30]]


def test_small_grids_pick_the_concept_prompts_then_one_prior_prompt():
    prompts = ["a x circle", "a x circle", "a x square", "a red circle", "a blue square", "a x circle", "a circle"]
    seeds = [0, 1, 0, 0, 0, 0, 0]
    kinds = ["natural", "natural", "natural", "no_concept", "no_concept", "trigger_on", "trigger_off"]
    assert pick_items(prompts, seeds, kinds) == [0, 2, 3]
    assert pick_items(prompts, seeds, kinds, limit=2) == [0, 3]
    assert pick_items(prompts, seeds, None, limit=3) == [0, 2, 3]


def test_the_picture_has_a_labelled_cell_per_value():
    grid = strength_grid({0.0: _items(2), 0.5: _items(2), 1.0: _items(2)}, ["p", "q"], [0, 1], "strength")
    assert grid.columns == ["strength 0", "strength 0.5", "strength 1"] and grid.rows == ["p | seed 0", "q | seed 1"]
    picture = grid.image()
    assert picture.width == 170 + 3 * (TILE + 4) and picture.height > 2 * TILE
    cells = np.asarray(picture)
    # the second row's cells are the second image, enlarged (nearest) to the tile
    header = picture.height - 2 * (TILE + 4) - 4
    assert (cells[header + TILE + 4 + 10, 170 + 10] == [10, 0, 0]).all()
    empty = Grid("t", "x", "y", ["1"], ["r"], [[None]]).image()
    assert empty.width == 170 + TILE + 4


@pytest.mark.parametrize("size, expected", [(64, 64), (512, 128), (200, 128)])
def test_kept_evaluation_images_are_scaled_to_128_px(tmp_path, size, expected):
    from sweeps.eval_images import eval_steps, read_eval_images, save_eval_images, thumbnails

    images = np.zeros((5, size, size, 3), dtype=np.uint8)
    images[..., 1] = (np.arange(5) * 40)[:, None, None]
    assert thumbnails(images).shape == (5, expected, expected, 3)
    for step in (200, 100):
        save_eval_images(str(tmp_path), "t1", step, images)
    assert eval_steps(str(tmp_path), "t1") == [100, 200] and eval_steps(str(tmp_path), "other") == []
    back = read_eval_images(str(tmp_path), "t1", 100, 5)
    assert back.shape == (5, expected, expected, 3)
    assert np.abs(back[:, 8:-8, 8:-8, 1].astype(int).mean(axis=(1, 2)) - np.arange(5) * 40).max() < 3
