"""`python -m trainer`: trains, checkpoints and exports one LoRA; bad configs exit 2 naming fields."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from trainer.__main__ import ConfigProblems, read_run_config
from trainer.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "train.yaml"


def _run(*args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_shipped_example_config_is_valid():
    cfg, options, caption = read_run_config(str(EXAMPLE), [], None, None)
    assert cfg.base_model == "builtin:tiny-sd" and cfg.dataset == "builtin:demo" and caption is None
    assert options.format == "kohya" and options.name


def test_set_overrides_by_dotted_path(tmp_path):
    cfg, options, _ = read_run_config(
        str(EXAMPLE), ["sampling.steps=3", "rank=8", "output.name=x", "trigger_word=null"], str(tmp_path), "both"
    )
    assert cfg.sampling.steps == 3 and cfg.rank == 8 and cfg.trigger_word is None
    assert options.name == "x" and options.dir == str(tmp_path) and options.format == "both"


def test_cli_trains_checkpoints_and_exports_loadable_lora(tmp_path, tiny_sd_dir, demo_dataset):
    interval = {"checkpoint_interval": 1} if "checkpoint_interval" in TrainConfig.model_fields else {}
    sets = [f"{k}={v}" for k, v in dict(max_train_steps=2, train_batch_size=1, lr_warmup_steps=0, **interval).items()]
    proc = _run("--config", str(EXAMPLE), "--output", str(tmp_path / "out"), "--format", "both",
                *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    kohya = Path(lines[-1])
    assert kohya == tmp_path / "out" / "lswsks_circle.safetensors" and kohya.is_file()
    diffusers_file = tmp_path / "out" / "diffusers" / "pytorch_lora_weights.safetensors"
    assert str(diffusers_file) in lines and diffusers_file.is_file()
    assert "step" in proc.stderr, "a progress bar goes to stderr"
    assert (tmp_path / "out" / "checkpoints" / "step-2" / "trainer_state.json").is_file()
    if interval:
        assert (tmp_path / "out" / "checkpoints" / "step-1" / "trainer_state.json").is_file()
    with safe_open(str(kohya), "pt") as f:
        meta = f.metadata()
    assert meta["ss_output_name"] == "lswsks_circle" and meta["ss_steps"] == "2"

    from trainer.model_loading import load_sd_components

    for path in (kohya, diffusers_file):
        comps = load_sd_components(tiny_sd_dir)
        pipe = comps.to_pipeline()
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        assert any("lora_B" in n for n, _ in comps.unet.named_parameters()), path
        assert any(p.abs().sum() > 0 for n, p in comps.unet.named_parameters() if "lora_B" in n), path
    torch.set_num_threads(2)


def test_bad_config_exits_2_naming_every_field(tmp_path):
    bad = yaml.safe_load(EXAMPLE.read_text())
    bad.update(rank=0, bogus_key=1)
    bad["output"]["format"] = "zip"
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(bad))
    proc = _run("--config", str(config), "--set", "learning_rate=-1", "--set", "sampling.steps=0", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    for field in ("rank:", "bogus_key: unknown key", "output.format:", "learning_rate:", "sampling.steps:"):
        assert field in err, f"{field!r} missing from:\n{err}"
    assert proc.stdout == "" and not (tmp_path / bad["output"]["dir"]).exists(), "nothing ran"


def test_unreadable_config_and_bad_set_are_reported(tmp_path):
    with pytest.raises(ConfigProblems, match="missing.yaml: file not found"):
        read_run_config(str(tmp_path / "missing.yaml"), [], None, None)
    (tmp_path / "broken.yaml").write_text("rank: [1,\n")
    with pytest.raises(ConfigProblems, match="not valid YAML"):
        read_run_config(str(tmp_path / "broken.yaml"), [], None, None)
    with pytest.raises(ConfigProblems) as err:
        read_run_config(str(EXAMPLE), ["no_equals_sign", "rank=0"], None, None)
    assert any("expected key=value" in p for p in err.value.problems)
    assert any(p.startswith("rank:") for p in err.value.problems)


def test_missing_dataset_and_model_exit_2_naming_both(tmp_path):
    proc = _run("--config", str(EXAMPLE), "--set", f"dataset={tmp_path / 'nowhere'}",
                "--set", f"base_model={tmp_path / 'missing.safetensors'}", "--output", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "dataset:" in proc.stderr and "nowhere" in proc.stderr
    assert "base_model:" in proc.stderr and "missing.safetensors" in proc.stderr
    assert not (tmp_path / "o").exists(), "nothing is written before the config is known to be good"


def test_resume_picks_the_latest_complete_checkpoint(tmp_path):
    from trainer.__main__ import latest_checkpoint

    for step, complete in ((2, True), (10, True), (12, False)):
        folder = tmp_path / f"step-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-10"
    assert latest_checkpoint(tmp_path / "none") is None


def test_describe_fields_lists_every_field_with_type_default_and_description():
    from trainer.config import ClassSamplingConfig, SamplingConfig, describe_fields

    text = describe_fields(TrainConfig)
    rows = {line.split()[0]: line for line in text.splitlines()[1:]}
    top = {n for n, f in TrainConfig.model_fields.items() if n not in ("sampling", "class_sampling")}
    nested = ({f"sampling.{n}" for n in SamplingConfig.model_fields}
              | {f"class_sampling.{n}" for n in ClassSamplingConfig.model_fields})
    assert set(rows) == top | nested, "every field, nested ones as <section>.<name>"
    assert rows["class_sampling.steps"].split()[1:3] == ["int", "50"]
    assert rows["rank"].split()[1:3] == ["int", "4"] and "LoRA rank" in rows["rank"]
    assert rows["base_model"].split()[2] == "(required)"
    assert "int | None" in rows["num_repeats"] and "fail|skip" in rows["on_bad_image"]
    assert rows["sampling.steps"].split()[1:3] == ["int", "8"] and "Denoising steps" in rows["sampling.steps"]


def test_cli_lists_fields_and_help_points_there():
    fields = _run("--fields")
    assert fields.returncode == 0 and "sampling.guidance_scale" in fields.stdout and "learning_rate" in fields.stdout
    assert "--fields" in _run("--help").stdout
