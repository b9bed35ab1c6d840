import numpy as np
import pytest
from PIL import Image

from toyworld.lora_task import TRIGGER as DEMO_TRIGGER
from trainer.data import DatasetError, EpochSampler, ensure_demo_dataset, load_image, load_kohya_folder


def test_demo_dataset_is_kohya_layout_with_trigger(tmp_path):
    root = ensure_demo_dataset(tmp_path / "demo")
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir())
    # The concept (trigger captions) and known-colour pictures with their own captions beside it.
    assert subdirs == ["2_shape", f"5_{DEMO_TRIGGER} shape"]
    images = sorted((root / subdirs[1]).glob("*.png"))
    known = sorted((root / subdirs[0]).glob("*.png"))
    assert 12 <= len(images) <= 24 and known
    for im in images:
        assert im.with_suffix(".txt").read_text().startswith(f"a {DEMO_TRIGGER} ")
    assert not any(DEMO_TRIGGER in im.with_suffix(".txt").read_text() for im in known)
    examples = load_kohya_folder(root)
    assert len(examples) == 5 * len(images) + 2 * len(known), "each image repeated as the folder prefix says"


def test_missing_caption_falls_back_to_class_tokens(tmp_path):
    sub = tmp_path / "3_sks dog"
    sub.mkdir()
    Image.new("RGB", (16, 16)).save(sub / "a.png")
    Image.new("RGB", (16, 16)).save(sub / "b.jpg")
    (sub / "b.caption").write_text("sks dog on grass")
    Image.new("RGB", (16, 16)).save(sub / "c.png")
    (sub / "c.txt").write_text("  \n\t\n")  # whitespace only: as if missing
    captions = sorted(e.caption for e in load_kohya_folder(tmp_path, num_repeats=1))
    assert captions == ["sks dog", "sks dog", "sks dog on grass"]


def test_empty_imagefolder_caption_is_bad_data(tmp_path):
    from trainer.datasets import load_imagefolder

    for name in ("a.png", "b.png"):
        Image.new("RGB", (16, 16)).save(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a dog"}\n'
                                             '{"file_name": "b.png", "text": "   "}\n')
    with pytest.raises(DatasetError, match=r"metadata.jsonl: the caption of 'b.png' is empty"):
        load_imagefolder(tmp_path)
    assert [e.caption for e in load_imagefolder(tmp_path, on_bad_image="skip")] == ["a dog"]


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


# --- imagefolder, DreamBooth, detection, bad images -------------------------------------------

import json  # noqa: E402

from trainer.buckets import BucketBatchSampler, make_buckets, nearest_bucket  # noqa: E402
from trainer.config import build_train_config  # noqa: E402
from trainer.datasets import detect_dataset_type, load_imagefolder, load_train_data  # noqa: E402


def _img(path, size=(16, 16), color=(200, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _cfg(dataset, **over):
    return build_train_config(dict(base_model="builtin:tiny-sd", dataset=str(dataset), resolution=64, **over))


def test_imagefolder_metadata_jsonl(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "sub" / "b.jpg")
    rows = [{"file_name": "a.png", "text": "a red square"}, {"file_name": "sub/b.jpg", "text": "another"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert detect_dataset_type(tmp_path) == "imagefolder"
    examples = load_imagefolder(tmp_path, num_repeats=2)
    assert sorted({(e.image_path.name, e.caption) for e in examples}) == [("a.png", "a red square"), ("b.jpg", "another")]
    assert len(examples) == 4
    data = load_train_data(_cfg(tmp_path))
    assert data.kind == "imagefolder" and data.target_sizes[tmp_path / "a.png"] == (64, 64)


def test_imagefolder_errors_and_skip(tmp_path):
    with pytest.raises(DatasetError, match="metadata.jsonl does not exist"):
        load_imagefolder(tmp_path)
    _img(tmp_path / "a.png")
    _img(tmp_path / "uncaptioned.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{"file_name": "gone.png", "text": "y"}\n')
    with pytest.raises(DatasetError, match="gone.png.*does not exist.*on_bad_image: skip"):
        load_imagefolder(tmp_path)
    assert [e.image_path.name for e in load_imagefolder(tmp_path, on_bad_image="skip")] == ["a.png"]
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    with pytest.raises(DatasetError, match="uncaptioned.png has no caption"):
        load_imagefolder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(DatasetError, match=r"metadata.jsonl:1: expected a JSON object with file_name and text"):
        load_imagefolder(tmp_path)


def test_corrupt_image_fails_or_is_skipped(tmp_path):
    sub = tmp_path / "2_sks dog"
    _img(sub / "good.png")
    (sub / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DatasetError, match="cannot read image .*broken.png.*on_bad_image: skip"):
        load_train_data(_cfg(tmp_path))
    data = load_train_data(_cfg(tmp_path, on_bad_image="skip"))
    assert [e.image_path.name for e in data.examples] == ["good.png", "good.png"]


def test_dreambooth_folder_and_detection(tmp_path):
    _img(tmp_path / "inst" / "1.png")
    _img(tmp_path / "inst" / "2.png")
    assert detect_dataset_type(tmp_path / "inst") == "dreambooth"
    with pytest.raises(DatasetError, match="set instance_prompt"):
        load_train_data(_cfg(tmp_path / "inst"))
    data = load_train_data(_cfg(tmp_path / "inst", instance_prompt="a photo of sks dog", num_repeats=3))
    assert data.kind == "dreambooth" and len(data.examples) == 6
    assert {e.caption for e in data.examples} == {"a photo of sks dog"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no metadata.jsonl, no kohya"):
        detect_dataset_type(tmp_path / "empty")
    with pytest.raises(DatasetError, match="does not exist"):
        detect_dataset_type(tmp_path / "nope")


def test_kohya_repeats_override(tmp_path):
    _img(tmp_path / "10_sks dog" / "a.png")
    assert len(load_kohya_folder(tmp_path)) == 10
    assert len(load_kohya_folder(tmp_path, num_repeats=2)) == 2


# --- buckets ----------------------------------------------------------------------------------


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


def test_bucket_sampler_batches_within_buckets_and_resumes():
    ids = [0, 1, 0, 2, 1, 0, 0, 1, 2, 0]
    s = BucketBatchSampler(ids, batch_size=2, seed=5)
    epoch = [s.next_batch() for _ in range(s.batches_per_epoch)]
    assert sorted(i for b in epoch for i in b) == list(range(10)), "an epoch visits every example once"
    assert all(len({ids[i] for i in b}) == 1 for b in epoch), "a batch never mixes buckets"
    s.next_batch()
    state = s.state_dict()
    rest = [s.next_batch() for _ in range(9)]
    t = BucketBatchSampler(ids, batch_size=2, seed=5)
    t.load_state_dict(state)
    assert [t.next_batch() for _ in range(9)] == rest
    with pytest.raises(ValueError, match="same data"):
        BucketBatchSampler(ids[:-1], 2, 5).load_state_dict(state)


def test_bucketed_data_and_image_shapes(tmp_path):
    sub = tmp_path / "1_x y"
    _img(sub / "wide.png", (128, 64))
    _img(sub / "tall.png", (64, 128))
    _img(sub / "square.png", (80, 80))
    cfg = _cfg(tmp_path, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)
    data = load_train_data(cfg)
    sizes = {p.name: s for p, s in data.target_sizes.items()}
    assert sizes == {"wide.png": (96, 32), "tall.png": (32, 96), "square.png": (64, 64)}
    x = load_image(sub / "wide.png", sizes["wide.png"], True, False, np.random.default_rng(0))
    assert x.shape == (3, 32, 96)
