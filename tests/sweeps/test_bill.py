"""The bill: trial-hours, steps run and not run, what pruning saved; in the table, --status, best.json,
the report and beside the dry run's estimate (pure figures first, then over the finished stub sweep
of tests/sweeps/conftest.py, whose median pruner stops some trials)."""

import json
from pathlib import Path

import pytest
from conftest import STEPS

from sweeps import run as run_cli
from sweeps.bill import format_bill, sweep_bill
from sweeps.dry_run import estimate, estimate_vs_measured
from sweeps.results import TrialRow, format_table, load_records
from sweeps.search import load_pruned
from sweeps.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]


def _spec(tmp_path, *sets):
    return load_spec(ROOT / "examples" / "demo.yaml", [f"storage={tmp_path}", *sets])


def _rows() -> list[TrialRow]:
    return [TrialRow("a", {}, 1.0, "complete", 40, 120.0, budget=40),
            TrialRow("b", {}, 0.5, "pruned", 10, 40.0, budget=40),
            TrialRow("c", {}, None, "failed", 4, 20.0, budget=40)]


def test_trial_hours_are_wall_times_gpus_or_cpus_and_pruning_saves_the_steps_not_run(tmp_path):
    cpu = sweep_bill(_rows(), _spec(tmp_path, "resources={cpus_per_trial: 2, gpus_per_trial: 0}"))
    assert (cpu.unit, cpu.units_per_trial) == ("CPU", 2)
    assert [t.trial_hours for t in cpu.trials] == pytest.approx([240 / 3600, 80 / 3600, 40 / 3600])
    # only the pruned trial has steps not run; the failed one costs what it ran and saves nothing
    assert [t.steps_not_run for t in cpu.trials] == [0, 30, 0]
    assert cpu.steps_run == 54 and cpu.s_per_step == pytest.approx(180 / 54)
    assert cpu.saved_hours == pytest.approx(30 * (180 / 54) * 2 / 3600)
    gpu = sweep_bill(_rows(), _spec(tmp_path, "resources={cpus_per_trial: 4, gpus_per_trial: 0.5}"))
    assert gpu.unit == "GPU" and gpu.trial_hours == pytest.approx(180 * 0.5 / 3600)
    assert gpu.saved_hours == pytest.approx(30 * (180 / 54) * 0.5 / 3600)
    lines = format_bill(gpu)
    assert lines[0].startswith(f"bill: {gpu.trial_hours:.4g} GPU-hours (3 trials, wall x 0.5 GPU each), 54 steps run")
    assert lines[1].startswith(f"pruning: 1 trial(s) stopped early, 30 steps not run = {gpu.saved_hours:.4g} GPU-hours saved")
    none = sweep_bill(_rows()[:1], _spec(tmp_path))
    assert format_bill(none)[1] == "pruning: no trial was stopped early (nothing saved)"


def test_the_estimate_is_compared_per_trial_with_the_unpruned_measured_time(tmp_path):
    spec = _spec(tmp_path)
    bill = sweep_bill(_rows(), spec)
    cmp = estimate_vs_measured(spec, bill)
    est = estimate(spec)
    unpruned_h = (180 + 30 * 180 / 54) / 3 / 3600  # the pruned trial's skipped steps at the measured s/step
    assert cmp["measured"]["hours_per_trial"] == pytest.approx(unpruned_h, rel=1e-4)
    assert cmp["ratio"] == pytest.approx(unpruned_h / est["hours_per_trial"], rel=1e-3)
    assert cmp["estimated"]["unit_hours"] == pytest.approx(est["trial_hours"] * 1, rel=1e-4)
    assert cmp["measured"]["steps_per_trial"] == pytest.approx(84 / 3, abs=0.05)


def test_the_table_has_each_trials_bill_and_the_sweeps_totals(tmp_path):
    spec = _spec(tmp_path)
    lines = format_table(_rows(), spec).splitlines()
    assert lines[0].split()[-4:] == ["CPU", "h", "not", "run"]
    pruned = next(ln for ln in lines if ln.startswith("b "))
    assert pruned.split()[-2:] == [f"{40 / 3600:.4g}", "30"]
    assert lines[-2].startswith("bill: ") and lines[-1].startswith("pruning: 1 trial(s) stopped early, 30 steps")


def _measured(spec) -> tuple[float, int, int]:
    """Independently of sweeps.bill: the wall seconds, steps run and steps not run of the stub sweep,
    from each trial's result.json (Ray's log of what it reported)."""
    pruned = load_pruned(spec.output_dir / "study")
    wall = steps = not_run = 0
    for result in (spec.output_dir / "tune").glob("*/result.json"):
        last = json.loads(result.read_text().splitlines()[-1])
        wall += last["time_total_s"]
        steps += last["step"]
        trial_id = last["trial_id"]
        if trial_id in pruned:
            not_run += STEPS[-1] - last["step"]
    return wall, steps, not_run


def test_status_best_json_report_and_dry_run_carry_the_measured_bill(report_sweep, capsys):
    from sweeps.export import export_sweep
    from sweeps.report import write_report

    spec, _ = report_sweep
    wall, steps, not_run = _measured(spec)
    assert not_run > 0, "no stub trial was pruned: pruning's savings go untested"
    saved_h = not_run * wall / steps / 3600  # 1 CPU per trial
    args = ["--space", str(ROOT / "examples" / "demo.yaml"), "--set", f"storage={spec.storage}",
            "--set", f"train.max_train_steps={STEPS[-1]}", "--set", "objective={metric: clip_score, mode: max}",
            "--set", "space.lr_scheduler=constant", "--set", "search.num_trials=6"]
    assert run_cli.main([*args, "--status"]) == 0
    status = capsys.readouterr().out
    assert f"bill: {wall / 3600:.4g} CPU-hours (6 trials, wall x 1 CPU each), {steps} steps run" in status
    assert f"{not_run} steps not run = {saved_h:.4g} CPU-hours saved" in status
    assert "estimate (--dry-run, no pruning):" in status and "x the estimate" in status

    export_sweep(spec)
    bill = json.loads((spec.output_dir / "best.json").read_text())["bill"]
    assert bill["unit"] == "CPU" and bill["trials"] == 6 and bill["steps_run"] == steps
    assert bill["steps_not_run"] == not_run and bill["trial_hours"] == pytest.approx(wall / 3600, abs=1e-6)
    assert bill["pruning_saved_hours"] == pytest.approx(saved_h, abs=1e-6)
    assert bill["estimate_vs_measured"]["estimated"]["hours_per_trial"] == pytest.approx(
        estimate(spec)["hours_per_trial"], rel=1e-4)

    page = Path(write_report(spec)).read_text()
    assert "<h3 id=\"bill\">Cost</h3>" in page and f"{steps} steps run" in page
    assert "<th>CPU h</th>" in page and "<th>steps not run</th>" in page

    assert run_cli.main([*args, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "estimate: " in dry and "after the sweep: estimate (--dry-run, no pruning):" in dry
    records = load_records(spec)
    assert sum(r.row.wall_s for r in records) == pytest.approx(wall)


def test_the_bill_goes_to_the_wandb_summary_run(report_sweep, tmp_path, monkeypatch):
    import glob

    import wandb

    from sweeps.dry_run import bill_record
    from sweeps.report import write_report
    from sweeps.report_data import collect, table
    from sweeps.tracking import log_sweep_summary, read_records

    spec, _ = report_sweep
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = collect(spec)
    bill = bill_record(spec, [t.row for t in data.trials])
    run = wandb.init(project="bill-test", mode="offline", dir=str(tmp_path), job_type="summary")
    log_sweep_summary(run, spec, *table(data.trials, spec), [], write_report(spec), bill=bill)
    run.finish()
    (path,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    values = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
              for r in read_records(path) if r.WhichOneof("record_type") == "summary" for item in r.summary.update}
    wall, steps, not_run = _measured(spec)
    assert values["bill/trial_hours"] == pytest.approx(wall / 3600, abs=1e-6) and values["bill/unit"] == "CPU"
    assert (values["bill/steps_run"], values["bill/steps_not_run"]) == (steps, not_run)
    assert values["bill/pruning_saved_hours"] == pytest.approx(not_run * wall / steps / 3600, abs=1e-6)
    assert values["bill/measured_over_estimate"] == pytest.approx(bill["estimate_vs_measured"]["ratio"])
    assert values["bill/estimated/hours_per_trial"] == pytest.approx(estimate(spec)["hours_per_trial"], rel=1e-4)
