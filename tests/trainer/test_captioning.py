"""`python -m trainer caption` and the `caption:` section of a training YAML, on a tiny random BLIP
built here: files, template, skip rules, unreadable images and errors (the captions are nonsense)."""

import json

import pytest
import yaml
from PIL import Image

from tests.trainer.blip_builders import tiny_blip
from trainer.__main__ import ConfigProblems, main, read_run_config
from trainer.captioning import Captioner, apply_template, template_problem
from trainer.config import build_train_config
from trainer.dataset_layouts import detect_dataset_type
from trainer.train_data import load_train_data


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return str(tiny_blip(tmp_path_factory.mktemp("blip") / "tiny-blip"))


@pytest.fixture(scope="module")
def blip(blip_dir):
    return Captioner(blip_dir)


def _png(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 40), color).save(path)
    return path


@pytest.mark.parametrize("template, words", [
    ("{caption}", "has no {trigger}"),
    ("{trigger}", "has no {caption}"),
    ("a photo", "has no {trigger} and no {caption}"),
    ("{trigger}, {style}, {caption}", "unknown field {style}"),
    ("{trigger, {caption}", "is not a valid template"),
    ("{trigger:>9}, {caption}", "without format specs"),
])
def test_bad_templates_are_named(template, words):
    assert words in template_problem(template)


def test_the_template_puts_the_trigger_word_with_the_caption():
    assert template_problem("{trigger}, {caption}") is None
    assert apply_template("{trigger}, {caption}", "nosnjaoutfit", " a girl  on stairs ") == "nosnjaoutfit, a girl on stairs"
    assert apply_template("photo of {trigger}: {caption}", "sks", "a dog") == "photo of sks: a dog"
    assert apply_template("{trigger}, {caption}", "sks", "") == "sks", "an empty BLIP caption leaves the trigger word"


def test_kohya_captions_beside_the_images_skip_rules_and_unreadable_images(tmp_path, blip_dir, blip, capsys):
    sub = tmp_path / "data" / "5_lswsks shape"
    keep, empty, new = (_png(sub / f"{n}.png", c)
                        for n, c in (("keep", (200, 0, 0)), ("empty", (0, 90, 0)), ("new", (0, 0, 250))))
    keep.with_suffix(".txt").write_text("my own caption")
    empty.with_suffix(".txt").write_text("  \n")
    (sub / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    argv = ["caption", str(tmp_path / "data"), "--trigger", "lswsks", "--model", blip_dir, "--batch-size", "2"]
    assert main(argv) == 1, "an unreadable image is reported in the exit status"
    out, err = capsys.readouterr()
    assert f"cannot read image {sub / 'broken.png'}" in err
    assert "captioned 2 image(s) into .txt files; 1 kept their caption; 1 unreadable" in out
    want = {p: "lswsks, " + c for p, c in zip((empty, new), blip.caption([Image.open(empty), Image.open(new)]))}
    assert {p: p.with_suffix(".txt").read_text().strip() for p in want} == want
    assert keep.with_suffix(".txt").read_text() == "my own caption" and not (sub / "broken.txt").exists()

    stamps = {p: p.stat().st_mtime_ns for p in sub.glob("*.txt")}
    (sub / "broken.png").unlink()
    assert main(argv) == 0
    assert "captioned 0 image(s)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in sub.glob("*.txt")} == stamps, "captioned images are never rewritten"
    assert main([*argv, "--overwrite", "--template", "{caption}, {trigger}"]) == 0
    assert keep.with_suffix(".txt").read_text().strip().endswith(", lswsks")


def test_an_imagefolder_keeps_its_lines_and_a_flat_folder_becomes_one(tmp_path, blip_dir):
    root = tmp_path / "imagefolder"
    for name, color in (("a.png", (1, 2, 3)), ("b.png", (90, 0, 0)), ("sub/c.png", (0, 90, 0))):
        _png(root / name, color)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "kept", "source": "mine"}) + "\n"
                                         + json.dumps({"file_name": "b.png", "text": ""}) + "\n")
    template = ["--template", "photo of {trigger}: {caption}"]
    assert main(["caption", str(root), "--trigger", "sks", "--model", blip_dir, *template]) == 0
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert rows[0] == {"file_name": "a.png", "text": "kept", "source": "mine"}
    assert [r["file_name"] for r in rows] == ["a.png", "b.png", "sub/c.png"]
    assert all(r["text"].startswith("photo of sks:") for r in rows[1:])

    flat = tmp_path / "flat"
    for i in range(3):
        _png(flat / f"{i}.jpg", (60 * i, 0, 0))
    assert detect_dataset_type(flat) == "dreambooth"
    assert main(["caption", str(flat), "--trigger", "sks", "--model", blip_dir]) == 0
    data = load_train_data(build_train_config({"base_model": "builtin:tiny-sd", "dataset": str(flat)}))
    assert data.kind == "imagefolder" and len(data.examples) == 3, "the trainer reads the written captions"
    assert all(e.caption.startswith("sks") for e in data.examples)


def test_bad_arguments_are_refused_before_any_model_loads(tmp_path, capsys):
    _png(tmp_path / "data" / "1_x" / "a.png", (0, 0, 0))
    data = str(tmp_path / "data")
    cases = [
        (["--model", "/nonexistent/blip"], "--model: /nonexistent/blip: not found; give a local BLIP folder"),
        (["--model", "nobody-xyz/no-such-blip"], "--model: nobody-xyz/no-such-blip: not in the local Hugging Face cache"),
        (["--template", "{trigger} only"], "--template: '{trigger} only' has no {caption}"),
        (["--batch-size", "0"], "--batch-size: Input should be greater than or equal to 1"),
    ]
    for extra, words in cases:
        assert main(["caption", data, "--trigger", "x", *extra]) == 2
        assert words in capsys.readouterr().err
    assert main(["caption", str(tmp_path / "nope"), "--trigger", "x", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"DATASET: dataset folder {tmp_path / 'nope'} does not exist" in err
    assert f"--model: {tmp_path}: no config.json in the folder" in err


def _train_yaml(tmp_path, **values) -> str:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_training_yaml_caption_section_errors_name_their_keys(tmp_path):
    base = dict(base_model="builtin:tiny-sd", dataset=str(tmp_path), resolution=64)
    with pytest.raises(ConfigProblems) as err:
        read_run_config(_train_yaml(tmp_path, **base, caption={"template": "{trigger}", "beam": 3}), [], None, None)
    assert "caption.template: '{trigger}' has no {caption}; e.g. '{trigger}, {caption}'" in err.value.problems
    assert "caption.beam: unknown key; remove it or check its spelling" in err.value.problems
    with pytest.raises(ConfigProblems) as err:
        read_run_config(_train_yaml(tmp_path, **base, instance_prompt="a sks dog", caption={}), [], None, None)
    assert any(p.startswith("trigger_word: required by caption:") for p in err.value.problems)
    assert any(p.startswith("instance_prompt: captions replace the instance prompt") for p in err.value.problems)


@pytest.mark.slow  # trains and exports a LoRA
def test_python_m_trainer_captions_an_uncaptioned_folder_then_trains_on_it(tmp_path, blip_dir, tiny_sd_dir, capsys):
    flat = tmp_path / "flat"
    for i in range(2):
        _png(flat / f"{i}.png", (0, 100 * i, 200))
    values = dict(base_model=str(tiny_sd_dir), dataset=str(flat), trigger_word="lswsks", resolution=64, max_train_steps=1,
                  cache_dir=str(tmp_path / "cache"), output={"dir": str(tmp_path / "out")})
    assert main(["--config", _train_yaml(tmp_path, **values, caption={"model": "/nonexistent/blip"})]) == 2
    assert "caption.model: /nonexistent/blip: not found" in capsys.readouterr().err
    assert main(["--config", _train_yaml(tmp_path, **values, caption={"model": blip_dir})]) == 0
    assert "captioned 2 image(s) into metadata.jsonl" in capsys.readouterr().err
    assert detect_dataset_type(flat) == "imagefolder" and (tmp_path / "out" / "lora.safetensors").is_file()
