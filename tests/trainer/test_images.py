"""Image files: integrity check, aspect-ratio buckets, target sizes, pixels."""

import numpy as np
import pytest
from builders import data_cfg, img
from PIL import Image

from trainer.dataset_layouts import DatasetError
from trainer.images import load_image, make_buckets, nearest_bucket
from trainer.train_data import load_train_data


def test_load_image_crops_and_scales(tmp_path):
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, :40] = 255
    Image.fromarray(arr).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", 32, True, False, np.random.default_rng(0))
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    flipped = load_image(tmp_path / "wide.png", 32, True, True, np.random.default_rng(0))
    assert np.allclose(flipped.numpy(), x.numpy()[:, :, ::-1])


def test_unreadable_image_error_names_it(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot read image .*bad.png"):
        load_image(bad, 64, True, False, np.random.default_rng(0))


def test_corrupt_image_fails_or_is_skipped(tmp_path):
    sub = tmp_path / "2_sks dog"
    img(sub / "good.png")
    (sub / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DatasetError, match="cannot read image .*broken.png.*on_bad_image: skip"):
        load_train_data(data_cfg(tmp_path))
    data = load_train_data(data_cfg(tmp_path, on_bad_image="skip"))
    assert [e.image_path.name for e in data.examples] == ["good.png", "good.png"]


def test_buckets_are_kohya_style():
    buckets = make_buckets(512, 256, 1024, 64)
    assert (512, 512) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024
        assert w * h <= 512 * 512
        assert (h, w) in buckets
    assert nearest_bucket((1920, 1080), buckets) == (640, 384)
    assert nearest_bucket((1080, 1920), buckets) == (384, 640)
    assert nearest_bucket((300, 300), buckets) == (512, 512)


def test_bucketed_data_and_image_shapes(tmp_path):
    sub = tmp_path / "1_x y"
    img(sub / "wide.png", (128, 64))
    img(sub / "tall.png", (64, 128))
    img(sub / "square.png", (80, 80))
    cfg = data_cfg(tmp_path, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)
    data = load_train_data(cfg)
    sizes = {p.name: s for p, s in data.target_sizes(cfg).items()}
    assert sizes == {"wide.png": (96, 32), "tall.png": (32, 96), "square.png": (64, 64)}
    x = load_image(sub / "wide.png", sizes["wide.png"], True, False, np.random.default_rng(0))
    assert x.shape == (3, 32, 96)


def test_target_sizes_follow_the_asking_config_without_opening_images(tmp_path):
    """Data read once answers for another resolution or bucket setting (a searched one) from the
    raw sizes it recorded, even after the files are gone."""
    sub = tmp_path / "1_x y"
    img(sub / "wide.png", (128, 64))
    data = load_train_data(data_cfg(tmp_path))
    assert data.images[sub / "wide.png"].size == (128, 64)
    (sub / "wide.png").unlink()
    assert data.target_sizes(data_cfg(tmp_path, resolution=32)) == {sub / "wide.png": (32, 32)}
    bucketed = data_cfg(tmp_path, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)
    assert data.target_sizes(bucketed) == {sub / "wide.png": (96, 32)}
