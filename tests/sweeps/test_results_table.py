"""The trials table's columns: the default few, the ones `--columns` chooses, and a bad choice (no Ray)."""

from pathlib import Path

import pytest

from sweeps import run as run_cli
from sweeps.results import SHOWN_METRICS, TABLE_COLUMNS, ColumnError, TrialRow, format_table, parse_columns
from sweeps.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def spec(tmp_path):
    return load_spec(ROOT / "examples" / "demo.yaml", [f"storage={tmp_path}"])  # objective: the composite, max


def _rows() -> list[TrialRow]:
    toy = {"objective": 42.5, "clip_score": 30.25, "concept_accuracy": 0.5, "prior_accuracy": 0.75, "cmmd": 1.5,
           "clip_kid": 0.0123, "diversity": 0.2, "val_loss": 0.0871, "heldout_score": 0.625, "lr": 0.002}
    return [TrialRow("t1", {"learning_rate": 0.002, "rank": 2}, 42.5, "complete", 400, 61.0, metrics=toy),
            TrialRow("t2", {"learning_rate": 0.03, "rank": 4}, None, "failed", 10, 3.0, reason="diverged")]


def _table(rows, spec, columns=None) -> list[list[str]]:
    lines = format_table(rows, spec, columns).splitlines()
    return [line.split() for line in lines[:1] + lines[2:4]]


def test_default_table_shows_the_few_shown_metrics_that_trials_report(spec):
    header, first, second = _table(_rows(), spec)
    assert header == ["trial", "learning_rate", "rank", "objective", "clip_score", "concept_accuracy", "prior_accuracy",
                      "cmmd", "state", "steps", "wall", "s", "CPU", "h", "not", "run"]
    # the demo's trials hold 1 CPU and no GPU: trial-hours are CPU-hours, wall x 1
    assert first == ["t1", "0.002", "2", "42.5", "30.25", "0.5", "0.75", "1.5", "complete", "400", "61", "0.01694", "-"]
    assert second == ["t2", "0.03", "4", "-", "-", "-", "-", "-", "failed", "10", "3", "0.0008333", "-"]
    # A sweep whose trials report none of them (no oracle, no training images): no empty columns.
    bare = [TrialRow("t1", {"rank": 2}, 1.0, "complete", 4, 1.0, metrics={"objective": 1.0, "val_loss": 0.1})]
    assert _table(bare, spec)[0] == ["trial", "rank", "objective", "state", "steps", "wall", "s", "CPU", "h", "not", "run"]


def test_chosen_columns_in_their_order_even_where_no_trial_reports_them(spec):
    header, first, second = _table(_rows(), spec, parse_columns("val_loss, clip_kid,diversity,objective,heldout_score,clip_fd"))
    # The objective is always there (once); the chosen columns replace the default ones.
    assert header == ["trial", "learning_rate", "rank", "objective", "val_loss", "clip_kid", "diversity", "heldout_score",
                      "clip_fd", "state", "steps", "wall", "s", "CPU", "h", "not", "run"]
    assert first == ["t1", "0.002", "2", "42.5", "0.0871", "0.0123", "0.2", "0.625", "-", "complete", "400", "61",
                     "0.01694", "-"]
    assert second[4:9] == ["-"] * 5


def test_bad_columns_name_every_valid_one():
    assert set(SHOWN_METRICS) < set(TABLE_COLUMNS)
    assert {"cmmd", "clip_fd", "clip_kid", "diversity", "val_loss", "heldout_score", "loss", "lr"} <= set(TABLE_COLUMNS)
    with pytest.raises(ColumnError) as err:
        parse_columns("clip_score,fid,cmdd")
    msg = str(err.value)
    assert msg.startswith("--columns: unknown column(s) fid, cmdd; valid columns: clip_score, clip_score_natural")
    assert all(name in msg for name in TABLE_COLUMNS)
    with pytest.raises(ColumnError, match="no column given"):
        parse_columns(" , ")
    assert parse_columns("cmmd,cmmd,loss") == ["cmmd", "loss"]


def test_cli_refuses_an_unknown_column_before_reading_the_sweep(tmp_path, capsys):
    code = run_cli.main(["--space", str(ROOT / "examples" / "demo.yaml"), "--set", f"storage={tmp_path}",
                         "--status", "--columns", "cmmd,fid"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error: --columns: unknown column(s) fid; valid columns:" in err and "clip_kid" in err
    assert not (tmp_path / "demo").exists()


def test_start_up_seconds_are_a_column_when_trials_report_them(spec):
    """Real trials report `startup_s` (trial start to first step): a cold worker loads the base
    model, a warm one reuses it; the table shows what each trial paid."""
    rows = _rows()
    rows[0].startup_s, rows[1].startup_s = 0.4321, 7.5
    header, first, second = _table(rows, spec)
    # The start-up column comes last, after the bill's two (trial-hours, steps not run).
    assert header[-10:] == ["state", "steps", "wall", "s", "CPU", "h", "not", "run", "start", "s"]
    assert first[-6:-3] + first[-1:] == ["complete", "400", "61", "0.4321"]
    assert second[-6:-3] + second[-1:] == ["failed", "10", "3", "7.5"]
    rows[1].startup_s = None  # a trial that never reached its first step
    assert _table(rows, spec)[2][-1] == "-"
