"""A real sweep on local Ray with the tiny models: trains, samples, scores, exports the winner."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sweep_of_three_trials_exports_best(tmp_path):
    cmd = [
        sys.executable, str(ROOT / "sweeps" / "run.py"), "--space", str(ROOT / "examples" / "demo.yaml"),
        "--set", f"storage={tmp_path}", "--set", "search.num_trials=3",
        "--set", "train.max_train_steps=10", "--set", "eval.interval=5", "--set", "eval.seeds=[0]",
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
    assert info["format"] == "kohya" and keys and all(k.startswith("lora_unet_") for k in keys)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_dim"] == str(info["params"]["rank"])
    manifest = json.loads((out_dir / "export" / "manifest.json").read_text())
    assert manifest["entries"][0]["trial_id"] == info["trial_id"]
    assert manifest["sha256"]["best.safetensors"] == hashlib.sha256(best.read_bytes()).hexdigest()
    with safe_open(str(out_dir / manifest["entries"][0]["files"]["diffusers"]), "pt") as f:
        assert all(k.startswith("unet.") for k in f.keys())
    assert set(info["params"]) == {"learning_rate", "rank"}
    assert info["objective"]["metric"] == "clip_score" and info["objective"]["value"] >= 0
    # The table lists all three trials, and the winner has the table's best score.
    # (the demo's median pruner may stop the third trial early: "pruned")
    table = [ln for ln in proc.stdout.splitlines() if len(ln.split()) >= 4 and ln.split()[-3] in ("complete", "pruned")]
    assert len(table) == 3, proc.stdout
    scores = [float(ln.split()[-4]) for ln in table]
    assert info["objective"]["value"] == pytest.approx(max(scores), rel=1e-3)
