"""The sweep decides well on the toy world: the LoRA it exports is better, by the exact oracle on
held-out seeds, than the median of the trials it ran. A small real version of the decision-quality
benchmark (bench/sweep_quality.py): the demo's spec, real training and scoring on local Ray."""

import json
import statistics
from pathlib import Path

import pytest

from sweeps.export import export_sweep
from sweeps.results import load_records, scored_checkpoints
from sweeps.spec import load_spec
from sweeps.trial_plan import build_plan
from sweeps.tuner import run_sweep

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
# A spread a user's first trials could draw: too low, good, higher, too high a learning rate.
CONFIGS = [
    {"learning_rate": 1e-4, "rank": 2, "lr_scheduler": "constant"},
    {"learning_rate": 1e-3, "rank": 2, "lr_scheduler": "cosine"},
    {"learning_rate": 3e-3, "rank": 8, "lr_scheduler": "constant"},
    {"learning_rate": 3e-2, "rank": 2, "lr_scheduler": "constant"},
]


def test_exported_winner_beats_the_median_trial_by_the_held_out_oracle(tmp_path, ray_local):
    spec = load_spec(ROOT / "examples" / "demo.yaml", [
        f"storage={tmp_path}", "search.num_trials=4", "search.max_concurrent=2", "pruner.type=none",
        f"search.initial_configs={json.dumps(CONFIGS)}", "train.max_train_steps=200"])
    run_sweep(spec, build_plan(spec, local=False))
    records = load_records(spec)
    assert [r.row.state for r in records] == ["complete"] * 4, [r.row.reason for r in records]
    # What each trial would export (its best checkpoint by the objective), judged on held-out seeds.
    held = [scored_checkpoints(r.result, spec)[0][1]["heldout_score"] for r in records]
    export_sweep(spec, records)
    winner = json.loads((tmp_path / "demo" / "best.json").read_text())
    assert winner["metrics"]["heldout_score"] == max(h for h, r in zip(held, records) if r.row.trial_id == winner["trial_id"])
    assert winner["metrics"]["heldout_score"] > statistics.median(held), (winner["params"], held)
