"""The decision-quality benchmark's replay (bench/sweep_replay.py) decides as a real Ray Tune sweep.

A stub trainable reports known curves (with per-item values, for the paired wilcoxon pruner)
through the project's run_sweep on local Ray, one trial at a time; replaying the same spec on the
same curves without Ray must propose the same configs in the same order and stop the same trials
at the same steps. The benchmark's own check does this with real training
(`bench/sweep_quality.py real`); this one guards the driver against drifting from Tune's calls.
"""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import ray
import yaml
from ray import tune

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from sweep_replay import pruned_at, replay  # noqa: E402

from sweeps.results import load_records  # noqa: E402
from sweeps.search import RAY_TRIAL_ATTR, load_study  # noqa: E402
from sweeps.spec import parse_spec  # noqa: E402
from sweeps.tuner import run_sweep  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
STEPS, ITEMS = (10, 20, 30, 40), 12


def curve(config: dict) -> list[dict]:
    """Results of a config: quality peaks at lr 3e-3; items wiggle around the mean by item and step."""
    quality = 1.0 - abs(math.log10(config["learning_rate"]) + 2.5) / 2.0 + (0.05 if config["lr_scheduler"] == "cosine" else 0)
    out = []
    for step in STEPS:
        mean = 10 * quality * (1 - math.exp(-step / 15))
        items = [mean + 0.3 * math.sin(7 * i + step + 13 * quality) for i in range(ITEMS)]
        out.append({"step": step, "max_train_steps": STEPS[-1], "objective": sum(items) / ITEMS, "objective_items": items})
    return out


def stub_trainable(config: dict) -> None:
    for result in curve(config):
        tune.report(result)


def _spec(tmp_path: Path, sampler: str, pruner: dict):
    data = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    data.update(
        name=f"replay-{sampler}-{pruner['type']}", storage=str(tmp_path / "runs"),
        train={"max_train_steps": STEPS[-1], "resolution": 64},
        space={"learning_rate": {"type": "choice", "values": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]},
               "lr_scheduler": {"type": "choice", "values": ["constant", "cosine"]}},
        eval={"interval": 10, "prompts": ["{trigger}, a red circle"]},
        search={"sampler": sampler, "num_trials": 9, "max_concurrent": 1, "seed": 4},
        pruner=pruner, resources={"cpus_per_trial": 1, "gpus_per_trial": 0},
    )
    data["eval"].pop("oracle", None)
    return parse_spec(data, "test")


STRATEGIES = [
    ("tpe", {"type": "median", "options": {"n_startup_trials": 2}}),
    ("tpe", {"type": "asha", "options": {"reduction_factor": 2}}),
    pytest.param("tpe", {"type": "wilcoxon", "options": {"p_threshold": 0.1}}, marks=[pytest.mark.slow, pytest.mark.skipif(
        importlib.util.find_spec("scipy") is None, reason="WilcoxonPruner needs scipy")]),
    pytest.param("tpe", {"type": "successive_halving", "options": {"reduction_factor": 2}}, marks=pytest.mark.slow),
    pytest.param("tpe", {"type": "hyperband", "options": {"reduction_factor": 2}}, marks=pytest.mark.slow),
    pytest.param("random", {"type": "asha", "options": {"reduction_factor": 2}}, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("sampler,pruner", STRATEGIES, ids=lambda v: v if isinstance(v, str) else v["type"])
def test_replay_proposes_and_prunes_as_the_real_sweep(tmp_path, ray_local, sampler, pruner):
    spec = _spec(tmp_path, sampler, pruner)
    run_sweep(spec, None, trainable=stub_trainable)
    number = {t.user_attrs[RAY_TRIAL_ATTR]: t.number for t in load_study(Path(spec.output_dir) / "study", spec.name).trials}
    rows = load_records(spec)
    assert [number[r.row.trial_id] for r in rows] == list(range(len(rows))), "records come in the order they were proposed"
    real = [(r.row.params, r.row.steps, r.row.state) for r in rows]

    runs = replay(spec, curve, tmp_path / "replay-study", keep_going=lambda done: True)
    replayed = [(r.config, r.last_step, "pruned" if p is not None else "complete") for r, p in zip(runs, pruned_at(runs))]
    assert replayed == real
    assert any(state == "pruned" for _, _, state in real), "the curves should make the pruner prune some trials"
    assert any(state == "complete" for _, _, state in real)
    assert len({tuple(sorted(p.items())) for p, _, _ in real}) > 2, "the searcher should try several configs"


def test_replay_needs_one_trial_at_a_time(tmp_path):
    spec = _spec(tmp_path, "tpe", {"type": "median"})
    data = spec.model_dump()
    data["search"]["max_concurrent"] = 2
    with pytest.raises(ValueError, match="max_concurrent: 1"):
        replay(parse_spec(data, "t"), curve, tmp_path / "s", keep_going=lambda done: True)
