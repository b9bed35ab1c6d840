"""Bad input through `sweeps/run.py`: each is refused before any training, with exit status 2,
no traceback, and the culprit (YAML key, file, line) named."""

import subprocess
import sys
from pathlib import Path

import pytest
import ray
from PIL import Image

from sweeps import tuner
from sweeps.run import main

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo.yaml"


def _kohya(tmp_path, folder="5_lswsks shape", bad_image=False) -> Path:
    root = tmp_path / "data"
    sub = root / folder
    sub.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (0, 200, 200)).save(sub / f"{i}.png")
    if bad_image:
        (sub / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def _imagefolder(tmp_path, lines: str) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    Image.new("RGB", (64, 64)).save(root / "a.png")
    (root / "metadata.jsonl").write_text(lines)
    return root


def _spec_file(tmp_path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text.replace("suites/demo.yaml", str(ROOT / "examples" / "suites" / "demo.yaml")))
    return path


DEMO_TEXT = DEMO.read_text()
# An inline suite (a --set value) with one more key; its relative init images are relative to the spec file.
_INLINE = "eval.suite={{natural: ['a {{trigger}} circle'], no_concept: ['a red circle'], {}}}"
# (id, spec text or None for the demo, --set overrides, a dataset builder, words the error must hold)
CASES = [
    ("inverted range", None, ["space.learning_rate={type: loguniform, low: 1e-2, high: 1e-4}"], None,
     ["space.learning_rate.low: must be < high"]),
    ("zero batch size", None, ["train.train_batch_size=0"], None,
     ["train.train_batch_size: Input should be greater than or equal to 1"]),
    ("negative eval interval", None, ["eval.interval=-5"], None, ["eval.interval", "greater than or equal to 1"]),
    ("unknown lr scheduler", None, ["space.lr_scheduler={type: choice, values: [constant, warmup_bogus]}"], None,
     ["space.lr_scheduler: value 'warmup_bogus' is invalid"]),
    ("unknown metric", None, ["objective={metric: clipscore, mode: max}"], None,
     ["objective.metric: unknown metric 'clipscore'"]),
    ("unknown pruner option", None, ["pruner={type: median, options: {n_startup: 2}}"], None,
     ["pruner.options.n_startup: unknown option of optuna.pruners.MedianPruner"]),
    ("unknown key", DEMO_TEXT + "lr: 0.001\n", [], None, ["lr: unknown key"]),
    ("clip skip beyond the text encoder", None, ["train.clip_skip=6"], None,
     ["train.clip_skip: 6 exceeds the base model's text encoder, which has 4 layers"]),
    ("kohya folder without the N_ prefix", None, [], lambda t: _kohya(t, folder="lswsks shape"),
     ["dataset:", "lswsks shape", "<repeats>_"]),
    ("corrupt image", None, [], lambda t: _kohya(t, bad_image=True), ["dataset:", "broken.png"]),
    ("empty caption", None, [], lambda t: _imagefolder(t, '{"file_name": "a.png", "text": "  "}\n'),
     ["dataset:", "caption of 'a.png' is empty"]),
    ("empty metadata.jsonl", None, [], lambda t: _imagefolder(t, ""), ["dataset:", "metadata.jsonl"]),
    ("tabs in YAML", DEMO_TEXT.replace("  resolution: 64", "\tresolution: 64"), [], None,
     ["spec.yaml:16:", "replace the tabs"]),
    ("duplicate keys", DEMO_TEXT.replace("storage: runs\n", "storage: runs\nname: other\n"), [], None,
     ["spec.yaml:11:", "duplicate key 'name'"]),
    ("unwritable storage", None, ["storage=/proc/lorasweep"], None, ["/proc/lorasweep", "not writable"]),
    ("too many GPUs", None, ["resources.gpus_per_trial=64"], None,
     ["resources.gpus_per_trial: 64 GPU(s) per trial, but this machine has"]),
    ("missing suite file", None, ["eval.suite=/nonexistent/suite.yaml"], None,
     ["eval.suite", "/nonexistent/suite.yaml", "not found"]),
    ("missing base model", None, ["base_model=/nonexistent/model"], None, ["base_model:", "/nonexistent/model"]),
    ("unknown hub model", None, ["base_model=nobody-xyz/no-such-model"], None,
     ["base_model:", "nobody-xyz/no-such-model", "local copy"]),
    ("missing dataset", None, ["dataset=/nonexistent/data"], None, ["dataset:", "/nonexistent/data", "does not exist"]),
    ("set without a value", None, ["search.num_trials"], None, ["--set", "expected key=value"]),
    ("field in train and space", None, ["train.rank=4"], None, ["train.rank: also searched (space.rank)"]),
    ("too many CPUs", None, ["resources.cpus_per_trial=4096"], None,
     ["resources.cpus_per_trial: 4096 CPUs per trial, but this machine has"]),
    ("invalid choice value", None, ["space.rank={type: choice, values: [0, 4]}"], None, ["space.rank: value 0 is invalid"]),
    ("missing DINO judge", None, ["evaluator.dino=/nonexistent/dino-vits16"], None,
     ["evaluator.dino: /nonexistent/dino-vits16: not found", "save_pretrained"]),
    ("missing aesthetic head", None, ["evaluator.aesthetic=/nonexistent/sac+logos+ava1-l14-linearMSE.pth"], None,
     ["evaluator.aesthetic: /nonexistent/sac+logos+ava1-l14-linearMSE.pth: not found", ".pth or .safetensors"]),
    ("objective from an unconfigured judge", None, ["objective={metric: dino_i, mode: max}"], None,
     ["objective.metric: 'dino_i' comes from an optional judge that is not configured; set evaluator.dino"]),
    ("missing init image", None, [_INLINE.format("img2img: [{prompt: 'a {trigger} square', init_image: pics/missing.png, "
                                                 "strengths: [0.65]}]")], None,
     ["eval.suite: img2img[0].init_image:", str(ROOT / "examples" / "pics" / "missing.png"), "does not exist"]),
    ("img2img strength above 1", None, [_INLINE.format("img2img: [{prompt: 'a {trigger} square', init_image: x.png, "
                                                       "strengths: [0.65, 1.2]}]")], None,
     ["eval.suite: eval.suite: img2img.0.strengths: strength 1.2 is outside (0, 1]"]),
    ("img2img strength that leaves no step", None, [_INLINE.format("img2img: [{prompt: 'a {trigger} square', "
                                                                   "init_image: x.png, strengths: [0.05]}]")], None,
     ["eval.suite: img2img[0].strengths: 0.05 x train.sampling.steps 12 leaves no denoising step; "
      "raise the strength to at least 0.0833"]),
    ("guidance scale 0", None, [_INLINE.format("guidance_scales: [7.5, 0]")], None,
     ["eval.suite: eval.suite: guidance_scales: guidance scale 0.0 must be a finite number > 0"]),
    ("LoRA strength outside (0, 1]", None, ["eval.lora_scales=[0.85, 1.5]"], None,
     ["eval.lora_scales: LoRA strength 1.5 is outside (0, 1]"]),
    ("LoRA strengths of a full fine-tune", None, ["eval.lora_scales=[0.6, 1.0]", "train.method=full"], None,
     ["eval.lora_scales: train.method is full, and a full fine-tune has no LoRA strength to vary"]),
    ("LoRA strengths where the method is searched", None,
     ["eval.lora_scales=[0.6, 1.0]", "space.method={type: choice, values: [lora, full]}"], None,
     ["eval.lora_scales: space.method searches full, and a full fine-tune has no LoRA strength to vary"]),
    ("objective at an unconfigured LoRA strength", None, ["eval.lora_scales=[0.6, 1.0]",
                                                          "objective={metric: objective@lora_scale=0.85, mode: max}"], None,
     ["objective.metric: 'objective@lora_scale=0.85': 0.85 is not one of eval.lora_scales (trials report "
      "objective@lora_scale=0.6, objective@lora_scale=1)"]),
    ("objective per guidance scale without guidance scales", None, ["objective={metric: objective@guidance=7.5, mode: max}"],
     None, ["objective.metric: 'objective@guidance=7.5': 7.5 is not one of the suite's guidance_scales (trials report "
            "none: set the suite's guidance_scales)"]),
    ("img2img metric without img2img items", None, ["objective={metric: img2img_clip_score, mode: max}"], None,
     ["objective.metric: 'img2img_clip_score' scores the suite's img2img items, and it has none"]),
    ("export at the best strength without strengths", None, ["export.scale=best"], None,
     ["export.scale: best is the best of eval.lora_scales, which is not set"]),
]


@pytest.mark.parametrize("name, text, sets, dataset, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_the_culprit_named(tmp_path, capsys, monkeypatch, name, text, sets, dataset, words):
    def refuse(*args, **kwargs):
        raise AssertionError("a bad input reached Ray")

    # The session's Ray may be running already (ensure_ray would then return early): what counts
    # is that main() tries to start or join none.
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(tuner, "ensure_ray", refuse)
    spec = _spec_file(tmp_path, text) if text is not None else DEMO
    sets = [f"storage={tmp_path / 'runs'}", *sets] if not any(s.startswith("storage=") for s in sets) else sets
    if dataset is not None:
        sets.append(f"dataset={dataset(tmp_path)}")
    rc = main(["--space", str(spec), *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "runs" / "demo" / "tune").exists()  # nothing started


def test_the_real_entry_point_exits_2_without_a_traceback(tmp_path):
    spec = _spec_file(tmp_path, DEMO_TEXT.replace("storage: runs\n", "storage: runs\nname: again\n"))
    proc = subprocess.run([sys.executable, str(ROOT / "sweeps" / "run.py"), "--space", str(spec)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "duplicate key 'name'" in proc.stderr
