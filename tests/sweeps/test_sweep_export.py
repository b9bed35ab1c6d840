"""Export, results table and --status/--export-only over real Ray Tune sweeps of a stub trainable.

The stub writes checkpoints with the same files as the real trainable (small real safetensors),
with scores that are a known function of the params, so the expected winners are computable.
"""

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from ray import cloudpickle, tune
from safetensors import safe_open
from safetensors.torch import save_file

from sweeps import run as run_cli
from sweeps.export import choose, export_sweep, verify_files
from sweeps.results import format_table, load_records
from sweeps.search import load_pruned
from sweeps.spec import load_spec
from sweeps.trainable import LORA_DIFFUSERS, LORA_KOHYA, SAMPLES_FILE, TRIAL_INFO, TrialFailed, save_grid
from sweeps.tuner import run_sweep

ROOT = Path(__file__).resolve().parents[2]
# Ray workers cannot import this test module by name: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
STEPS = (5, 10)


def stub_score(config: dict, step: int) -> float:
    return 1000.0 * config["learning_rate"] * step / 10


def stub_loss(config: dict) -> float:
    return 1.0 / config["rank"] + config["learning_rate"]


def write_checkpoint(folder: Path, config: dict, metrics: dict) -> None:
    """The files sweeps.trainable puts into every checkpoint, with tiny real tensors."""
    down = torch.full((config["rank"], 4), config["learning_rate"])
    save_file({"lora_unet_down_blocks_0_attn.lora_down.weight": down}, str(folder / LORA_KOHYA),
              metadata={"ss_network_dim": str(config["rank"])})
    save_file({"unet.down_blocks.0.attn.lora_A.weight": down}, str(folder / LORA_DIFFUSERS))
    save_grid(torch.zeros(2, 8, 8, 3, dtype=torch.uint8).numpy(), folder / SAMPLES_FILE)
    (folder / TRIAL_INFO).write_text(json.dumps({"params": config, "metrics": metrics, "prompts": ["p"], "seeds": [0]}))


def stub_trial(config: dict) -> None:
    if config["rank"] == 8 and config.get("fail_rank8", True):
        raise TrialFailed("stub: rank 8 is refused")
    for step in STEPS:
        metrics = {"step": step, "max_train_steps": STEPS[-1], "clip_score": stub_score(config, step), "loss": stub_loss(config)}
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(Path(tmp), config, metrics)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def demo_sets(tmp_path, *overrides) -> list[str]:
    return [f"storage={tmp_path}", "search.num_trials=4", "search.max_concurrent=2", "failure.max_failures=1",
            "train.max_train_steps=10", "objective={metric: clip_score, mode: max}", "space.lr_scheduler=constant",
            *overrides]


def demo_spec(tmp_path, *overrides):
    return load_spec(ROOT / "examples" / "demo.yaml", demo_sets(tmp_path, *overrides))


FINISHED = ("export.top_k=2", "search.initial_configs=[{learning_rate: 0.001, rank: 8}]")


@pytest.fixture(scope="module")
def finished_sweep(ray_local, tmp_path_factory):
    spec = demo_spec(tmp_path_factory.mktemp("sweep"), *FINISHED)
    run_sweep(spec, None, trainable=stub_trial)
    return spec


def test_results_table_has_every_trial_with_state_and_reason(finished_sweep):
    rows = [r.row for r in load_records(finished_sweep)]
    assert len(rows) == 4 and sum(r.params["rank"] == 8 for r in rows) >= 1
    pruned = set(load_pruned(finished_sweep.output_dir / "study"))  # the demo's median pruner, through S1's record
    for row in rows:
        if row.params["rank"] == 8:
            assert row.state == "failed" and "rank 8 is refused" in row.reason and row.objective is None
        elif row.trial_id in pruned:
            assert row.state == "pruned" and row.steps == 5
            assert row.objective == pytest.approx(stub_score(row.params, 5))
        else:
            assert row.state == "complete" and row.steps == 10
            assert row.objective == pytest.approx(stub_score(row.params, 10))
    table = format_table(rows, finished_sweep)
    assert table.splitlines()[0].split() == ["trial", "learning_rate", "rank", "clip_score", "state", "steps", "wall", "s",
                                             "CPU", "h", "not", "run"]
    assert "4 trials:" in table


def test_export_top_k_with_manifest_and_best(finished_sweep):
    spec = finished_sweep
    result = export_sweep(spec)
    ok = sorted((r for r in load_records(spec) if r.row.objective is not None), key=lambda r: -r.row.objective)
    manifest = json.loads((spec.output_dir / "export" / "manifest.json").read_text())
    assert [e["trial_id"] for e in manifest["entries"]] == [r.row.trial_id for r in ok[:2]]
    assert [e["rank"] for e in manifest["entries"]] == [1, 2]
    for rel, digest in manifest["sha256"].items():
        assert hashlib.sha256((spec.output_dir / rel).read_bytes()).hexdigest() == digest, rel
    for entry in manifest["entries"]:
        assert set(entry["files"]) == {"kohya", "diffusers", "samples", "info"}
        info = json.loads((spec.output_dir / entry["files"]["info"]).read_text())
        assert info["sweep"] == "demo" and info["params"] == entry["params"] and info["train_config"]["max_train_steps"] == 10
    # best.safetensors is the winner's kohya file, best.json its params and score.
    assert result.best == spec.output_dir / "best.safetensors"
    assert result.best.read_bytes() == (spec.output_dir / manifest["entries"][0]["files"]["kohya"]).read_bytes()
    best = json.loads((spec.output_dir / "best.json").read_text())
    assert best["format"] == "kohya" and best["objective"]["value"] == pytest.approx(ok[0].row.objective)
    with safe_open(str(result.best), "pt") as f:
        assert f.metadata()["ss_network_dim"] == str(ok[0].row.params["rank"])
    assert not list(spec.output_dir.rglob("*.tmp")) and not (spec.output_dir / ".export-staging").exists()


def test_verify_files_detects_a_changed_file(finished_sweep, tmp_path):
    spec = finished_sweep
    export_sweep(spec)
    manifest = json.loads((spec.output_dir / "export" / "manifest.json").read_text())
    verify_files(str(spec.output_dir), manifest)
    target = spec.output_dir / manifest["entries"][1]["files"]["diffusers"]
    original = target.read_bytes()
    try:
        target.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(ValueError, match="does not match the manifest"):
            verify_files(str(spec.output_dir), manifest)
    finally:
        target.write_bytes(original)


def test_cli_export_only_and_status_print_table_and_winner_last(finished_sweep, capsys):
    spec = finished_sweep
    args = ["--space", str(ROOT / "examples" / "demo.yaml"), "--set", f"storage={spec.storage}",
            "--set", "export.top_k=2", "--set", "train.max_train_steps=10",
            "--set", "objective={metric: clip_score, mode: max}", "--set", "space.lr_scheduler=constant"]
    assert run_cli.main([*args, "--status"]) == 0
    status = capsys.readouterr().out
    assert "failed" in status and "complete" in status and "4 trials" in status
    # --columns: the best checkpoint's value of any reported metric, as a column beside the objective.
    assert run_cli.main([*args, "--status", "--columns", "loss"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("trial"))
    assert lines[start].split() == ["trial", "learning_rate", "rank", "clip_score", "loss", "state", "steps", "wall", "s",
                                    "CPU", "h", "not", "run"]
    params = {r.row.trial_id: r.row.params for r in load_records(spec)}
    for line in lines[start + 2:start + 6]:
        cells = line.split()
        if cells[-5] != "failed":
            assert cells[4] == f"{stub_loss(params[cells[0]]):.4g}", line
    assert run_cli.main([*args, "--export-only"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"best LoRA: {spec.output_dir / 'best.safetensors'}"


def test_status_of_a_sweep_that_never_ran_is_a_clear_error(tmp_path, capsys):
    code = run_cli.main(["--space", str(ROOT / "examples" / "demo.yaml"), "--set", f"storage={tmp_path}", "--status"])
    assert code == 2
    assert "no sweep state here yet" in capsys.readouterr().err


def test_multi_objective_sweep_exports_its_pareto_front(ray_local, tmp_path):
    spec = demo_spec(
        tmp_path, "objective=[{metric: clip_score, mode: max}, {metric: loss, mode: min}]", "search.sampler=nsga2",
        "pruner.type=none",
        "search.num_trials=5", "space.rank={type: choice, values: [2, 4]}",
    )
    run_sweep(spec, None, trainable=stub_trial)
    records = load_records(spec)
    points = {r.row.trial_id: (r.row.values["clip_score"], r.row.values["loss"]) for r in records}
    assert len(points) == 5

    def dominated(p):
        return any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points.values())

    front = {t for t, p in points.items() if not dominated(p)}
    result = export_sweep(spec, records)
    assert result.manifest["selection"] == "pareto_front"
    assert {e["trial_id"] for e in result.manifest["entries"]} == front
    assert {c.record.row.trial_id for c in choose(records, spec)} == front
    scores = [e["objectives"]["clip_score"] for e in result.manifest["entries"]]
    assert scores == sorted(scores, reverse=True)  # ranked by the first objective


def test_dry_run_and_resume_of_nothing_start_nothing(tmp_path, capsys):
    args = ["--space", str(ROOT / "examples" / "demo.yaml"), "--set", f"storage={tmp_path}"]
    assert run_cli.main([*args, "--dry-run"]) == 0
    assert "learning_rate" in capsys.readouterr().out
    assert run_cli.main([*args, "--resume"]) == 2
    assert "no sweep demo" in capsys.readouterr().err
    assert not (tmp_path / "demo" / "tune").exists()
    # A dataset that is not on this machine (it may be on the cluster's) is a warning naming it.
    assert run_cli.main([*args, "--set", "dataset=/mnt/cluster/data", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "warning: dataset: dataset folder /mnt/cluster/data does not exist" in out


def test_status_and_export_only_read_the_stored_spec(finished_sweep, capsys):
    from sweeps.stored_spec import store

    store(finished_sweep)  # as sweeps/run.py records it when it starts a sweep
    root = Path(finished_sweep.storage_uri)

    def cli(*extra):
        sets = demo_sets(root, *FINISHED, *extra)
        return run_cli.main(["--space", str(ROOT / "examples" / "demo.yaml"), *[a for s in sets for a in ("--set", s)]])

    # A changed question: starting is refused, --status shows the stored sweep and says so.
    assert cli("space.rank={type: choice, values: [8, 16]}") == 2
    assert "space.rank.values: the stored sweep has [2, 4, 8], this spec [8, 16]" in capsys.readouterr().err
    assert run_cli.main(["--space", str(ROOT / "examples" / "demo.yaml"), "--status",
                         *[a for s in demo_sets(root, *FINISHED, "space.rank={type: choice, values: [8]}")
                           for a in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert "using the spec stored with sweep demo" in out and "4 trials:" in out
    # A safe change applies: --export-only with another top_k exports that many.
    sets = demo_sets(root, *FINISHED[1:], "export.top_k=1")
    assert run_cli.main(["--space", str(ROOT / "examples" / "demo.yaml"), "--export-only",
                         *[a for s in sets for a in ("--set", s)]]) == 0
    assert "exported 1 LoRA(s)" in capsys.readouterr().out
