"""Faults: lost worker nodes, trials that cannot train, unwritable storage, writes that fail half way."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from sweeps import run as run_cli
from sweeps.search import load_study
from sweeps.spec import load_spec
from tests.quick_eval import QUICK_EVAL
from tests.ray_nodes import node_of

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo.yaml"


def test_unwritable_storage_is_a_clear_error_before_any_training(tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the storage folder should be")
    code = run_cli.main(["--space", str(DEMO), "--set", f"storage={blocker}/runs"])
    assert code == 2
    err = capsys.readouterr().err
    assert "not writable" in err and str(blocker) in err
    assert blocker.read_text().startswith("a file")  # nothing was written anywhere


_FAILING_WRITE = """
import resource, signal, sys
from pathlib import Path
from sweeps import storage
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a too-large write then fails with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
dst = Path(sys.argv[1])
for name, fn in [("write", lambda: storage.write_bytes(dst, b"x" * 100_000)),
                 ("copy", lambda: storage.copy_file(sys.argv[2], dst))]:
    try:
        fn()
        print(name, "no error")
    except storage.StorageError as err:
        print(name, "StorageError:", err)
"""


def test_a_write_that_fails_half_way_leaves_the_old_file_and_no_partial_one(tmp_path):
    dst = tmp_path / "out" / "best.safetensors"
    dst.parent.mkdir()
    dst.write_bytes(b"old complete file")
    big = tmp_path / "big.bin"
    big.write_bytes(b"y" * 100_000)
    proc = subprocess.run([sys.executable, "-c", _FAILING_WRITE, str(dst), str(big)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout + proc.stderr
    for line in lines:
        assert "StorageError" in line and "nothing was written" in line and str(dst) in line
    assert dst.read_bytes() == b"old complete file"
    assert sorted(p.name for p in dst.parent.iterdir()) == ["best.safetensors"]


def test_trainer_state_roundtrip_is_exact_and_pickle_free(tiny_sd_dir, demo_dataset, tmp_path):
    """A trial resumed from its checkpoint trains exactly as if it had never stopped."""
    from trainer.checkpoint import load_checkpoint, save_checkpoint
    from trainer.config import build_train_config
    from trainer.loop import LoraTrainer

    cfg = build_train_config({"base_model": str(tiny_sd_dir), "dataset": str(demo_dataset), "resolution": 32,
                              "max_train_steps": 4, "train_batch_size": 2, "rank": 2, "learning_rate": 1e-3})
    straight = LoraTrainer.build(cfg)
    straight.train(4)
    first = LoraTrainer.build(cfg)
    first.train(2)
    save_checkpoint(first, tmp_path / "state")
    assert {p.suffix for p in (tmp_path / "state").rglob("*") if p.is_file()} <= {".safetensors", ".json"}
    resumed = LoraTrainer.build(cfg)
    load_checkpoint(resumed, tmp_path / "state")
    assert resumed.global_step == 2
    resumed.train(2)
    for key, value in straight.lora_state_dict().items():
        torch.testing.assert_close(resumed.lora_state_dict()[key], value, rtol=0, atol=0)


def test_a_failed_result_is_a_failed_trial_for_the_study_and_the_pruner_not_a_score(tmp_path):
    """What sweeps.trainable reports when training cannot succeed: Optuna gets FAIL (not COMPLETE
    with a partial score, not PRUNED), the scheduler gets no value for its rungs or its median."""
    from optuna.trial import TrialState
    from ray.tune.schedulers import TrialScheduler

    from sweeps.pruning import make_pruner, make_scheduler
    from sweeps.results import FAILED_KEY
    from sweeps.search import make_search_alg, unwrap_searcher

    spec = load_spec(DEMO, [f"storage={tmp_path}"])
    searcher = unwrap_searcher(make_search_alg(spec, tmp_path, pruner=make_pruner(spec)))
    scheduler = make_scheduler(spec)

    class Controller:  # what the scheduler reads of Tune's controller
        search_alg = searcher

    class Trial:
        trial_id = "t0"

    searcher.suggest("t0")
    searcher.on_trial_result("t0", {"objective": 0.5, "step": 100, "max_train_steps": 400})
    failed = {FAILED_KEY: "training diverged: loss became nan at step 150", "objective": float("nan"), "step": 150}
    assert scheduler.on_trial_result(Controller(), Trial(), failed) == TrialScheduler.CONTINUE
    searcher.on_trial_result("t0", failed)
    searcher.on_trial_complete("t0", failed)
    (trial,) = load_study(tmp_path, "demo").trials
    assert trial.state == TrialState.FAIL and trial.intermediate_values == {100: 0.5}


def _run(tmp_path, *sets, timeout=480):
    cmd = [sys.executable, str(ROOT / "sweeps" / "run.py"), "--space", str(DEMO), "--set", f"storage={tmp_path}",
           *[arg for s in [*QUICK_EVAL, *sets] for arg in ("--set", s)]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_trial_with_an_invalid_config_combination_fails_with_its_reason_and_the_sweep_goes_on(tmp_path):
    proc = _run(
        tmp_path, "search.num_trials=2", "search.max_concurrent=1", "train.max_train_steps=4", "eval.interval=4",
        "space.center_crop={type: choice, values: [true, false]}",
        "space.cache_latents={type: choice, values: [true, false]}",
        "search.initial_configs=[{center_crop: false, cache_latents: true, learning_rate: 0.001, rank: 2},"
        " {center_crop: true, cache_latents: true, learning_rate: 0.001, rank: 2}]",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    failed = [ln for ln in proc.stdout.splitlines() if " failed " in f" {ln} " and ln.split()[0].isalnum()]
    assert any("FAILED" in ln and "random crops" in ln for ln in proc.stdout.splitlines()), proc.stdout
    records = list((tmp_path / "demo" / "failures").glob("*.json"))
    assert len(records) == 1
    assert "cache_latents: random crops" in json.loads(records[0].read_text())["reason"]
    # Ended at once: started once, never retried (each retry would cost a worker start and fail the same way).
    failed_id = records[0].stem
    assert proc.stdout.count(f"trial {failed_id} started") == 1 and "retrying" not in proc.stdout, proc.stdout
    assert "not retried" in proc.stdout
    states = sorted(t.state.name for t in load_study(tmp_path / "demo" / "study", "demo").trials)
    assert states == ["COMPLETE", "FAIL"]
    assert "1 complete, 1 failed" in proc.stdout and "failed trials:" in proc.stdout, failed
    best = json.loads((tmp_path / "demo" / "best.json").read_text())
    assert best["params"]["center_crop"] is True


@pytest.mark.slow
def test_losing_the_node_of_a_running_trial_resumes_it_from_its_checkpoint(tmp_path, ray_cluster):
    from sweeps.results import load_records
    from sweeps.trial_plan import build_plan
    from sweeps.tuner import run_sweep

    spec = load_spec(DEMO, [
        f"storage={tmp_path}", "search.num_trials=1", "search.max_concurrent=1", "train.max_train_steps=40",
        "eval.interval=4", "failure.max_failures=2", *QUICK_EVAL])
    plan = build_plan(spec)
    cluster = ray_cluster({"num_cpus": 0}, {"num_cpus": 1, "resources": {"node_a": 1}},
                          {"num_cpus": 1, "resources": {"node_b": 1}})
    killed = {}

    def kill_after_first_checkpoint():
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and not killed:
            for result in (tmp_path / "demo" / "tune").glob("*/result.json"):
                lines = [json.loads(ln) for ln in result.read_text().splitlines() if ln.strip()]
                if lines and list(result.parent.glob("checkpoint_*")):
                    node = node_of(cluster, lines[-1]["pid"])
                    killed["step"] = lines[-1]["step"]
                    cluster.remove_node(node, allow_graceful=False)
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    run_sweep(spec, plan)
    killer.join(timeout=5)
    records = load_records(spec)
    assert killed, "the trial finished before its node could be killed"
    (record,) = records
    assert record.row.state == "complete" and record.row.steps == 40
    steps = [row["step"] for row in map(json.loads, Path(record.result.path, "result.json").read_text().splitlines())]
    resumed = [json.loads(ln)["resumed_from_step"] for ln in Path(record.result.path, "result.json").read_text().splitlines()]
    # Reports before the loss start from 0; after it, the trial continues from its checkpoint's step, not from zero.
    assert len(steps) > len(set(steps)) or resumed[-1] > 0, f"no restart happened after the node loss: steps {steps}"
    # The node dies shortly after the killer sees step `killed["step"]`; the trial may checkpoint once more first.
    assert 4 <= killed["step"] <= resumed[-1] < 40 and resumed[-1] in steps
    assert steps[-1] == 40 and all(s > resumed[-1] for s in steps[steps.index(resumed[-1]) + 1:])
    assert record.result.metrics["resumed_from_step"] == resumed[-1]
