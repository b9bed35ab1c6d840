"""Prior-preservation class images on the tiny SD: a missing, empty or short class folder is
filled by the base model with the regularisation settings (`class_sampling`), once, and kept."""

import io

import numpy as np
import pytest
import yaml
from builders import img
from PIL import Image

from trainer.__main__ import main
from trainer.class_images import class_dir_problems, ensure_class_images, next_class_indices, render_class_images
from trainer.config import SamplingConfig, build_train_config
from trainer.dataset_layouts import DatasetError
from trainer.model_loading import load_sd_components
from trainer.preparation import prepare
from trainer.sampling import sample_images

CLASS_STEPS = {"steps": 2, "sampler": "ddim", "guidance_scale": 7.5}


def _instance(root, n=2):
    for i in range(n):
        img(root / f"dog_{i}.png", (64, 64), (30 * i, 160, 90))
    return root


def _cfg(tiny_sd_dir, tmp_path, **over):
    values = dict(base_model=str(tiny_sd_dir), dataset=str(_instance(tmp_path / "instance")), resolution=64,
                  instance_prompt="a photo of sks dog", with_prior_preservation=True, class_prompt="a photo of a dog",
                  class_data_dir=str(tmp_path / "class"), num_class_images=3, cache_dir=str(tmp_path / "cache"),
                  class_sampling=CLASS_STEPS, max_train_steps=1)
    return build_train_config({**values, **over})


@pytest.mark.parametrize("state", ["missing", "empty", "short"])
def test_prepare_fills_a_missing_empty_or_short_class_folder(tiny_sd_dir, tmp_path, state):
    folder = tmp_path / "class"
    if state != "missing":
        folder.mkdir()
    if state == "short":
        mine = img(folder / "mine.jpg", (64, 64), (10, 10, 200))
        before = mine.read_bytes()
    cfg = _cfg(tiny_sd_dir, tmp_path)
    data = prepare(cfg, device="cpu").data
    made = sorted(p.name for p in folder.glob("class_*.png"))
    assert made == [f"class_{i:05d}.png" for i in range(2 if state == "short" else 3)]
    assert len(data.class_examples) == 3 and {e.image_path.parent for e in data.class_examples} == {folder}
    assert {e.caption for e in data.class_examples} == {"a photo of a dog"}
    if state == "short":
        assert mine.read_bytes() == before, "the user's own class image is kept as it is"
    stamps = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    prepare(cfg, device="cpu")
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps, "a full folder is reused, never regenerated"


def test_class_images_use_class_sampling_not_the_evaluation_sampling(tiny_sd_dir, tmp_path):
    cfg = _cfg(tiny_sd_dir, tmp_path, sampling={"steps": 6, "sampler": "euler", "guidance_scale": 2.0})
    models = load_sd_components(cfg.base_model)
    (name, png), = render_class_images(models, cfg, [4])
    got = np.asarray(Image.open(io.BytesIO(png)))
    seed = cfg.seed * 1_000_003 + 4
    want = sample_images(models, [cfg.class_prompt], [seed], 1, 64, SamplingConfig(**CLASS_STEPS))[0]
    evaluation = sample_images(models, [cfg.class_prompt], [seed], 1, 64, cfg.sampling)[0]
    assert name == "class_00004.png"
    assert np.array_equal(got, want)
    assert not np.array_equal(got, evaluation)


def test_the_defaults_are_regularisation_settings():
    cfg = build_train_config({"base_model": "builtin:tiny-sd", "dataset": "d"})
    assert (cfg.class_sampling.steps, cfg.class_sampling.guidance_scale, cfg.class_sampling.sampler) == (50, 7.5, "pndm")
    assert cfg.sampling.steps < cfg.class_sampling.steps


def test_a_topped_up_folder_holds_the_images_of_one_made_at_once(tiny_sd_dir, tmp_path):
    models = load_sd_components(str(tiny_sd_dir))
    once = _cfg(tiny_sd_dir, tmp_path, class_data_dir=str(tmp_path / "once"))
    ensure_class_images(once, models)
    in_two = _cfg(tiny_sd_dir, tmp_path, class_data_dir=str(tmp_path / "two"), num_class_images=1)
    assert ensure_class_images(in_two, models) == 1
    assert next_class_indices(once.model_copy(update={"class_data_dir": str(tmp_path / "two")})) == [1, 2]
    assert ensure_class_images(in_two.model_copy(update={"num_class_images": 3}), models) == 2
    for i in range(3):
        name = f"class_{i:05d}.png"
        once_px, two_px = (np.asarray(Image.open(tmp_path / d / name), dtype=int) for d in ("once", "two"))
        # the same seed gives the same image; a batch of 3 and one of 1 differ only in float rounding
        assert np.abs(once_px - two_px).max() <= 2


def test_a_broken_instance_image_is_refused_before_any_class_image_is_made(tiny_sd_dir, tmp_path):
    cfg = _cfg(tiny_sd_dir, tmp_path)
    (tmp_path / "instance" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    with pytest.raises(DatasetError, match="broken.png"):
        prepare(cfg, device="cpu")
    assert not (tmp_path / "class").exists(), "no class image was made"


def test_class_folder_problems_are_found_before_any_model_loads(tmp_path):
    (tmp_path / "afile").write_text("x")
    as_file = build_train_config(dict(base_model="builtin:tiny-sd", dataset="d", with_prior_preservation=True,
                                      class_prompt="a dog", class_data_dir=str(tmp_path / "afile")))
    assert class_dir_problems(as_file) == [f"{tmp_path / 'afile'} is a file, not a folder; point class_data_dir "
                                           "at a folder (it may be missing or empty)"]
    unwritable = as_file.model_copy(update={"class_data_dir": "/proc/lorasweep-class"})
    (problem,) = class_dir_problems(unwritable)
    assert problem.startswith("100 class images are missing and /proc/lorasweep-class is not writable")
    fine = as_file.model_copy(update={"class_data_dir": str(tmp_path / "new" / "class")})
    assert class_dir_problems(fine) == []


def _write_config(tmp_path, tiny_sd_dir, **over) -> str:
    values = dict(base_model=str(tiny_sd_dir), dataset=str(_instance(tmp_path / "instance")), resolution=64,
                  instance_prompt="a photo of sks dog", with_prior_preservation=True, class_prompt="a photo of a dog",
                  class_data_dir=str(tmp_path / "class"), num_class_images=2, class_sampling=CLASS_STEPS,
                  max_train_steps=1, cache_dir=str(tmp_path / "cache"),
                  output={"dir": str(tmp_path / "out")})
    values.update(over)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.mark.slow  # trains and exports a LoRA
def test_trainer_cli_generates_the_class_images_of_a_new_folder(tmp_path, tiny_sd_dir):
    assert main(["--config", _write_config(tmp_path, tiny_sd_dir)]) == 0
    assert sorted(p.name for p in (tmp_path / "class").iterdir() if p.suffix == ".png") == [
        "class_00000.png", "class_00001.png"]
    assert (tmp_path / "out" / "lora.safetensors").is_file()


def test_trainer_cli_refuses_a_bad_class_folder_or_class_sampling(tmp_path, tiny_sd_dir, capsys):
    (tmp_path / "afile").write_text("x")
    config = _write_config(tmp_path, tiny_sd_dir, class_data_dir=str(tmp_path / "afile"))
    assert main(["--config", config, "--set", "class_sampling.steps=0"]) == 2
    err = capsys.readouterr().err
    assert "class_sampling.steps: Input should be greater than or equal to 1" in err
    assert main(["--config", config]) == 2
    assert f"class_data_dir: {tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err
