import numpy as np
import pytest
from PIL import Image

from trainer.data import DEMO_TRIGGER, DatasetError, EpochSampler, ensure_demo_dataset, load_image, load_kohya_folder


def test_demo_dataset_is_kohya_layout_with_trigger(tmp_path):
    root = ensure_demo_dataset(tmp_path / "demo")
    subdirs = [d.name for d in root.iterdir() if d.is_dir()]
    assert subdirs == [f"10_{DEMO_TRIGGER} circle"]
    images = sorted((root / subdirs[0]).glob("*.png"))
    assert 8 <= len(images) <= 16
    for im in images:
        assert im.with_suffix(".txt").read_text().startswith(DEMO_TRIGGER)
    examples = load_kohya_folder(root)
    assert len(examples) == 10 * len(images), "each image repeated as the folder prefix says"


def test_missing_caption_falls_back_to_class_tokens(tmp_path):
    sub = tmp_path / "3_sks dog"
    sub.mkdir()
    Image.new("RGB", (16, 16)).save(sub / "a.png")
    Image.new("RGB", (16, 16)).save(sub / "b.jpg")
    (sub / "b.caption").write_text("sks dog on grass")
    captions = sorted({e.caption for e in load_kohya_folder(tmp_path)})
    assert captions == ["sks dog", "sks dog on grass"]


def test_dataset_errors_name_path_and_fix(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_kohya_folder(tmp_path / "missing")
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match="10_mytrigger myclass"):
        load_kohya_folder(tmp_path)
    (tmp_path / "5_x y").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        load_kohya_folder(tmp_path)
    bad = tmp_path / "5_x y" / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot read image .*bad.png"):
        load_image(bad, 64, True, False, np.random.default_rng(0))


def test_load_image_crops_and_scales(tmp_path):
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, :40] = 255
    Image.fromarray(arr).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", 32, True, False, np.random.default_rng(0))
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    flipped = load_image(tmp_path / "wide.png", 32, True, True, np.random.default_rng(0))
    assert np.allclose(flipped.numpy(), x.numpy()[:, :, ::-1])


def test_epoch_sampler_resumes_exactly():
    a = EpochSampler(7, seed=3)
    first = a.next_indices(5)
    state = a.state_dict()
    rest = a.next_indices(12)
    b = EpochSampler(7, seed=3)
    b.load_state_dict(state)
    assert b.next_indices(12) == rest
    assert sorted(first + rest[:2]) == list(range(7)), "an epoch visits every example once"
