"""The sweep survives its driver: SIGKILL `sweeps/run.py` mid-sweep, resume with --resume, compare."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sweeps.export import choose
from sweeps.results import load_records
from sweeps.search import load_study
from sweeps.spec import load_spec
from tests.sweeps.driver_kill import ENDED, finished, run_and_kill

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo.yaml"
TRIALS = 3


def _sets(storage: Path) -> list[str]:
    sets = [f"storage={storage}", f"search.num_trials={TRIALS}", "search.max_concurrent=1",
            "train.max_train_steps=2", "eval.interval=2", "eval.seeds=[0]"]
    return [arg for s in sets for arg in ("--set", s)]


def _snapshot(trial_dirs: list[Path]) -> dict:
    """Every file of the finished trials with its bytes: a re-run or a rewrite would change it."""
    return {str(p): p.read_bytes() for d in trial_dirs for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_driver_killed_mid_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    cmd = [sys.executable, str(ROOT / "sweeps" / "run.py"), "--space", str(DEMO), *_sets(tmp_path)]
    spec = load_spec(DEMO, [a for a in _sets(tmp_path) if a != "--set"])
    run_and_kill(cmd, spec, finished(2))
    before = {r.row.trial_id: r for r in load_records(spec)}
    done = {t: r for t, r in before.items() if r.row.state in ENDED}
    assert len(done) >= 2, [r.row for r in before.values()]
    frozen = _snapshot([Path(r.result.path) for r in done.values()])
    study_before = {t.number: (t.state, t.value, t.params) for t in load_study(spec.output_dir / "study", spec.name).trials}

    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=500)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming sweep demo from {tmp_path / 'demo' / 'tune'}" in resumed.stdout

    after = load_records(spec)
    assert len(after) == TRIALS and all(r.row.state in ENDED for r in after)
    assert {r.row.trial_id for r in after} >= set(before)
    # Finished trials were not re-run: not one byte of their folders changed, and no start line for them.
    assert _snapshot([Path(done[t].result.path) for t in done]) == frozen
    for trial_id in done:
        assert f"trial {trial_id} started" not in resumed.stdout
    # The Optuna study kept its history: the same trials with the same values, then the rest of the budget.
    # A trial the killed driver had only asked Optuna for (after its last saved state) is closed as FAIL.
    study = load_study(spec.output_dir / "study", spec.name)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == TRIALS, states
    assert set(states) <= {"COMPLETE", "PRUNED", "FAIL"}, states
    for t in study.trials:
        if t.number in study_before and study_before[t.number][0].is_finished():
            assert (t.state, t.value, t.params) == study_before[t.number]
    # The export is what choosing from the final results gives, file for file.
    winner = choose(after, spec)[0]
    best = json.loads((tmp_path / "demo" / "best.json").read_text())
    assert best["trial_id"] == winner.record.row.trial_id
    assert best["objective"]["value"] == max(r.row.objective for r in after if r.row.objective is not None)
    with winner.checkpoint.as_directory() as ckpt:
        assert (tmp_path / "demo" / "best.safetensors").read_bytes() == (Path(ckpt) / "lora_kohya.safetensors").read_bytes()
    assert resumed.stdout.strip().splitlines()[-1] == f"best LoRA: {tmp_path / 'demo' / 'best.safetensors'}"
