"""The data behind each panel of the sweep report, over a finished stub sweep (tests/sweeps/conftest.py):
the table, the curves with their pruning marks, the XYZ grids' cells, the page, the report CLI and
the sweep rewriting its report after every finished trial."""

import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
from conftest import STEPS, lr_code, run_stub_sweep, stub_score, stub_spec

from sweeps import report as report_cli
from sweeps.report import load_sweep_spec, write_report
from sweeps.report_data import XyzChoice, collect, table
from sweeps.results import load_records, sweep_uri
from sweeps.search import load_pruned
from sweeps.xyz_grids import make_axis


def test_table_has_every_trial_with_its_best_evaluation(report_sweep):
    spec, _ = report_sweep
    data = collect(spec)
    header, rows = table(data.trials, spec)
    assert header == ["trial", "learning_rate", "rank", "clip_score", "state", "steps", "trial s", "CPU h", "steps not run"]
    assert len(rows) == len(data.trials) == spec.search.num_trials
    for row in rows:
        params = dict(zip(["learning_rate", "rank"], row[1:3]))
        assert row[3] == pytest.approx(stub_score(params, row[5]))  # the best evaluation is the last one
        assert row[4] in ("complete", "pruned") and row[6] > 0
        assert row[7] == pytest.approx(row[6] / 3600)  # 1 CPU per trial: wall x 1
        assert row[8] == (STEPS[-1] - row[5] if row[4] == "pruned" else None)


def test_curves_hold_every_evaluation_and_pruned_trials_are_marked_where_they_stopped(report_sweep):
    spec, _ = report_sweep
    data = collect(spec)
    pruned = load_pruned(spec.output_dir / "study")
    assert pruned, "the demo's median pruner stopped no stub trial; the pruned marks go untested"
    for t in data.trials:
        steps = [p["step"] for p in t.curve]
        assert [p["clip_score"] for p in t.curve] == pytest.approx([stub_score(t.row.params, s) for s in steps])
        if t.row.trial_id in pruned:
            assert t.row.state == "pruned" and t.stopped_at == pruned[t.row.trial_id] == steps[-1] < STEPS[-1]
        else:
            assert steps == list(STEPS) and t.stopped_at is None


def _shows(cell: np.ndarray, trial) -> bool:
    """Whether an image is the trial's: the stub paints its rank and learning rate into the left
    half (the grid reads the kept JPEG images: near, not exact)."""
    r, g, _ = (int(v) for v in cell[2, 1])
    return abs(trial.row.params["rank"] * 30 - r) <= 4 and abs(lr_code(trial.row.params["learning_rate"]) - g) <= 4


def test_param_grid_shows_the_best_trial_of_each_cell(report_sweep):
    spec, _ = report_sweep
    data = collect(spec, xyz=XyzChoice.parse("x=learning_rate,y=rank,prompt=a lswsks square,seed=2"))
    grid = data.grids["params"]
    assert (grid.x_name, grid.y_name) == ("learning_rate", "rank")
    lr_axis = make_axis("learning_rate", [t.row.params["learning_rate"] for t in data.trials], log=True)
    assert grid.columns == lr_axis.labels
    assert grid.rows == [str(v) for v in sorted({t.row.params["rank"] for t in data.trials})]
    expected = {}
    for t in data.trials:
        cell = (grid.rows.index(str(t.row.params["rank"])), lr_axis.index(t.row.params["learning_rate"]))
        if cell not in expected or t.metrics["clip_score"] > expected[cell].metrics["clip_score"]:
            expected[cell] = t
    assert len(expected) >= 3
    prompts, seeds = spec.eval_prompts()
    item = list(zip(prompts, seeds)).index(("a lswsks square", 2))
    for r, row in enumerate(grid.cells):
        for c, cell in enumerate(row):
            if (r, c) not in expected:
                assert cell is None
                continue
            assert grid.meta["cells"][(r, c)] == expected[(r, c)].row.trial_id and _shows(cell, expected[(r, c)])
            assert abs(int(cell[2, -2, 0]) - item * 5) <= 4  # the asked prompt at the asked seed


def test_steps_grid_has_every_evaluation_from_the_kept_images_else_the_kept_checkpoints(report_sweep, tmp_path):
    spec, _ = report_sweep
    data = collect(spec)
    winner = data.best
    assert winner.row.params["learning_rate"] == max(t.row.params["learning_rate"] for t in data.trials)
    grid = data.grids["steps"]
    assert grid.columns == [f"step {s}" for s in STEPS]
    for row in grid.cells:
        for step, cell in zip(STEPS, row):
            assert abs(int(cell[0, 0, 2]) - step * 20) <= 4  # kept as JPEG: near, not exact
    # Without the kept images (an older sweep), the checkpoints Tune kept: two of the three.
    copy = tmp_path / spec.name
    shutil.copytree(spec.output_dir, copy, symlinks=True)
    shutil.rmtree(copy / "evals")
    other = collect(load_sweep_spec(str(copy)))
    grid = other.grids["steps"]
    assert grid.columns == [f"step {s}" for s in STEPS[-2:]] and "checkpoints Tune kept" in grid.note
    # the parameter grid then reads its cells from the checkpoints: the same trials, exact images
    assert other.grids["params"].meta == data.grids["params"].meta
    for row, kept in zip(other.grids["params"].cells, data.grids["params"].cells):
        for a, b in zip(row, kept):
            assert (a is None) == (b is None)
            if a is not None:  # the middle of each half (JPEG rings at the edge between them)
                assert np.abs(a[2, [1, -2]].astype(int) - b[2, [1, -2]]).max() <= 6


def test_seeds_and_trigger_grids_of_the_winner(report_sweep):
    spec, _ = report_sweep
    data = collect(spec)
    prompts, seeds = spec.eval_prompts()
    grid = data.grids["seeds"]
    assert grid.columns == ["seed 0", "seed 1", "seed 2", "seed 3"] and grid.rows == list(dict.fromkeys(prompts))
    index = {pair: i for i, pair in reversed(list(enumerate(zip(prompts, seeds))))}
    for r, prompt in enumerate(grid.rows):
        for c, seed in enumerate((0, 1, 2, 3)):
            assert int(grid.cells[r][c][0, -1, 0]) == index[(prompt, seed)] * 5
    trigger = data.grids["trigger"]
    assert trigger.columns == ["with 'lswsks'", "without 'lswsks'"]
    for (on, off), row, label in zip(trigger.meta["pairs"], trigger.cells, trigger.rows):
        assert prompts[on] == "a lswsks circle" and prompts[off] == "a circle" and seeds[on] == seeds[off]
        assert label == f"a lswsks circle | seed {seeds[on]}"
        assert int(row[0][0, -1, 0]) == on * 5 and int(row[1][0, -1, 0]) == off * 5


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.sources, self.in_body = 0, [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.in_body |= tag == "tbody"
        self.rows += tag == "tr" and self.in_body
        for key in ("src", "href"):
            if key in attrs:
                self.sources.append(attrs[key])

    def handle_endtag(self, tag):
        self.in_body &= tag != "tbody"


def test_the_sweep_rewrote_its_report_after_every_finished_trial(report_sweep):
    spec, out = report_sweep
    counts = [int(m) for m in re.findall(r"report \((\d+) of \d+ trials finished\)", out)]
    # once per finished trial (two may finish in one step of Tune's loop) and at the end
    assert counts[-1] == spec.search.num_trials and len(counts) >= spec.search.num_trials - 1
    assert counts == sorted(counts)
    html = (spec.output_dir / "report" / "index.html").read_text()
    page = _Page()
    page.feed(html)
    assert page.rows == spec.search.num_trials and "running" not in re.findall(r'<tr class="(\w+)', html)
    assert page.sources and all(s.startswith("data:image/") for s in page.sources)  # self-contained, offline
    for name in ("params", "steps", "seeds", "trigger"):
        assert (spec.output_dir / "report" / "xyz" / f"{name}.png").is_file()


def test_report_cli_on_a_sweep_folder(report_sweep, capsys, tmp_path):
    spec, _ = report_sweep
    assert report_cli.main([str(spec.output_dir), "--xyz", "x=rank"]) == 0
    assert capsys.readouterr().out.strip() == str(spec.output_dir / "report" / "index.html")
    assert report_cli.main([str(tmp_path)]) == 2
    assert "spec.json: not found" in capsys.readouterr().err
    assert report_cli.main([str(spec.output_dir), "--xyz", "x=nope"]) == 2
    assert "'nope' is not a searched parameter" in capsys.readouterr().err


@pytest.mark.slow  # a second stub sweep
def test_pareto_front_and_exported_points_of_a_multi_objective_sweep(ray_local, tmp_path):
    from sweeps.export import export_sweep
    from sweeps.report_plots import pareto_plot

    spec = stub_spec(tmp_path, "objective=[{metric: clip_score, mode: max}, {metric: loss, mode: min}]",
                     "search.sampler=nsga2", "pruner.type=none", "search.num_trials=5")
    run_stub_sweep(spec)
    records = load_records(spec)
    export_sweep(spec, records)
    data = collect(spec, records)
    points = {t.row.trial_id: (t.metrics["clip_score"], t.metrics["loss"]) for t in data.trials}
    front = {t for t, p in points.items() if not any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points.values())}
    assert set(data.pareto) == front == set(data.exported)
    assert [imp.metric for imp in data.importances] == ["clip_score", "loss"]
    assert pareto_plot(data)[:8] == b"\x89PNG\r\n\x1a\n"
    html = write_report(spec, records)
    assert "Pareto front" in open(html).read() and sweep_uri(spec) in html


def test_status_prints_parameter_importance(report_sweep):
    from sweeps.status import sweep_status

    spec, _ = report_sweep
    complete = sum(t.row.state == "complete" for t in collect(spec).trials)
    line = next(ln for ln in sweep_status(spec).splitlines() if ln.startswith("parameter importance"))
    assert re.fullmatch(rf"parameter importance for clip_score \(fanova, {complete} complete trials\): "
                        r"(learning_rate|rank) \d\.\d\d, (learning_rate|rank) \d\.\d\d", line), line


def test_a_lora_that_cannot_be_sampled_is_a_problem_line_not_a_failed_export(report_sweep):
    from sweeps.export import export_sweep
    from sweeps.report import report_uri
    from sweeps.xyz_sampling import sample_export_grids

    spec, _ = report_sweep
    export_sweep(spec)
    (problem,) = sample_export_grids(spec, report_uri(spec))  # the stub's LoRA file holds one lone tensor
    assert problem.startswith("rank1: the strength grid was not sampled (")
    assert not list((spec.output_dir / "report" / "xyz").glob("strength-*.png"))


def _gt_trial(tid: str, step: int, lpips: float):
    from types import SimpleNamespace

    from sweeps.report_data import TrialData

    metrics = {"step": step, "clip_score": 1.0, "gt_lpips": lpips, "gt_fd": 2 * lpips, "gt_kid": 0.1, "gt_cmmd": 3.0,
               "gt_clip_t": 20.0 + lpips}
    return TrialData(SimpleNamespace(row=SimpleNamespace(trial_id=tid, params={})), metrics, [])


def test_ground_truth_panel_puts_the_original_beside_the_fine_tuned_trials(tmp_path):
    """The panel of a sweep with eval.ground_truth, from what sweeps.ground_truth_scoring keeps in its
    storage: the base row labelled original, the winner and the next best labelled fine-tuned, and the
    truth images beside the base model's and the winner's of the same captions."""
    import json

    from sweeps.ground_truth_panel import SHOWN_TRIALS, ground_truth_panel
    from sweeps.ground_truth_scoring import BASE_ROW, images_uri, save_images, step_name
    from sweeps.report import _ground_truth
    from toyworld.world import render_shapes

    spec = stub_spec(tmp_path)
    root = sweep_uri(spec)
    trials = [_gt_trial(f"t{i}", 4 + i, 0.1 * (i + 1)) for i in range(SHOWN_TRIALS + 1)]
    assert ground_truth_panel(spec, trials) is None  # no base row yet
    truth, captions = render_shapes(3, seed=1)
    base_images, _ = render_shapes(3, seed=2)
    scores = {"gt_lpips": 0.5, "gt_fd": 1.5, "gt_kid": 0.2, "gt_cmmd": 4.0, "gt_clip_t": 18.0, "gt_lpips_items": [0.5] * 3}
    (tmp_path / spec.name / BASE_ROW).parent.mkdir(parents=True)
    (tmp_path / spec.name / BASE_ROW).write_text(json.dumps({"captions": captions, "seed": 7, "scores": scores}))
    save_images(images_uri(root, "truth"), truth)
    save_images(images_uri(root, "base"), base_images)
    save_images(images_uri(root, step_name("t0", 4)), np.zeros_like(truth))  # the winner's, at its best step

    panel = ground_truth_panel(spec, trials)
    assert [(r.label, r.who) for r in panel.rows] == [
        ("original", f"base model ({spec.base_model})"), ("fine-tuned", "winner t0 (step 4)"),
        ("fine-tuned", "trial t1 (step 5)"), ("fine-tuned", "trial t2 (step 6)")]  # the best SHOWN_TRIALS
    assert panel.rows[0].values == {k: v for k, v in scores.items() if k != "gt_lpips_items"}
    assert panel.rows[2].values["gt_lpips"] == pytest.approx(0.2) and panel.rows[2].values["gt_fd"] == pytest.approx(0.4)
    assert panel.captions == captions and panel.seed == 7 and panel.notes == []
    assert panel.header()[0] == "LPIPS (mean) (lower is better)" and panel.header()[-1] == "CLIP-T (higher is better)"
    # three labelled rows (truth, original, winner) of the three captions' 64 px images at twice their size
    image = np.asarray(panel.images).astype(int)
    top, left = image.shape[0] - 3 * (128 + 4), image.shape[1] - 3 * 128  # under the header, beside the labels
    for r, expected in enumerate((truth, base_images, np.zeros_like(truth))):
        for k in range(3):
            cell = image[top + r * 132:top + r * 132 + 128, left + k * 128:left + (k + 1) * 128]
            assert np.abs(cell[::2, ::2] - expected[k]).mean() < 8, (r, k)  # kept as JPEG: near, not exact
    page = _ground_truth(panel)
    assert page["rows"][0]["cells"][0] == "0.5" and page["plot"].startswith("data:image/png")
    # the winner's images missing (its evaluation kept none): the table stays, the note says why
    trials[0].metrics["step"] = 8
    assert "were not kept" in ground_truth_panel(spec, trials).notes[0]
    # a winner without ground-truth scores: the next best is shown, and the note says so
    del trials[0].metrics["gt_lpips"]
    panel = ground_truth_panel(spec, trials)
    assert panel.rows[1].who == "trial t1 (step 5)" and "winner t0 reports no ground-truth scores" in panel.notes[0]
