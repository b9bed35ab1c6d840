"""The full fine-tune examples: the SD 1.5 spec's dry run estimates memory per method and warns when the
GPU share cannot hold it; the tiny spec runs as a real sweep, scored against held-out ground truth
(the base model's row once, every trial's beside it, the report's "original vs fine-tuned" panel),
and exports a whole model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from sweeps.dry_run import describe_sweep, memory_lines
from sweeps.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
SD15 = ROOT / "examples" / "finetune_sd15.yaml"


def test_sd15_dry_run_estimates_memory_per_searched_method():
    text = describe_sweep(load_spec(SD15))
    full = next(ln for ln in text.splitlines() if ln.startswith("memory per trial (method=full)"))
    lora = next(ln for ln in text.splitlines() if ln.startswith("memory per trial (method=lora)"))
    assert "18.02 GB = weights 4.26 + gradients 3.44 + optimizer 6.88 + EMA 3.44" in full, full
    assert "859.5 M trained parameters" in full and "0.8 M trained parameters" in lora
    assert "warning: a trial with" not in text  # 24 GB per trial holds both


def test_a_gpu_share_too_small_is_warned_for_the_full_finetune_only():
    spec = load_spec(SD15, ["resources.gpu_memory_gb=16"])
    warnings = [ln for ln in memory_lines(spec) if ln.startswith("warning:")]
    assert len(warnings) == 1 and "method=full needs 18.0 GB" in warnings[0] and "16.0 GB" in warnings[0], warnings
    half = memory_lines(load_spec(SD15, ["resources.gpus_per_trial=0.5"]))  # half of a 24 GB GPU
    assert [ln for ln in half if ln.startswith("warning:")] == [ln for ln in half if "method=full needs 18.0 GB" in ln]
    assert any("12.0 GB (0.5 x 24 GB" in ln for ln in half)


@pytest.mark.slow
def test_tiny_finetune_sweep_judges_against_ground_truth_and_exports_a_single_file_and_a_folder(tmp_path):
    cmd = [sys.executable, str(ROOT / "sweeps" / "run.py"), "--space", str(ROOT / "examples" / "finetune.yaml"),
           "--set", f"storage={tmp_path}", "--set", "search.num_trials=2", "--set", "train.max_train_steps=4",
           "--set", "eval.interval=2", "--set", "train.sampling.steps=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "finetune"
    info = json.loads((out / "best.json").read_text())
    assert info["train_config"]["method"] == "full" and info["train_config"]["use_ema"] is True
    assert set(info["params"]) == {"learning_rate", "ema_decay", "gradient_accumulation_steps"}
    with safe_open(str(out / "best.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("model.diffusion_model.") for k in keys)
    assert any(k.startswith("first_stage_model.") for k in keys) and any(k.startswith("cond_stage_model.") for k in keys)
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    files = manifest["entries"][0]["files"]
    assert files["kohya"].endswith("model.safetensors") and files["diffusers"].endswith("/model")
    assert (out / files["diffusers"] / "model_index.json").is_file()
    assert f"{files['diffusers']}/unet/diffusion_pytorch_model.safetensors" in manifest["sha256"]
    from trainer.model_loading import load_sd_components

    load_sd_components(str(out / files["diffusers"]))  # diffusers loads the exported folder
    _check_ground_truth(out, info)


def _check_ground_truth(out: Path, info: dict) -> None:
    """eval.ground_truth (the toy world's test split): every trial reports gt_* with the one base row."""
    from evaluator.ground_truth import GROUND_TRUTH_METRICS
    from sweeps.report import load_sweep_spec
    from sweeps.results import load_records

    base = json.loads((out / "ground_truth" / "base.json").read_text())
    assert len(base["captions"]) == 6 and set(base["scores"]) == {*GROUND_TRUTH_METRICS, "gt_lpips_items"}
    records = load_records(load_sweep_spec(str(out)))
    assert len(records) == 2
    for record in records:
        metrics, tid = record.result.metrics, record.row.trial_id
        assert all(metrics[f"base_{m}"] == base["scores"][m] for m in GROUND_TRUTH_METRICS), tid
        assert all(isinstance(metrics[m], float) for m in GROUND_TRUTH_METRICS) and len(metrics["gt_lpips_items"]) == 6
        assert sorted(p.name for p in (out / "ground_truth" / tid).iterdir()) == ["step-000002.jpg", "step-000004.jpg"]
    assert info["metrics"]["gt_lpips"] != base["scores"]["gt_lpips"]  # the winner's own row, not the base's
    html = (out / "report" / "index.html").read_text()
    assert 'id="ground-truth-table"' in html and html.count('<tr class="fine-tuned">') == 2
    assert '<tr class="original"><td class="text">original</td><td class="text">base model (builtin:tiny-sd)' in html
    assert f"winner {info['trial_id']} (step {info['metrics']['step']})" in html
    assert 'alt="ground truth, original and fine-tuned images"' in html
