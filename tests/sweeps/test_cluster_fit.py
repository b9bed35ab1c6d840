"""Trials that need more than the machine or cluster has: an error on local Ray, a warning and
a start timeout on a cluster, never a sweep that waits forever."""

import time
from pathlib import Path

import pytest
import ray
from ray import tune

from sweeps.cluster_fit import SweepCannotStart, cluster_fit_warning, local_fit_problems
from sweeps.spec import load_spec
from sweeps.spec_schema import ResourcesSpec
from sweeps.tuner import run_sweep

ROOT = Path(__file__).resolve().parents[2]


def test_local_fit_names_the_key_what_the_machine_has_and_the_fix():
    problems = local_fit_problems(ResourcesSpec(cpus_per_trial=4, gpus_per_trial=2), cpus=2, gpus=0)
    assert problems[0].startswith("resources.gpus_per_trial: 2 GPU(s) per trial, but this machine has 0;")
    assert problems[1].startswith("resources.cpus_per_trial: 4 CPUs per trial, but this machine has 2;")
    assert all("--address" in p for p in problems)
    assert local_fit_problems(ResourcesSpec(cpus_per_trial=2, gpus_per_trial=0), cpus=2, gpus=0) == []


def test_cluster_warning_reads_the_real_nodes(ray_local):
    nodes = ray.nodes()
    have = max(n["Resources"].get("GPU", 0) for n in nodes if n["Alive"])
    assert cluster_fit_warning(ResourcesSpec(gpus_per_trial=have), nodes) is None
    warning = cluster_fit_warning(ResourcesSpec(gpus_per_trial=have + 1, start_timeout_s=120), nodes)
    assert f"resources.gpus_per_trial={have + 1:g}" in warning and "start_timeout_s=120" in warning


def _never_runs(config):
    tune.report({"step": 1, "max_train_steps": 1, "clip_score": 1.0})


def test_a_sweep_whose_trials_cannot_start_stops_after_the_timeout(ray_local, tmp_path):
    gpus = int(ray.cluster_resources().get("GPU", 0)) + 1
    spec = load_spec(ROOT / "examples" / "demo.yaml", [
        f"storage={tmp_path}", "search.num_trials=1", f"resources.gpus_per_trial={gpus}",
        "resources.start_timeout_s=3", "objective={metric: clip_score, mode: max}", "space.lr_scheduler=constant"])
    start = time.monotonic()
    with pytest.raises(SweepCannotStart, match=rf"no trial could start within \d+ s: .*gpus_per_trial={gpus}"):
        run_sweep(spec, None, trainable=_never_runs)
    assert time.monotonic() - start < 60
