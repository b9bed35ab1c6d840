"""W&B tracking in offline mode: runs per trial inside the sweep folder, metrics, image grids, the winner artifact,
and an API key that never reaches a file."""

import glob
import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from sweeps.spec import load_spec
from sweeps.tracking import read_history, read_records, sync_command, trial_settings, wandb_mode

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo.yaml"


def test_mode_is_offline_unless_spec_says_online_and_a_key_is_set(monkeypatch, tmp_path):
    online = load_spec(DEMO, ["tracking.wandb.enabled=true", "tracking.wandb.mode=online", f"storage={tmp_path}"])
    offline = load_spec(DEMO, ["tracking.wandb.enabled=true", f"storage={tmp_path}"])
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode(online) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode(online) == "online" and wandb_mode(offline) == "offline"
    settings = trial_settings(online)
    assert settings["dir"] == str(tmp_path / "demo" / "wandb") and settings["group"] == "demo"
    assert "k" * 40 not in repr(settings)  # the key travels in the environment only
    assert trial_settings(load_spec(DEMO)) is None  # tracking off by default
    assert sync_command(offline) is None  # no offline runs yet


def test_reading_a_file_that_is_not_a_run_fails_clearly(tmp_path):
    bad = tmp_path / "run-x.wandb"
    bad.write_bytes(b"not a run")
    with pytest.raises(ValueError, match="not a W&B run file"):
        read_records(bad)


@pytest.mark.slow
def test_offline_sweep_logs_metrics_images_and_artifact_without_the_key(tmp_path):
    key = "lsk" + secrets.token_hex(20)
    env = {**os.environ, "WANDB_API_KEY": key, "WANDB_MODE": "offline"}
    cmd = [sys.executable, str(ROOT / "sweeps" / "run.py"), "--space", str(DEMO), "--set", f"storage={tmp_path}",
           "--set", "search.num_trials=2", "--set", "train.max_train_steps=4", "--set", "eval.interval=2",
           "--set", "tracking.wandb.enabled=true"]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=480, env=env)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep = tmp_path / "demo"
    runs = sorted(glob.glob(str(sweep / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb")))
    trial_runs, export_runs = [], []
    for path in runs:
        run = next(r.run for r in read_records(path) if r.WhichOneof("record_type") == "run")
        assert run.run_group == "demo"
        (trial_runs if run.job_type == "trial" else export_runs).append((path, run))
    assert len(trial_runs) == 2 and len(export_runs) == 1
    for path, run in trial_runs:
        config = {item.key for item in run.config.update}
        assert {"learning_rate", "rank"} <= config
        rows = read_history(path)
        assert [r["step"] for r in rows] == [2, 4]
        for row in rows:
            # The toy world's oracle metrics go to W&B beside the CLIP ones, the distribution metrics too.
            assert {"clip_score", "objective", "concept_accuracy", "prior_accuracy", "loss", "lr"} <= set(row)
            assert {"cmmd", "clip_fd", "clip_kid", "diversity", "val_loss", "heldout_score"} <= set(row)
            # One labelled grid per evaluation: the demo suite's 10 distinct prompts as rows, its 4 seeds as
            # columns, 128 px cells beside the prompts' labels.
            assert row["eval_grid/_type"] == "image-file" and row["eval_grid/caption"] == f"step {row['step']}"
            with Image.open(Path(path).parent / "files" / row["eval_grid/path"]) as grid:
                assert grid.size == (row["eval_grid/width"], row["eval_grid/height"])
                assert 4 * 128 < grid.width < 5 * 128 + 170 and 10 * 128 < grid.height < 11 * 128
    summary = export_runs[0][0]
    assert export_runs[0][1].job_type == "summary"
    artifacts = {r.artifact.type: r.artifact for r in read_records(summary) if r.WhichOneof("record_type") == "artifact"}
    model, report = artifacts["model"], artifacts["report"]
    assert model.name == "lora-demo" and {"best", "demo"} <= set(model.aliases)
    assert {"export/manifest.json", "export/rank1/lora_kohya.safetensors"} <= {m.path for m in model.manifest.contents}
    assert report.name == "report-demo" and {"index.html", "xyz/seeds.png"} <= {m.path for m in report.manifest.contents}
    # The trials as a wandb.Table, parameter importance as a table and a bar chart.
    (logged,) = read_history(summary)
    assert logged["trials/_type"] == "table-file" and logged["trials/nrows"] == 2
    table = json.loads((Path(summary).parent / "files" / logged["trials/path"]).read_text())
    assert table["columns"][:4] == ["trial", "learning_rate", "lr_scheduler", "rank"] and "objective" in table["columns"]
    assert logged["importance/objective/_type"] == "table-file"
    # The bill's two columns, then each real trial's start-up seconds.
    assert table["columns"][-3:] == ["CPU h", "steps not run", "start-up s"]
    # The bill in the summary, the same figures as best.json's.
    summary_values = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                      for r in read_records(summary) if r.WhichOneof("record_type") == "summary" for item in r.summary.update}
    bill = json.loads((sweep / "best.json").read_text())["bill"]
    assert bill["steps_run"] == 8 and bill["unit"] == "CPU"  # 2 trials x 4 steps, none pruned
    for figure in ("trial_hours", "steps_run", "steps_not_run", "pruning_saved_hours"):  # (`key` is the W&B key)
        assert summary_values[f"bill/{figure}"] == pytest.approx(bill[figure]), figure
    assert summary_values["bill/measured_over_estimate"] == pytest.approx(bill["estimate_vs_measured"]["ratio"])
    assert "importance/objective_chart_table/_type" in logged
    # The key appears in no file of the sweep, and the driver says how to upload the offline runs.
    session = re.search(r"(/tmp/ray/session_[^/\s]+)", proc.stdout + proc.stderr)
    folders = [sweep] + ([Path(session.group(1))] if session else [])
    for f in (f for folder in folders for f in folder.rglob("*")):
        if f.is_file() and not f.is_symlink():
            assert key.encode() not in f.read_bytes(), f
    assert f"wandb sync {sweep / 'wandb' / 'wandb'}/offline-run-*" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == f"best LoRA: {sweep / 'best.safetensors'}"
    assert elapsed < 420  # ends promptly: no image upload wait at the end of fit()
