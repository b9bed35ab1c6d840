"""The report of a real small sweep (tiny SD, tiny CLIP, the toy world) opened in headless
Chromium: no console errors, one table row per trial, the table sorts, the page is not blank; and
what a real sweep adds to the stub's report: every evaluation's kept images, the strength grid
sampled at export from the exported LoRA."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report-real")
    cmd = [sys.executable, str(ROOT / "sweeps" / "run.py"), "--space", str(ROOT / "examples" / "demo.yaml"),
           "--set", f"storage={tmp}", "--set", "search.num_trials=2", "--set", "train.max_train_steps=6",
           "--set", "eval.interval=3", "--set", "train.sampling.steps=4",  # 4 denoising steps: a cheaper evaluation
           "--set", "eval.oracle=null",  # nor the held-out oracle's 88 images per evaluation
           # the first trial learns fast enough to change its pictures in 6 steps
           "--set", "search.initial_configs=[{learning_rate: 0.008, rank: 4, lr_scheduler: constant}]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "demo", proc.stdout


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM and CHROMEDRIVER, "needs Debian's chromium and chromium-driver (.ci/run installs them)"
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,2400"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # the given driver: nothing is downloaded


@pytest.mark.slow
def test_report_of_a_real_sweep_in_headless_chromium(real_sweep, tmp_path):
    sweep, out = real_sweep
    index = sweep / "report" / "index.html"
    assert f"report: {index}" in out and out.count("trials finished)") >= 2  # rewritten as trials finished
    rows = json.loads((sweep / "best.json").read_text())
    browser = _browser()
    try:
        browser.get(index.as_uri())
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == []
        count = browser.execute_script("return document.querySelectorAll('#trials tbody tr').length")
        assert count == 2
        order = "return Array.from(document.querySelectorAll('#trials tbody tr')).map(r => r.cells[0].textContent)"
        header = browser.execute_script(
            "return Array.from(document.querySelectorAll('#trials thead th')).map(h => h.textContent)")
        col = header.index("objective")
        browser.find_elements("css selector", "#trials thead th")[col].click()
        browser.find_elements("css selector", "#trials thead th")[col].click()  # descending
        values = browser.execute_script(
            f"return Array.from(document.querySelectorAll('#trials tbody tr')).map(r => Number(r.cells[{col}].dataset.sort))")
        assert values == sorted(values, reverse=True) and browser.execute_script(order)[0] == rows["trial_id"]
        broken = browser.execute_script(
            "return Array.from(document.images).filter(i => !i.complete || i.naturalWidth == 0).length")
        assert broken == 0
        browser.set_window_size(1400, min(12000, browser.execute_script("return document.body.scrollHeight") + 50))
        shot = browser.get_screenshot_as_png()
    finally:
        browser.quit()
    (tmp_path / "report.png").write_bytes(shot)
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"))
    assert pixels.shape[0] > 3000 and pixels.std() > 20  # plots and images, not an empty white page
    assert len(np.unique(pixels.reshape(-1, 3)[::97], axis=0)) > 500


@pytest.mark.slow
def test_a_real_sweep_keeps_every_evaluation_and_samples_the_strength_grid_once(real_sweep):
    sweep, out = real_sweep
    trials = [p.name for p in (sweep / "evals").iterdir()]
    assert len(trials) == 2
    best = json.loads((sweep / "best.json").read_text())
    assert sorted(p.name for p in (sweep / "evals" / best["trial_id"]).iterdir()) == ["step-000003.jpg", "step-000006.jpg"]
    stamp = json.loads((sweep / "report" / "xyz" / "sampled.json").read_text())
    assert stamp == {"rank1": {"trial_id": best["trial_id"], "step": best["step"]}}
    with Image.open(sweep / "report" / "xyz" / "strength-rank1.png") as grid:
        assert grid.width > 3 * 128 and grid.height > 4 * 128
    # the demo suite has a trigger test: that grid comes from the evaluation, nothing was sampled for it
    assert (sweep / "report" / "xyz" / "trigger.png").is_file() and not (sweep / "report" / "xyz" / "trigger-rank1.png").exists()
    assert "report: rank" not in out  # no sampling problem was reported


@pytest.mark.slow
def test_strength_zero_is_the_base_model_and_one_is_the_exported_lora(real_sweep):
    """The strength grid's LoRA, loaded into the base model as a UI loads it: at strength 0 the
    base model's own images of those items, at 1 the exported checkpoint's evaluation images."""
    from sweeps.export import read_manifest
    from sweeps.report import load_sweep_spec
    from sweeps.sample_grids import read_grid
    from sweeps.xyz_sampling import _load_base, _trial_threads, sample_entry

    sweep, _ = real_sweep
    spec = load_sweep_spec(str(sweep))
    entry = read_manifest(str(sweep))["entries"][0]
    info = json.loads((sweep / entry["files"]["info"]).read_text())
    with _trial_threads(spec):  # as at export
        grid = sample_entry(spec, entry, _load_base(spec), limit=2)["strength"]  # a concept item and a prior one
    assert grid.columns == ["strength 0", "strength 0.5", "strength 1"]
    items = [tuple(r.rsplit(" | seed ", 1)) for r in grid.rows]
    index = [list(zip(info["prompts"], map(str, info["seeds"]))).index(it) for it in items]
    base = read_grid(sweep / "base_samples.png", len(info["prompts"]))
    lora = read_grid(sweep / entry["files"]["samples"], len(info["prompts"]))
    # Equal but for rounding (another process, maybe another summation order).
    diff = lambda a, b: float(np.abs(a.astype(float) - b).mean())
    for row, i in zip(grid.cells, index):
        assert diff(row[0], base[i]) < 0.5 and diff(row[2], lora[i]) < 0.5
    zero, half, one = grid.cells[0]  # the concept item
    assert diff(zero, one) > 2  # the LoRA changed the picture beyond rounding
    assert 0.5 < diff(half, zero) < diff(zero, one) and 0.5 < diff(half, one) < diff(zero, one)  # half way is neither
