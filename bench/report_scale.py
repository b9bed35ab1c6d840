"""How long the sweep report takes to render, and how large it is, for a sweep of many trials.

    python bench/report_scale.py --trials 500 [--size 512] [--evals 5]

Synthetic records, not a Ray sweep: `--trials` TrialRecords as sweeps.results.load_records
returns them (each with every evaluation in its metrics dataframe and its best checkpoint), an
Optuna study of the same trials in the sweep's journal, the base model's images, and the
winner's kept evaluation images. The checkpoints hold `--size` px images of the demo suite's 44
items (smooth shapes with grain, like a diffusion model's; eight sets shared between the
trials, since only the winner's and the parameter grid's cells are read). 60% of the trials are
pruned at an early evaluation, 4% failed. Loading Ray's experiment state is not timed (it is
bench/orchestration.py's business). Prints one JSON line: render seconds (collect, page), page
and PNG sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _images(count: int, size: int, seed: int) -> np.ndarray:
    """Smooth coloured discs on gradients with a little grain: compresses as generated images do."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        bg = rng.uniform(0, 255, 3)[None, None] * (0.6 + 0.4 * yy[..., None])
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r)[..., None]
        img = np.where(disc, rng.uniform(0, 255, 3)[None, None] * (0.7 + 0.3 * xx[..., None]), bg)
        out[i] = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    return out


def build(tmp: Path, trials: int, size: int, evals: int):
    import optuna
    import pandas as pd
    from ray import tune

    from sweeps.eval_images import eval_uri, save_eval_images
    from sweeps.results import BASE_SAMPLES, SAMPLES_FILE, TRIAL_INFO, TrialRecord, TrialRow, sweep_uri
    from sweeps.sample_grids import save_grid
    from sweeps.search import journal_storage
    from sweeps.spec import load_spec

    spec = load_spec(ROOT / "examples" / "demo.yaml", [f"storage={tmp}", f"search.num_trials={trials}"])
    prompts, seeds = spec.eval_prompts()
    root = Path(sweep_uri(spec))
    root.mkdir(parents=True)
    save_grid(_images(len(prompts), size, 999), root / BASE_SAMPLES)
    interval = 100
    ckpts, kept_bytes = [], []
    for k in range(8):
        folder = tmp / "ckpt" / str(k)
        folder.mkdir(parents=True)
        images = _images(len(prompts), size, k)
        save_grid(images, folder / SAMPLES_FILE)
        ckpts.append(folder)
        save_eval_images(str(tmp), "x", 0, images)  # what sweeps.trainable keeps of each evaluation
        kept_bytes.append(Path(eval_uri(str(tmp), "x", 0)).read_bytes())
    rng = np.random.default_rng(0)
    dists = {"learning_rate": optuna.distributions.FloatDistribution(1e-4, 3e-2, log=True),
             "rank": optuna.distributions.CategoricalDistribution([2, 4, 8]),
             "lr_scheduler": optuna.distributions.CategoricalDistribution(["constant", "cosine"])}
    (Path(spec.output_dir) / "study").mkdir(parents=True)
    study = optuna.create_study(study_name=spec.name, storage=journal_storage(Path(spec.output_dir) / "study"),
                                direction="maximize")
    records, frozen = [], []
    for n in range(trials):
        tid = f"{n:08x}"
        params = {"learning_rate": float(math.exp(rng.uniform(math.log(1e-4), math.log(3e-2)))),
                  "rank": int(rng.choice([2, 4, 8])), "lr_scheduler": str(rng.choice(["constant", "cosine"]))}
        quality = -abs(math.log10(params["learning_rate"]) + 2.6) * 20 + params["rank"]
        state = "failed" if rng.random() < 0.04 else ("pruned" if rng.random() < 0.6 else "complete")
        n_evals = 0 if state == "failed" else (int(rng.integers(1, evals)) if state == "pruned" else evals)
        curve = [{"step": (e + 1) * interval, "objective": 40 + quality * (e + 1) / evals + rng.normal(0, 0.5)}
                 for e in range(n_evals)]
        frame = pd.DataFrame(curve) if curve else None
        best = max(curve, key=lambda c: c["objective"]) if curve else None
        folder = ckpts[n % len(ckpts)]
        (folder / TRIAL_INFO).write_text(json.dumps({"params": params, "metrics": {}, "prompts": prompts, "seeds": seeds}))
        kept = [(tune.Checkpoint.from_directory(str(folder)), {**best, "clip_score": best["objective"] / 2})] if best else []
        for c in curve:  # every evaluation's kept images (the stub shares eight sets)
            Path(eval_uri(str(root), tid, c["step"])).parent.mkdir(parents=True, exist_ok=True)
            Path(eval_uri(str(root), tid, c["step"])).write_bytes(kept_bytes[n % len(kept_bytes)])
        row = TrialRow(tid, params, best["objective"] if best else None, state, curve[-1]["step"] if curve else None,
                       float(rng.uniform(60, 900)), reason="training diverged" if state == "failed" else None)
        result = tune.Result(metrics=curve[-1] if curve else {}, checkpoint=None, error=None, path=str(tmp),
                             metrics_dataframe=frame, best_checkpoints=kept)
        records.append(TrialRecord(row, result))
        values = {"intermediate_values": {c["step"]: c["objective"] for c in curve}}
        if state == "complete":
            frozen.append(optuna.trial.create_trial(params=params, distributions=dists, value=curve[-1]["objective"], **values))
        else:
            stopped = optuna.trial.TrialState.PRUNED if curve else optuna.trial.TrialState.FAIL
            frozen.append(optuna.trial.create_trial(params=params, distributions=dists, state=stopped, **values))
    study.add_trials(frozen)
    winner = max((r for r in records if r.row.objective is not None), key=lambda r: r.row.objective)
    for e in range(evals):
        save_eval_images(str(root), winner.row.trial_id, (e + 1) * interval, _images(len(prompts), size, 100 + e))
    return spec, records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=500)
    p.add_argument("--size", type=int, default=512, help="px of the checkpoints' images")
    p.add_argument("--evals", type=int, default=5, help="evaluations of a complete trial")
    p.add_argument("--keep", default=None, help="an empty folder to build the sweep in and keep (to look at the report)")
    args = p.parse_args()
    from sweeps.report import write_report
    from sweeps.report_data import collect

    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or scratch
        t0 = time.perf_counter()
        spec, records = build(Path(tmp), args.trials, args.size, args.evals)
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        collect(spec, records)
        collect_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = Path(write_report(spec, records))
        render_s = time.perf_counter() - t0
        pngs = sorted((index.parent / "xyz").glob("*.png"))
        print(json.dumps({
            "trials": args.trials, "image_px": args.size, "build_s": round(built, 1),
            "collect_s": round(collect_s, 2), "write_report_s": round(render_s, 2),
            "page_mb": round(index.stat().st_size / 1e6, 2),
            "xyz_png_mb": round(sum(f.stat().st_size for f in pngs) / 1e6, 2),
            "xyz_files": [f.name for f in pngs],
        }))


if __name__ == "__main__":
    main()
