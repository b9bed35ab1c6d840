"""Dataset layouts (kohya, imagefolder + metadata.jsonl, DreamBooth), their detection and errors,
and TrainData as load_train_data builds it."""

import json

import pytest
from builders import data_cfg, img
from PIL import Image

from toyworld.lora_task import TRIGGER as DEMO_TRIGGER
from trainer.dataset_layouts import DatasetError, detect_dataset_type, load_imagefolder, load_kohya_folder
from trainer.train_data import ensure_demo_dataset, load_train_data


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


def test_imagefolder_metadata_jsonl(tmp_path):
    img(tmp_path / "a.png")
    img(tmp_path / "sub" / "b.jpg")
    rows = [{"file_name": "a.png", "text": "a red square"}, {"file_name": "sub/b.jpg", "text": "another"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert detect_dataset_type(tmp_path) == "imagefolder"
    examples = load_imagefolder(tmp_path, num_repeats=2)
    assert sorted({(e.image_path.name, e.caption) for e in examples}) == [("a.png", "a red square"), ("b.jpg", "another")]
    assert len(examples) == 4
    cfg = data_cfg(tmp_path)
    data = load_train_data(cfg)
    assert data.kind == "imagefolder" and data.target_sizes(cfg)[tmp_path / "a.png"] == (64, 64)


def test_imagefolder_errors_and_skip(tmp_path):
    with pytest.raises(DatasetError, match="metadata.jsonl does not exist"):
        load_imagefolder(tmp_path)
    img(tmp_path / "a.png")
    img(tmp_path / "uncaptioned.png")
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


def test_dreambooth_folder_and_detection(tmp_path):
    img(tmp_path / "inst" / "1.png")
    img(tmp_path / "inst" / "2.png")
    assert detect_dataset_type(tmp_path / "inst") == "dreambooth"
    with pytest.raises(DatasetError, match="set instance_prompt"):
        load_train_data(data_cfg(tmp_path / "inst"))
    data = load_train_data(data_cfg(tmp_path / "inst", instance_prompt="a photo of sks dog", num_repeats=3))
    assert data.kind == "dreambooth" and len(data.examples) == 6
    assert {e.caption for e in data.examples} == {"a photo of sks dog"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no metadata.jsonl, no kohya"):
        detect_dataset_type(tmp_path / "empty")
    with pytest.raises(DatasetError, match="does not exist"):
        detect_dataset_type(tmp_path / "nope")


def test_kohya_repeats_override(tmp_path):
    img(tmp_path / "10_sks dog" / "a.png")
    assert len(load_kohya_folder(tmp_path)) == 10
    assert len(load_kohya_folder(tmp_path, num_repeats=2)) == 2


@pytest.mark.parametrize("layout", ["kohya", "imagefolder", "dreambooth"])
def test_listing_without_verifying_opens_no_image(tmp_path, layout):
    """verify=False (dry-run counting) yields the same examples as a checked read, from files
    that are not images at all, and refuses to give target sizes it never measured."""
    root = tmp_path / "d"
    over = {}
    if layout == "kohya":
        folder = root / "4_sks dog"
    elif layout == "imagefolder":
        folder = root
    else:
        folder, over = root, {"instance_prompt": "a photo of sks dog"}
    folder.mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(b"not an image")
    if layout == "imagefolder":
        (root / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{"file_name": "b.png", "text": "y"}\n')
    cfg = data_cfg(root, **over)
    listed = load_train_data(cfg, verify=False)
    assert len(listed.examples) == (8 if layout == "kohya" else 2) and listed.kind == layout
    with pytest.raises(DatasetError, match="without checking its images"):
        listed.target_sizes(cfg)
    with pytest.raises(DatasetError, match="cannot read image"):
        load_train_data(cfg)
