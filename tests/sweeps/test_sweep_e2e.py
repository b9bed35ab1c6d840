"""A real sweep on local Ray with the tiny models: trains, samples, scores, exports the winner."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_sweep_of_three_trials_exports_best(tmp_path):
    cmd = [
        sys.executable, str(ROOT / "sweeps" / "run.py"), "--space", str(ROOT / "examples" / "demo.yaml"),
        "--set", f"storage={tmp_path}", "--set", "search.num_trials=3",
        "--set", "train.max_train_steps=10", "--set", "eval.interval=10",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out_dir = tmp_path / "demo"
    best = out_dir / "best.safetensors"
    info = json.loads((out_dir / "best.json").read_text())
    assert proc.stdout.strip().splitlines()[-1] == f"best LoRA: {best}"
    # best.safetensors is the kohya layout that UIs load; export/ holds both layouts with their sha256.
    with safe_open(str(best), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    # The demo trains a text-encoder LoRA too: its keys are kohya's lora_te_.
    assert info["format"] == "kohya" and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_dim"] == str(info["params"]["rank"])
    manifest = json.loads((out_dir / "export" / "manifest.json").read_text())
    assert manifest["entries"][0]["trial_id"] == info["trial_id"]
    assert manifest["sha256"]["best.safetensors"] == hashlib.sha256(best.read_bytes()).hexdigest()
    with safe_open(str(out_dir / manifest["entries"][0]["files"]["diffusers"]), "pt") as f:
        assert all(k.startswith(("unet.", "text_encoder.")) for k in f.keys())
    assert set(info["params"]) == {"learning_rate", "rank", "lr_scheduler"}
    assert info["objective"]["metric"] == "objective"
    # The toy world's oracle metrics are reported beside the CLIP ones.
    assert 0 <= info["metrics"]["concept_accuracy"] <= 1 and 0 <= info["metrics"]["prior_accuracy"] <= 1
    # So are the concept images' distances to the training images, their diversity, val_loss and the held-out oracle.
    for name in ("cmmd", "clip_fd", "clip_kid", "diversity", "val_loss", "heldout_score"):
        assert isinstance(info["metrics"][name], float), name
    assert info["metrics"]["clip_fd"] >= 0 and 0 <= info["metrics"]["diversity"] <= 2
    # The table lists all three trials with the oracle's columns, and the winner has its best score.
    # (the demo's median pruner may stop the third trial early: "pruned")
    header = next(ln.split() for ln in proc.stdout.splitlines() if ln.startswith("trial "))
    assert header[-15:] == ["objective", "clip_score", "concept_accuracy", "prior_accuracy", "cmmd", "state", "steps", "wall",
                            "s", "CPU", "h", "not", "run", "start", "s"]
    table = [ln for ln in proc.stdout.splitlines() if len(ln.split()) >= 7 and ln.split()[-6] in ("complete", "pruned")]
    assert len(table) == 3, proc.stdout
    scores = [float(ln.split()[-11]) for ln in table]
    # The bill: each trial's CPU-hours are its wall time x 1 CPU; best.json holds the totals.
    for ln in table:
        assert float(ln.split()[-3]) == pytest.approx(float(ln.split()[-4]) / 3600, rel=2e-3), ln
    assert info["bill"]["steps_run"] == sum(int(ln.split()[-5]) for ln in table) and info["bill"]["unit"] == "CPU"
    assert any(ln.startswith("bill: ") for ln in proc.stdout.splitlines())
    # Two trials at a time: the third runs on a worker that a finished trial left, with its base model loaded.
    from sweeps.results import load_records
    from sweeps.spec import load_spec

    records = load_records(load_spec(ROOT / "examples" / "demo.yaml", [f"storage={tmp_path}"]))
    assert sum(r.row.metrics["warm_start"] for r in records) >= 1
    assert all(r.row.startup_s > 0 for r in records)
    assert info["objective"]["value"] == pytest.approx(max(scores), rel=1e-3)
    # best_samples.png: labelled rows for the base model, the winner and the worst trial.
    from PIL import Image

    from sweeps.sample_grids import read_grid
    assert (out_dir / "base_samples.png").is_file()
    base = read_grid(out_dir / "base_samples.png", len(info["prompts"]))
    assert base.shape == (len(info["prompts"]), 64, 64, 3)
    with Image.open(out_dir / "best_samples.png") as im:
        assert im.height > 3 * 128 and im.width > 10 * 128


@pytest.mark.slow
def test_four_trials_two_at_a_time_on_logical_gpus_with_median_pruner(tmp_path, ray_local):
    """Trials ask for one (logical) GPU each; local Ray declares two, so two run at a time. The
    spec and suite files are gone while the trials run: each trial works from the plan alone."""
    import shutil

    from sweeps.export import export_sweep, read_manifest
    from sweeps.results import load_records, sweep_uri
    from sweeps.spec import load_spec
    from sweeps.trial_plan import build_plan
    from sweeps.tuner import run_sweep

    inputs = tmp_path / "inputs"
    shutil.copytree(ROOT / "examples", inputs)
    spec = load_spec(inputs / "demo.yaml", [
        f"storage={tmp_path}", "search.num_trials=4", "search.max_concurrent=4", "search.sampler=tpe",
        "resources.gpus_per_trial=1", "resources.cpus_per_trial=0.5", "train.max_train_steps=8",
        "eval.interval=4", "pruner.type=median", "pruner.options={n_startup_trials: 1}",
        "eval.oracle=null"])  # the held-out oracle's 88 images per evaluation: not what this test is about
    plan = build_plan(spec, local=False)  # the logical GPUs are Ray's, not this machine's
    shutil.move(inputs, tmp_path / "away")
    run_sweep(spec, plan)
    shutil.move(tmp_path / "away", inputs)
    records = load_records(spec)
    assert all(r.row.state != "failed" for r in records), [r.row.reason for r in records]
    export_sweep(spec, records)
    assert len(records) == 4
    assert {r.row.state for r in records} <= {"complete", "pruned"}
    # At most two trials ever overlapped: each held one of the two logical GPUs. Ray's `timestamp`
    # is whole seconds (the true end lies within the next second), so starts are taken 1 s late.
    spans = sorted((r.result.metrics["timestamp"] - r.result.metrics["time_total_s"] + 1.0, r.result.metrics["timestamp"])
                   for r in records)
    overlaps = max(sum(1 for s, e in spans if s < t < e) for t in [s + 1e-3 for s, _ in spans])
    assert overlaps <= 2
    manifest = read_manifest(sweep_uri(spec))
    assert manifest["entries"] and manifest["sha256"] and (tmp_path / "demo" / "best.safetensors").is_file()
