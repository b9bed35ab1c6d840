"""`caption:` in a sweep spec: a dataset with images but no captions is captioned once, before any
trial, by a BLIP model (a tiny random one built here); bad caption settings are refused with their
YAML path before Ray or any model starts."""

from pathlib import Path

import pytest
import ray
from PIL import Image

from sweeps import tuner
from sweeps.run import main
from sweeps.spec import SpecError, load_spec
from sweeps.trial_plan import build_plan
from tests.trainer.blip_builders import tiny_blip

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo.yaml"


def _flat(root: Path) -> Path:
    root.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 64), (0, 200, 80 * i)).save(root / f"{i}.png")
    return root


def _sets(tmp_path, *more):
    return [f"storage={tmp_path / 'runs'}", f"dataset={_flat(tmp_path / 'flat')}", f"train.cache_dir={tmp_path / 'cache'}",
            *more]


def test_the_plan_captions_an_uncaptioned_dataset_once(tmp_path, capsys):
    blip = tiny_blip(tmp_path / "blip")
    spec = load_spec(DEMO, _sets(tmp_path, f"caption={{model: {blip}, template: 'photo of {{trigger}}, {{caption}}'}}"))
    plan = build_plan(spec)
    assert "captioned 3 image(s) into metadata.jsonl; 0 kept their caption" in capsys.readouterr().out
    data = plan.prepared.data
    assert data.kind == "imagefolder" and len({e.image_path for e in data.examples}) == 3
    assert all(e.caption.startswith("photo of lswsks,") for e in data.examples)
    meta = tmp_path / "flat" / "metadata.jsonl"
    stamp = meta.stat().st_mtime_ns
    assert build_plan(spec).prepared.data.examples == data.examples
    assert "captioned 0 image(s) into metadata.jsonl; 3 kept their caption" in capsys.readouterr().out
    assert meta.stat().st_mtime_ns == stamp, "a resumed sweep captions nothing again"


@pytest.mark.parametrize("sets, words", [
    (["caption={template: '{trigger} alone'}"], "caption.template: '{trigger} alone' has no {caption}"),
    (["caption={model: x, beams: 4}"], "caption.beams: unknown key"),
    (["caption={batch_size: 0}"], "caption.batch_size: Input should be greater than or equal to 1"),
    (["caption={}", "trigger_word=null"], "trigger_word: required by caption:"),
    (["caption={}", "train.instance_prompt=a sks shape"], "train.instance_prompt: captions replace the instance prompt"),
])
def test_bad_caption_settings_name_their_yaml_path(tmp_path, sets, words):
    with pytest.raises(SpecError) as err:
        load_spec(DEMO, _sets(tmp_path, *sets))
    assert any(words in p for p in err.value.problems), err.value.problems


def test_a_missing_captioning_model_stops_the_sweep_before_ray(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a bad input reached Ray")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(tuner, "ensure_ray", refuse)
    sets = _sets(tmp_path, "caption={model: /nonexistent/blip}")
    assert main(["--space", str(DEMO), *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert "caption.model: /nonexistent/blip: not found; give a local BLIP folder" in err and "Traceback" not in err
    assert not (tmp_path / "flat" / "metadata.jsonl").exists()


def test_the_dry_run_counts_the_images_to_caption(tmp_path):
    from sweeps.dry_run import describe_sweep

    spec = load_spec(DEMO, _sets(tmp_path, "caption={model: /models/blip}"))
    (tmp_path / "flat" / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "mine"}\n')
    text = describe_sweep(spec)
    assert "before the trials: BLIP captions (/models/blip, '{trigger}, {caption}'); 2 image(s) without a caption, " \
           "1 keep theirs" in text
    assert "warning: caption.model: /models/blip: not found" in text
